"""Every 5xx a node (or an endpoint) answers says whether the request took
effect — ``detail.outcome`` in the OCI error body and the ``outcome`` label of
``georeg_http_errors_total`` (the wire contract in ``registry_node.errors``) —
and says it truthfully: a *definite* refusal stored nothing, an *indefinite*
one is stored somewhere and may show up.

Zone quorum, full disks and endpoints with no replica are provoked on a
running cluster of real node processes (East US, three zones); the cases that
need a disk to fill at one precise instant run on an in-process node, whose
commit listener is the clock.
"""

from __future__ import annotations

import random

import pytest

from cluster.control import spec as specs
from cluster.faults.chaos import ChaosRun, ChaosWorkload, Observations, Scenario, Workload
from cluster.testing import RunningCluster
from replicator.topology import ReplicationSettings

from .helpers import assert_error, digest_of, eventually, make_image, push_blob, push_image
from .replication_invariants import metric_sum

ERRORS = "georeg_http_errors_total"
SPEC = {"home_region": "eastus", "home_zone_redundant": True, "paired_copies": False}
# A write waits this long for a second zone before its answer is indefinite.
QUORUM_TIMEOUT_S = 2.0
# Added one way between zones: a confirmation takes twice this, well past the timeout.
SLOW_ZONE_LINK_MS = 4000.0


async def metrics(http, url: str, internal: dict[str, str] | None = None) -> str:
    """``url``'s metrics (a node's internal route: on a cluster with auth,
    ``internal`` carries the cluster's internal credential)."""
    async with http.get(f"{url}/metrics", headers=internal) as r:
        assert r.status == 200, r.status
        return await r.text()


async def error_count(http, url: str, internal: dict[str, str] | None = None,
                      **labels: str) -> float:
    return metric_sum(await metrics(http, url, internal), ERRORS, **labels)


# -- the body and the metric on one node -------------------------------------------------


async def test_a_4xx_keeps_its_spec_detail_and_counts_as_definite(node, http):
    digest = digest_of(b"nowhere")
    async with http.get(f"{node.url}/v2/app/blobs/{digest}") as r:
        error = await assert_error(r, 404, "BLOB_UNKNOWN")
    assert error["detail"] == {"digest": digest}            # no outcome: a 4xx changed nothing
    assert await error_count(http, node.url, code="BLOB_UNKNOWN", status="404",
                             outcome="definite") == 1


async def test_disk_filling_once_a_blob_is_stored_does_not_fail_its_upload(node, http):
    """The blob commits; the disk fills before the upload session's record is
    dropped. The blob is stored, so a 507 (definite: nothing happened) would be
    false: the client gets its 201."""
    faults = node.registry.meta.faults
    data = b"layer" * 1000
    async with http.post(f"{node.url}/v2/app/blobs/uploads/") as r:
        assert r.status == 202
        location = r.headers["Location"]
    node.registry.meta.on_commit(lambda seq: setattr(faults, "full", True))
    async with http.put(f"{node.url}{location}", params={"digest": digest_of(data)},
                        data=data) as r:
        assert r.status == 201, await r.text()
    async with http.get(f"{node.url}/v2/app/blobs/{digest_of(data)}") as r:
        assert r.status == 200 and await r.read() == data
    faults.full = False


async def test_a_repository_delete_cut_short_by_a_full_disk_is_indefinite(node, http):
    """A repository delete commits one delete at a time: a disk that fills
    after the first leaves it partly done, so its 507 is indefinite and says
    what was done."""
    for seed in (1, 2):
        await push_image(http, node.url, "team/app", make_image([300], seed=seed), tag=f"v{seed}")
    faults = node.registry.meta.faults
    node.registry.meta.on_commit(lambda seq: setattr(faults, "full", True))
    async with http.delete(f"{node.url}/acr/v1/team/app") as r:
        error = await assert_error(r, 507, "UNAVAILABLE")
    assert error["detail"]["outcome"] == "indefinite"
    assert len(error["detail"]["done"]["manifestsDeleted"]) == 1
    assert await error_count(http, node.url, code="UNAVAILABLE", status="507",
                             outcome="indefinite") == 1
    faults.full = False
    async with http.get(f"{node.url}/v2/team/app/tags/list") as r:   # really partly done
        assert r.status == 200 and len((await r.json())["tags"]) == 1


# -- a zone-redundant region of real node processes ----------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    settings = ReplicationSettings(quorum_timeout_s=QUORUM_TIMEOUT_S)
    with RunningCluster(specs.parse(SPEC), tmp_path_factory.mktemp("outcomes"),
                        settings=settings) as running:
        yield running


@pytest.fixture
async def client(cluster):
    """A registry client of the cluster: it sends the admin login."""
    async with cluster.http() as session:
        yield session


@pytest.fixture
def zones(cluster):
    """The cluster, healed and writable in every zone after the test."""
    yield cluster
    cluster.run(cluster.cluster.faults.heal_all)
    for name, node in cluster.cluster.supervisor.nodes.items():
        if node.pid is None:
            cluster.restart(name)


def inject(cluster, kind: str, **target) -> None:
    cluster.run(lambda: cluster.cluster.faults.inject(kind, **target))


async def writable(http, url: str, internal: dict[str, str]) -> bool:
    async with http.get(f"{url}/georeg/v1/node", headers=internal) as r:
        return r.status == 200 and (await r.json())["writable"]


async def zone_quorum(http, cluster) -> None:
    """Until every zone can write and zone 1's writes are confirmed again (a
    fault healed just before may still hold confirmations back)."""
    for zone in ("1", "2", "3"):
        await eventually(lambda z=zone: writable(http, cluster.node_url(f"eastus-{z}"),
                                                 cluster.internal_headers()),
                         timeout=30, what=f"eastus-{zone} to reach its zone quorum")
    zone1, probes = cluster.node_url("eastus-1"), iter(range(1_000_000))

    async def acknowledged() -> bool:
        blob = b"probe %d" % next(probes)
        async with http.post(f"{zone1}/v2/outcome/probe/blobs/uploads/",
                             params={"digest": digest_of(blob)}, data=blob) as r:
            return r.status == 201

    await eventually(acknowledged, timeout=60, what="zone 1's writes to be confirmed")


async def serves(http, url: str, repo: str, reference: str) -> bool:
    async with http.head(f"{url}/v2/{repo}/manifests/{reference}") as r:
        return r.status == 200


async def test_two_zones_down_refuse_writes_definitely(zones, client):
    zone1 = zones.node_url("eastus-1")
    await zone_quorum(client, zones)
    before = await error_count(client, zone1, zones.internal_headers(),
                               code="UNAVAILABLE", status="503", outcome="definite")
    inject(zones, "zone-outage", region="eastus", zone="2", mode="crash")
    inject(zones, "zone-outage", region="eastus", zone="3", mode="crash")
    async def alone() -> bool:
        return not await writable(client, zone1, zones.internal_headers())

    await eventually(alone, timeout=30, what="zone 1 noticing it is alone")
    blob = b"never stored" * 100
    async with client.post(f"{zone1}/v2/outcome/app/blobs/uploads/",
                         params={"digest": digest_of(blob)}, data=blob) as r:
        error = await assert_error(r, 503, "UNAVAILABLE")
    assert error["detail"]["outcome"] == "definite"
    assert (error["detail"]["zones_reachable"], error["detail"]["zones_needed"]) == (1, 2)
    async with client.head(f"{zone1}/v2/outcome/app/blobs/{digest_of(blob)}") as r:
        assert r.status == 404                         # definite: it is not stored
    assert await error_count(client, zone1, zones.internal_headers(),
                             code="UNAVAILABLE", status="503", outcome="definite") == before + 1


async def test_a_write_no_second_zone_confirms_is_indefinite_and_lands(zones, client):
    """The links between the zones slow far beyond the quorum's timeout (their
    connections stay up: a stall or a cut would close them, and zone 1 would
    refuse up front): the manifest commits in zone 1 and no zone confirms it in
    time. Its 503 is indefinite, and it reaches every zone."""
    zone1 = zones.node_url("eastus-1")
    await zone_quorum(client, zones)
    image = make_image([2048], seed=21)
    for blob in image.blobs:                           # confirmed: the links still move
        await push_blob(client, zone1, "outcome/app", blob)
    before = await error_count(client, zone1, zones.internal_headers(),
                               code="UNAVAILABLE", status="503", outcome="indefinite")
    inject(zones, "link", a="eastus", b="eastus", latency_ms=SLOW_ZONE_LINK_MS)
    async with client.put(f"{zone1}/v2/outcome/app/manifests/v1", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        error = await assert_error(r, 503, "UNAVAILABLE")
    assert error["message"] == "write not confirmed by a second zone"
    assert error["detail"]["outcome"] == "indefinite"
    assert error["detail"]["stored_in"] == "eastus/1"
    assert await serves(client, zone1, "outcome/app", "v1")          # it did happen here
    assert await error_count(client, zone1, zones.internal_headers(),
                             code="UNAVAILABLE", status="503", outcome="indefinite") == before + 1
    for zone in ("2", "3"):
        await eventually(lambda z=zone: serves(client, zones.node_url(f"eastus-{z}"),
                                               "outcome/app", "v1"),
                         timeout=60, what=f"the unconfirmed write reaching eastus-{zone}")


async def test_the_chaos_workload_counts_an_unconfirmed_push_as_indefinite_until_it_lands(
        zones, client):
    """The chaos workload's bookkeeping, against a real zone: its blobs already
    stored (so only the manifest waits for a zone), a push whose manifest gets
    the indefinite 503 is neither acknowledged nor refused; once it lands, the
    run finds it."""
    zone1 = zones.node_url("eastus-1")
    await zone_quorum(client, zones)
    scenario = Scenario(name="outcomes", workload=Workload(clients=("eastus",), layers=1,
                                                           layer_size=512))
    obs = Observations()
    workload = ChaosWorkload(scenario, {"eastus": zone1}, random.Random(7), obs)
    image = workload.image()
    for blob in image.blobs:                           # confirmed: the links still move
        await push_blob(client, zone1, image.repository, blob)
    inject(zones, "link", a="eastus", b="eastus", latency_ms=SLOW_ZONE_LINK_MS)
    await workload.push(client, "eastus", image)
    assert (obs.pushes_attempted, len(obs.acknowledged), obs.pushes_refused) == (1, 0, 0)
    assert [p.tag for p in obs.indefinite] == [image.tag]
    assert [code for _, _, _, code in obs.errors] == ["UNAVAILABLE (indefinite)"]
    chaos = ChaosRun(scenario, zones.management_url, owner=zones.cluster.secrets.owner)
    chaos.obs = obs

    async def landed() -> bool:
        return await chaos._landed(client) == [True]

    await eventually(landed, timeout=60, what="the indefinite push to be found")


async def test_a_full_disk_refuses_definitely(zones, client):
    zone1 = zones.node_url("eastus-1")
    await zone_quorum(client, zones)
    before = await error_count(client, zone1, zones.internal_headers(),
                               code="UNAVAILABLE", status="507", outcome="definite")
    inject(zones, "disk", region="eastus", zone="1", full=True)
    blob = b"no room" * 500
    async with client.post(f"{zone1}/v2/outcome/disk/blobs/uploads/",
                         params={"digest": digest_of(blob)}, data=blob) as r:
        error = await assert_error(r, 507, "UNAVAILABLE")
    assert error["message"] == "disk full" and error["detail"]["outcome"] == "definite"
    async with client.head(f"{zone1}/v2/outcome/disk/blobs/{digest_of(blob)}") as r:
        assert r.status == 404
    assert await error_count(client, zone1, zones.internal_headers(),
                             code="UNAVAILABLE", status="507", outcome="definite") == before + 1


async def test_an_endpoint_with_no_replica_to_send_to_refuses_definitely(zones, client):
    regional = zones.regional_endpoint("eastus")
    inject(zones, "region-outage", region="eastus", mode="isolate")
    image = make_image([100], seed=22)
    async with client.put(f"{regional}/v2/outcome/app/manifests/v2", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        error = await assert_error(r, 503, "UNAVAILABLE")
    assert "X-Georeg-Replica" not in r.headers                    # the endpoint's own answer
    assert error["detail"]["outcome"] == "definite"
