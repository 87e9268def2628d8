"""One WAN copy of each event per zone-redundant region (``replicator.intake``):
of westeurope's three zones only the one ``event_receiver`` names reads
eastus's log whole across the WAN; the other two read it lean (their own
blob events and the head) and take the rest from that zone's log.

One in-process cluster for the module (real nodes, real gRPC, a real TCP link
for every ordered pair of nodes, whose byte counters say what crossed):
westeurope with three zones, eastus with one node. Default replication
settings, except that anti-entropy runs only on connect, so what is counted
and what converges is the event path's.

* an image's events cross into westeurope once, not once per zone, and the
  lean zones' cursors at eastus follow what they hold: eastus's log is held
  back by none of them once they have it all;
* the receiving zone killed: its siblings read eastus whole again and get
  every event, the zone comes back and catches up, verify is clean, and the
  siblings go lean again;
* the receiving zone cut off from eastus (alive, so its siblings' streams
  from it stay up): they read lean until its cursor has stood still for
  ``RELAY_STALL_S`` with eastus's head ahead, report no cursor past what they
  hold meanwhile, then read whole and get the image;
* peers added while the nodes run (``replication create``): each running
  zone names the same receiving zone for a new peer as a zone started on the
  new view does, so one of them reads it whole whoever restarted;
* a lean zone whose stream from eastus was down while the receiving zone
  vouched for more takes that cursor when it reads lean again, without
  waiting for a stall;
* eastus rebuilt (a new node id, a shorter log): the lean zones follow the
  new incarnation's head, not the old one's, so an idle lean stream does not
  look stalled.
"""

from __future__ import annotations

import shutil

import msgspec
import pytest

from cluster.faults.verify import NodeTarget, verify
from replicator import subscription as subscription_module
from replicator.retry import Backoff
from replicator.runtime import Replication
from replicator.topology import Peer, ReplicationSettings, event_receiver

from .helpers import eventually, make_image, push_image
from .replication_harness import InProcessCluster, module_cluster

in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOPOLOGY = [("westeurope", "1"), ("westeurope", "2"), ("westeurope", "3"), ("eastus", "")]
ZONES = ("1", "2", "3")
SETTINGS = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0)
RECEIVER = f"westeurope-{event_receiver(ZONES, 'eastus')}"


cluster, http = module_cluster("wanevents", TOPOLOGY, SETTINGS)


def _siblings() -> list[str]:
    return [f"westeurope-{z}" for z in ZONES if f"westeurope-{z}" != RECEIVER]


def _to_eastus(cluster: InProcessCluster, name: str):
    return next(s for s in cluster.nodes[name].replication.subscriptions
                if s.peer.name == "eastus")


def _lean(cluster: InProcessCluster) -> bool:
    return all(_to_eastus(cluster, n).lean and _to_eastus(cluster, n).connected
               for n in _siblings())


def _wan_bytes(cluster: InProcessCluster, via: str) -> int:
    """What ``via``'s connections to eastus carried (both directions)."""
    return cluster.links[(via, "eastus")].bytes_forwarded


async def _everywhere(cluster, http, repo: str, images, names=None) -> None:
    """Every tag stored on every node named (not read over HTTP: a read that
    misses asks the peers, which would hide what the events did not bring)."""
    for name in names or cluster.names_in("westeurope"):
        replica = cluster.nodes[name].replication.replica
        for tag, image in images.items():
            await eventually(lambda r=replica, t=tag, i=image: r.resolve_tag(repo, t) == i.digest,
                             timeout=30, what=f"{repo}:{tag} on {name}")


def _reader_seq(cluster: InProcessCluster, reader: str) -> int:
    record = cluster.nodes["eastus"].replication.retention.reader(reader)
    return record.seq if record is not None else 0


@in_module_loop
async def test_each_event_crosses_into_a_zone_redundant_region_once(cluster, http):
    await eventually(lambda: _lean(cluster), timeout=20, what="the siblings to read eastus lean")
    before = {n: _wan_bytes(cluster, n) for n in cluster.names_in("westeurope")}
    # Tiny layers: what crosses is events (manifests with their bodies, tags).
    images = {f"v{i}": make_image([64, 96], seed=100 + i) for i in range(8)}
    for tag, image in images.items():
        await push_image(http, cluster.nodes["eastus"].url, "wanevents/once", image, tag=tag)
    await _everywhere(cluster, http, "wanevents/once", images)
    crossed = {n: _wan_bytes(cluster, n) - before[n] for n in before}
    whole = crossed[RECEIVER]
    # The lean zones' streams carry eastus's own blob events (each naming the
    # zone that gets the blob) and heads, not manifests and tags: measured
    # 0.45 of the whole stream each for these images (nearly all events, the
    # blobs a few bytes), 1.0 each when every zone reads whole.
    for name in _siblings():
        assert crossed[name] < 0.6 * whole, crossed
    assert sum(crossed.values()) < 2.2 * whole, crossed
    # Nothing the lean zones hold is held back at eastus on their account:
    # their reported cursors reach its head (the region's blob acks aside, the
    # log is idle now).
    east = cluster.nodes["eastus"].replication.replica.meta
    for name in cluster.names_in("westeurope"):
        await eventually(lambda n=name: _reader_seq(cluster, n) >= east.last_seq, timeout=15,
                         what=f"eastus to record {name} at its head")


@in_module_loop
async def test_siblings_get_every_event_when_the_receiving_zone_is_killed(cluster, http):
    await eventually(lambda: _lean(cluster), timeout=20, what="the siblings to read eastus lean")
    await cluster.crash(RECEIVER)
    try:
        images = {f"k{i}": make_image([2048, 1024], seed=200 + i) for i in range(3)}
        for tag, image in images.items():
            await push_image(http, cluster.nodes["eastus"].url, "wanevents/killed", image,
                             tag=tag)
        await _everywhere(cluster, http, "wanevents/killed", images, names=_siblings())
        for name in _siblings():
            sub = _to_eastus(cluster, name)
            assert sub.fallbacks >= 1 and not sub.lean, (name, sub.fallbacks, sub.lean)
    finally:
        await cluster.restart(RECEIVER)
        await cluster.wait_ready()
    await _everywhere(cluster, http, "wanevents/killed", images)
    await eventually(lambda: _lean(cluster), timeout=20,
                     what="the siblings to read eastus lean again")
    targets = [NodeTarget(n.name, n.region, n.url, n.zone, n.data_dir) for n in cluster.running()]
    report = await verify(targets, policy=cluster.residency, timeout=30)
    assert report.error is None and not report.divergences, report.as_dict()


@in_module_loop
async def test_a_stalled_receiver_is_passed_over_and_nothing_unheld_is_reported(
        cluster, http, monkeypatch):
    monkeypatch.setattr(subscription_module, "RELAY_STALL_S", 1.5)
    await eventually(lambda: _lean(cluster), timeout=20, what="the siblings to read eastus lean")
    east = cluster.nodes["eastus"].replication.replica.meta
    held = east.last_seq          # every westeurope zone holds eastus's log up to here
    await eventually(lambda: all(_reader_seq(cluster, n) >= held for n in _siblings()),
                     timeout=15, what="the siblings' cursors at eastus's head")
    cluster.links[(RECEIVER, "eastus")].cut()
    cluster.links[("eastus", RECEIVER)].cut()
    reported: dict[str, int] = {}

    def fell_back() -> bool:
        # The nodes run in this event loop: nothing moves while this looks.
        for name in _siblings():
            if _to_eastus(cluster, name).fallbacks == 0:       # still lean
                reported[name] = max(reported.get(name, 0), _reader_seq(cluster, name))
        return all(_to_eastus(cluster, n).fallbacks >= 1 and not _to_eastus(cluster, n).lean
                   for n in _siblings())
    try:
        image = make_image([512, 256], seed=300)
        await push_image(http, cluster.nodes["eastus"].url, "wanevents/stalled", image, tag="s")
        await eventually(fell_back, timeout=20, what="the siblings to pass over the stalled zone")
        # While they read lean, nothing vouched for them past what they held.
        assert all(seq <= held for seq in reported.values()), (reported, held)
        await _everywhere(cluster, http, "wanevents/stalled", {"s": image}, names=_siblings())
        await eventually(lambda: all(_reader_seq(cluster, n) >= east.last_seq
                                     for n in _siblings()),
                         timeout=15, what="the siblings' cursors past the image at eastus")
    finally:
        cluster.heal()
        await cluster.wait_ready()
    await _everywhere(cluster, http, "wanevents/stalled", {"s": image})
    await eventually(lambda: _lean(cluster), timeout=20,
                     what="the siblings to read eastus lean again")


@in_module_loop
async def test_a_peer_added_while_running_gets_the_receiver_a_restarted_zone_names(cluster):
    # A zone-redundant region added by `replication create`: its peers come
    # with the view that names its zones. Unreachable here (a closed port):
    # only the choice of which zone reads each whole is looked at.
    added = tuple(Peer(name=f"brazilsouth-{z}", region="brazilsouth", zone=z,
                       grpc="127.0.0.1:9") for z in ZONES)
    westeurope = cluster.names_in("westeurope")
    views = {n: msgspec.structs.replace(
        cluster.nodes[n].view, peers=cluster.nodes[n].view.peers + added,
        remote_zones={**cluster.nodes[n].view.remote_zones, "brazilsouth": ZONES})
        for n in westeurope}
    try:
        for name in westeurope:
            await cluster.nodes[name].replication.reconcile(views[name])
        for peer in added:
            running = {}
            for name in westeurope:
                sub = next(s for s in cluster.nodes[name].replication.subscriptions
                           if s.peer.name == peer.name)
                running[name] = sub.relay.zone if sub.relay else cluster.nodes[name].zone
            # What each zone would name, started on the new view.
            started = {}
            for name in westeurope:
                relay = Replication(views[name])._relay_for(peer)
                started[name] = relay.zone if relay else cluster.nodes[name].zone
            assert running == started, (peer.name, running, started)
            assert len(set(running.values())) == 1, (peer.name, running)
    finally:
        for name in westeurope:
            await cluster.nodes[name].replication.reconcile(cluster.nodes[name].view)


@in_module_loop
async def test_a_lean_zone_back_on_its_stream_takes_what_was_vouched_meanwhile(cluster, http):
    await eventually(lambda: _lean(cluster), timeout=20, what="the siblings to read eastus lean")
    east = cluster.nodes["eastus"].replication.replica.meta
    sibling = _siblings()[0]
    sub = _to_eastus(cluster, sibling)
    await eventually(lambda: sub.cursor().seq >= east.last_seq, timeout=15,
                     what=f"{sibling}'s cursor at eastus's head")
    fallbacks, backoff = sub.fallbacks, sub.backoff
    # Between two sessions (in the reconnect backoff, made long here) a
    # subscription reads neither lean nor whole: a vouch then moves nothing.
    sub.backoff = Backoff(base_s=4.0, cap_s=4.0, multiplier=1.0)
    cluster.links[(sibling, "eastus")].cut()
    cluster.links[("eastus", sibling)].cut()
    try:
        await eventually(lambda: not sub.connected and not sub.lean, timeout=15,
                         what="the stream to go down")
        image = make_image([128, 64], seed=400)
        await push_image(http, cluster.nodes["eastus"].url, "wanevents/vouched", image, tag="v")
        # It gets the image through the receiving zone's log, which vouches.
        await _everywhere(cluster, http, "wanevents/vouched", {"v": image}, names=[sibling])
        await eventually(lambda: sub.vouched is not None and sub.vouched.seq >= east.last_seq,
                         timeout=15, what="the receiving zone to vouch for the image")
        assert not sub.lean and sub.cursor().seq < sub.vouched.seq, (sub.cursor(), sub.vouched)
    finally:
        sub.backoff = backoff
        cluster.heal()
    # Nothing more moves at eastus or the receiving zone: only the vouch held
    # can bring the cursor to the head without reading eastus whole.
    await eventually(lambda: sub.connected and sub.lean and sub.cursor().seq >= east.last_seq,
                     timeout=20, what=f"{sibling} lean again, at eastus's head")
    assert sub.fallbacks == fallbacks, (sub.fallbacks, fallbacks)


@in_module_loop
async def test_lean_zones_follow_a_rebuilt_peers_head(cluster, http):
    # eastus loses its disk and comes back as a new node whose log is shorter
    # than the old one's (it reads nothing from westeurope meanwhile, so it
    # logs only its own new image). Three images first, so the old log is
    # longer than one image's whatever ran before this test.
    for seed in range(3):
        await push_image(http, cluster.nodes["eastus"].url, "wanevents/before-rebuild",
                         make_image([64], seed=400 + seed), tag=f"b{seed}")
    await eventually(lambda: _lean(cluster), timeout=20, what="the siblings to read eastus lean")
    old_head = cluster.nodes["eastus"].replication.replica.meta.last_seq
    await cluster.crash("eastus")
    shutil.rmtree(cluster.nodes["eastus"].data_dir)
    for name in cluster.names_in("westeurope"):
        cluster.links[("eastus", name)].cut()
    try:
        new = await cluster.restart("eastus")
        await push_image(http, new.url, "wanevents/rebuilt", make_image([64], seed=500), tag="r")
        meta = new.replication.replica.meta
        assert 0 < meta.last_seq < old_head, (meta.last_seq, old_head)

        def following(name: str) -> bool:
            sub = _to_eastus(cluster, name)
            return (sub.connected and sub.lean and sub.cursor().node_id == new.node.identity.node_id
                    and sub.lag_events == 0)
        for name in _siblings():
            await eventually(lambda n=name: following(n), timeout=15,
                             what=f"{name} at the new eastus's head (the old one was {old_head})")
            assert _to_eastus(cluster, name).peer_last_seq == meta.last_seq
    finally:
        cluster.heal()
        await cluster.wait_ready()
