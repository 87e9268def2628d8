"""A node's view of its cluster carries the plan's zone-redundancy decision,
and the node follows it: a view file says whether the region is zone
redundant, its zones and its write quorum; the peers listed never change that.
A view file written before views said so is still read (the decision taken
from its peers, once, as it loads)."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import msgspec
import pytest

from cluster.control import spec as specs
from cluster.control.plan import plan
from replicator.topology import ClusterView, Peer, ZoneRedundancy

from .helpers import NodeProcess, make_image, push_image

THREE_ZONES = ZoneRedundancy(enabled=True, zones=specs.ZONES, write_quorum=specs.ZONE_WRITE_QUORUM)


def _peers(region: str, zones: tuple[str, ...]) -> tuple[Peer, ...]:
    return tuple(Peer(name=f"{region}-{z}", region=region, zone=z, grpc=f"127.0.0.1:{9000 + i}")
                 for i, z in enumerate(zones))


def test_the_plan_hands_each_node_its_regions_decision(tmp_path):
    p = plan(specs.load(None).seeded(1), tmp_path)
    assert p.view(p.node("westeurope-2")).zone_redundancy == THREE_ZONES
    assert THREE_ZONES.zones == ("1", "2", "3") and THREE_ZONES.write_quorum == 2
    assert p.view(p.node("brazilsouth")).zone_redundancy == ZoneRedundancy()
    # A paired-region copy of a zone-redundant region is storage: no quorum.
    assert p.view(p.pair_copy("eastus")).zone_redundancy == ZoneRedundancy()
    # The spec counts nodes with the same zones the plan places.
    assert p.spec.node_count() == len(p.nodes) == 2 * len(specs.ZONES) + 2


def test_a_view_file_keeps_the_decision_whatever_its_peers_suggest(tmp_path):
    # Zone redundant, with zone 3's entry missing: zone 3 still counts.
    missing = ClusterView(name="eastus-1", region="eastus", zone="1",
                          peers=_peers("eastus", ("2",)), zone_redundancy=THREE_ZONES)
    # Not zone redundant, though its peers carry zones of its region.
    zoned_peers = ClusterView(name="westus-1", region="westus", zone="1",
                              peers=_peers("westus", ("2", "3")))
    for view in (missing, zoned_peers):
        path = tmp_path / f"{view.name}.json"
        view.dump(path)
        assert "zone_redundancy" in json.loads(path.read_text())
        assert ClusterView.load(path) == view
    loaded = ClusterView.load(tmp_path / "eastus-1.json")
    assert loaded.zone_redundant and loaded.quorum_zones == ("eastus/2", "eastus/3")
    assert loaded.zone_redundancy.zone_count == 3
    loaded = ClusterView.load(tmp_path / "westus-1.json")
    assert not loaded.zone_redundant and loaded.quorum_zones == () and loaded.zone_peers == ()


def test_a_view_file_from_before_the_plan_said_so_still_loads(tmp_path):
    """Written before views carried the decision: read from the peers once, as
    the node did then (zones with peers of the region; two copies a write)."""
    zoned = ClusterView(name="eastus-2", region="eastus", zone="2",
                        peers=(*_peers("eastus", ("1", "3")), Peer(name="westeurope",
                                                                   region="westeurope")))
    plain = ClusterView(name="westeurope", region="westeurope", peers=_peers("eastus", ("1",)))
    for view in (zoned, plain):
        raw = msgspec.to_builtins(view)
        del raw["zone_redundancy"]
        (tmp_path / f"{view.name}.json").write_text(json.dumps(raw))
    assert ClusterView.load(tmp_path / "eastus-2.json").zone_redundancy == ZoneRedundancy(
        enabled=True, zones=("1", "2", "3"), write_quorum=2)
    assert ClusterView.load(tmp_path / "westeurope.json").zone_redundancy == ZoneRedundancy()


@pytest.mark.parametrize("decision, why", [
    ({"enabled": True, "zones": ["2", "3"], "write_quorum": 2}, "zone '1' of eastus-1 is not one"),
    ({"enabled": True, "zones": ["1", "2", "3"], "write_quorum": 4}, "write_quorum 4 must be"),
    ({"enabled": True, "zones": ["1", "1", "2"], "write_quorum": 2}, "distinct zone names"),
    ({"enabled": False, "zones": ["1"], "write_quorum": 1}, "not zone redundant has no zones"),
])
def test_a_contradictory_decision_is_refused_with_the_file_named(tmp_path, decision, why):
    raw = {"name": "eastus-1", "region": "eastus", "zone": "1", "zone_redundancy": decision}
    path = tmp_path / "view.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as info:
        ClusterView.load(path)
    assert str(path) in str(info.value) and why in str(info.value)


async def test_georeg_node_follows_the_view_files_decision(tmp_path):
    """`georeg node --cluster FILE`: a node whose view says its region is not
    zone redundant takes writes alone, though its peers (down) carry zones of
    its region; one whose view says zone redundant refuses them with its zones
    down, and counts the zones the plan placed, not the peers it lists."""
    alone = ClusterView(name="westus-1", region="westus", zone="1",
                        grpc_listen="127.0.0.1:0", peers=_peers("westus", ("2", "3")))
    quorum = ClusterView(name="eastus-1", region="eastus", zone="1", grpc_listen="127.0.0.1:0",
                         peers=_peers("eastus", ("2",)), zone_redundancy=THREE_ZONES)
    nodes = []
    try:
        for view in (alone, quorum):
            path = tmp_path / f"{view.name}.json"
            view.dump(path)
            nodes.append(NodeProcess(tmp_path / view.name, ["--cluster", str(path)]).start())
        async with aiohttp.ClientSession() as http:
            infos = []
            for node in nodes:
                async with http.get(f"{node.url}/georeg/v1/node") as r:
                    infos.append(await r.json())
            assert [(i["zone_redundant"], i["zones"], i["write_quorum"], i["writable"])
                    for i in infos] == [(False, 1, 1, True), (True, 3, 2, False)]
            await push_image(http, nodes[0].url, "alone/app", make_image([100], seed=1), tag="v1")
            async with http.post(f"{nodes[1].url}/v2/zr/app/blobs/uploads/") as r:
                assert r.status == 503
                detail = (await r.json())["errors"][0]["detail"]
            assert "only 1 of 3 zones" in detail["reason"] and "writes need 2" in detail["reason"]
            assert (detail["zones"], detail["zones_needed"], detail["outcome"]) == (3, 2, "definite")
    finally:
        for node in nodes:
            node.close()


def test_an_auth_clusters_nodes_are_told_to_replicate_over_mutual_tls(tmp_path):
    """The plan decides it (an auth cluster's), each view carries it; the node
    never guesses it from the files it was given."""
    open_plan = plan(specs.load(None).with_auth("none").seeded(1), tmp_path / "open")
    auth_plan = plan(specs.load(None).seeded(1), tmp_path / "auth")      # auth is the default
    assert not any(open_plan.view(n).mutual_tls for n in open_plan.all_nodes)
    assert all(auth_plan.view(n).mutual_tls for n in auth_plan.all_nodes)


def test_a_node_told_to_replicate_over_mutual_tls_without_a_certificate_does_not_start(tmp_path):
    view = ClusterView(name="eastus", region="eastus", grpc_listen="127.0.0.1:0",
                       peers=(Peer(name="westus", region="westus", grpc="127.0.0.1:9000"),),
                       mutual_tls=True)
    path = tmp_path / "eastus.json"
    view.dump(path)
    node = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "node", "--data-dir", str(tmp_path / "eastus"),
         "--listen", "127.0.0.1:0", "--log-format", "json", "--cluster", str(path)],
        capture_output=True, text=True, timeout=120)
    assert node.returncode == 2, node.stderr
    assert "eastus replicates over mutual TLS" in node.stderr and "--auth-cert" in node.stderr
