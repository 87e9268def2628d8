"""Blob transfer across the WAN: where a destination asks for a blob.

Two zone-redundant regions in one process (real nodes, real gRPC, a real TCP
``cluster.network.links.Link`` for every ordered pair of nodes), so the bytes that
cross between regions can be counted on the links themselves:

* an image's layers are fetched from different zones of the origin region;
* with ``one_wan_copy_per_region``, each blob of a push crosses the WAN once
  per destination region — one zone fetches it, its siblings get it from that
  zone over the region's links — and without it, once per zone;
* a destination zone whose links to the origin region are all cut still gets
  every blob (from a sibling that can reach the origin);
* the origin names the zone that receives a blob (``Event.wan_receiver``)
  among those at the head of its log, and the siblings wait on that zone
  alone: not on one the origin passed over, and on none when it named none;
* ``FetchBlob`` with ``wait_ms`` serves a blob that lands during the wait,
  answers NOT_FOUND when the wait runs out, never waits past it, and keeps the
  residency rule;
* a node relays an image's events to a subscriber in about one batch, and
  subscriptions acknowledge only to the zone quorum;
* a relay that overtakes the origin's own stream (which carries the bytes)
  waits for it instead of fetching: the bytes cross the WAN once;
* the origin reads a blob it sends with its events once, for every
  subscriber, not once per subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from types import SimpleNamespace

import grpc
import msgspec
import pytest

from cluster.control.spec import ZONE_WRITE_QUORUM, ZONES
from cluster.network.links import LinkFaults
from registry_node.records import NodeIdentity
from replicator.errors import Outcome, ReplicationError
from replicator.peers import PeerClient
from replicator.residency import ResidencyPolicy
from replicator.service import INLINE_BLOB_MAX
from replicator.subscription import ORIGIN_WAIT_S
from replicator.topology import ClusterView, Peer, ReplicationSettings, ZoneRedundancy, digest_spin
from replicator.transfer import ORIGIN_ZONE_WAIT_MS, SIBLING_WAIT_MS, Transfer

from .helpers import digest_of, eventually, make_image, push_blob, push_image
from .replication_harness import InProcessCluster

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"),
            ("westeurope", "1"), ("westeurope", "2"), ("westeurope", "3")]
# Anti-entropy only on connect: the transfers counted here are the event path's.
SETTINGS = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0,
                               one_wan_copy_per_region=True)


@pytest.fixture
async def cluster(tmp_path, request):
    settings = SETTINGS
    if getattr(request, "param", True) is False:
        settings = msgspec.structs.replace(SETTINGS, one_wan_copy_per_region=False)
    async with InProcessCluster(tmp_path, TOPOLOGY, settings=settings) as c:
        yield c


async def _pullable(http, node, repo: str, tag: str, image) -> bool:
    async with http.get(f"{node.url}/v2/{repo}/manifests/{tag}") as r:
        return r.status == 200 and await r.read() == image.manifest


def _wan_bytes_into(cluster: InProcessCluster, region: str, origin: str) -> int:
    """Bytes the links from ``region``'s nodes to ``origin``'s carried (both
    directions: the destination's requests and the blobs coming back)."""
    return sum(link.bytes_forwarded for (src, dst), link in cluster.links.items()
               if cluster.nodes[src].region == region and cluster.nodes[dst].region == origin)


def _fetcher_zone(digest: str, zones=("1", "2", "3")) -> str:
    return sorted(zones)[digest_spin(digest) % len(zones)]


@pytest.mark.parametrize("cluster", [True, False], indirect=True,
                         ids=["one_wan_copy_per_region", "one_per_zone"])
async def test_each_blob_crosses_the_wan_once_per_region_or_zone(cluster, http):
    per_region = cluster.settings.one_wan_copy_per_region
    for node in cluster.running():  # acknowledgements go to the zone quorum only
        for sub in node.replication.subscriptions:
            assert sub.acknowledge == (sub.peer.peer.region == node.region)
    image = make_image([256 << 10, 256 << 10, 256 << 10, 256 << 10], seed=11)
    blob_bytes = sum(len(b) for b in image.blobs)
    before = _wan_bytes_into(cluster, "westeurope", "eastus")
    await push_image(http, cluster.nodes["eastus-1"].url, "wan/once", image, tag="v1")
    for name in cluster.names_in("westeurope"):
        await eventually(lambda n=cluster.nodes[name]: _pullable(http, n, "wan/once", "v1", image),
                         timeout=20, what=f"wan/once:v1 on {name}")
    crossed = _wan_bytes_into(cluster, "westeurope", "eastus") - before
    local = sum(link.bytes_forwarded for (src, dst), link in cluster.links.items()
                if cluster.nodes[src].region == cluster.nodes[dst].region == "westeurope")
    if per_region:
        # Once per region, plus events and framing (three zones each fetching
        # across the WAN would be three times the blobs); the other two zones
        # got each blob from a sibling, over the region's links.
        assert blob_bytes <= crossed < 1.5 * blob_bytes, (crossed, blob_bytes)
        assert local >= 2 * blob_bytes
    else:
        assert 3 * blob_bytes <= crossed < 3.5 * blob_bytes, (crossed, blob_bytes)
        assert local < blob_bytes
    if per_region:
        # The layers crossed into different zones (each the receiving zone of
        # its own layers): no WAN link carried the whole image.
        receivers = {name for name in cluster.names_in("westeurope")
                     if sum(link.bytes_forwarded for (src, dst), link in cluster.links.items()
                            if src == name and cluster.nodes[dst].region == "eastus") > 200 << 10}
        assert len(receivers) >= 2, receivers


async def test_a_zone_cut_off_from_the_origin_region_gets_every_blob(cluster, http):
    # Only westeurope-1 still reaches eastus; its siblings depend on it.
    for name in ("westeurope-2", "westeurope-3"):
        for origin in cluster.names_in("eastus"):
            cluster.links[(name, origin)].cut()
            cluster.links[(origin, name)].cut()
    image = make_image([64 << 10] * 6, seed=12)
    await push_image(http, cluster.nodes["eastus-1"].url, "wan/cut", image, tag="v1")
    for name in cluster.names_in("westeurope"):
        node = cluster.nodes[name]
        await eventually(lambda n=node: _pullable(http, n, "wan/cut", "v1", image),
                         timeout=30, what=f"wan/cut:v1 on {name}")
        for blob in image.blobs:
            async with http.get(f"{node.url}/v2/wan/cut/blobs/{digest_of(blob)}") as r:
                assert r.status == 200 and await r.read() == blob


async def test_siblings_do_not_wait_on_a_zone_the_origin_passed_over(cluster, http):
    # The first layer is too big to go with its event: it is fetched, by the
    # zone the origin names for it.
    image = make_image([INLINE_BLOB_MAX + 1, 128 << 10, 128 << 10], seed=13)
    layer = digest_of(image.layers[0])
    stuck = f"westeurope-{_fetcher_zone(layer)}"
    # The zone whose turn the first layer is hears nothing from eastus and
    # cannot reach it, while its siblings' streams from it stay up: the
    # origin names another zone, and the siblings go by the origin's choice,
    # not by what they see of the stuck zone (they would wait on it in vain).
    for origin in cluster.names_in("eastus"):
        cluster.links[(stuck, origin)].cut()
        cluster.links[(origin, stuck)].cut()
    service = cluster.nodes["eastus-1"].replication.service
    await eventually(lambda: not service.streaming_to("westeurope", stuck[-1]),
                     timeout=10, what=f"eastus-1 to see {stuck}'s stream end")
    waiting = [n for n in cluster.names_in("westeurope") if n != stuck]
    await push_image(http, cluster.nodes["eastus-1"].url, "wan/stuck", image, tag="v1")
    for name in cluster.names_in("westeurope"):
        await eventually(lambda n=cluster.nodes[name]: _pullable(http, n, "wan/stuck", "v1", image),
                         timeout=30, what=f"wan/stuck:v1 on {name}")
    # No sibling asked the stuck zone and gave up (its NOT_FOUND after the wait).
    for name in waiting:
        gave_up = cluster.nodes[name].replication.metrics.failures.labels(
            stuck, Outcome.PERMANENT.value)._value.get()
        assert gave_up == 0, f"{name} waited on {stuck} for {layer}"
    # The first layer reached the stuck zone too, through its siblings.
    async with http.get(f"{cluster.nodes[stuck].url}/v2/wan/stuck/blobs/{layer}") as r:
        assert r.status == 200 and await r.read() == image.layers[0]


@pytest.fixture
async def two_regions(tmp_path):
    """eastus (one node) and brazilsouth, which is confined (the default policy)."""
    async with InProcessCluster(tmp_path, [("eastus", ""), ("brazilsouth", "")],
                                residency=ResidencyPolicy(), settings=SETTINGS) as c:
        yield c


def _client(node, requester_region: str) -> PeerClient:
    peer = Peer(name=node.name, region=node.region, grpc=f"127.0.0.1:{node.grpc_port}")
    return PeerClient(peer, NodeIdentity(region=requester_region, zone="", node_id="test"))


async def _fetch(client: PeerClient, repo: str, digest: str, wait_ms: int) -> bytes:
    return b"".join([chunk async for chunk in client.fetch_blob(repo, digest, 0, wait_ms)])


async def test_fetch_blob_waits_for_a_blob_that_lands_and_no_longer(two_regions, http):
    east = two_regions.nodes["eastus"]
    client = _client(east, "westeurope")
    try:
        data = b"landing later" * 1000
        digest = digest_of(data)
        # Never lands: NOT_FOUND once the wait has run out, not before (the
        # 30 s bound only ends a hang).
        started = time.monotonic()
        with pytest.raises(ReplicationError) as caught:
            await asyncio.wait_for(_fetch(client, "wait/app", digest, 600), 30)
        assert caught.value.outcome is Outcome.PERMANENT and "NOT_FOUND" in caught.value.reason
        assert time.monotonic() - started > 0.55
        # Lands during the wait: served as soon as it is stored, not at the end
        # of its wait. A fetch of another blob, asked the same wait at the same
        # time, that never lands, is the yardstick: still waiting when the
        # landed one is served.
        other = digest_of(b"never lands")
        never = asyncio.ensure_future(_fetch(client, "wait/app", other, 10_000))
        fetching = asyncio.ensure_future(_fetch(client, "wait/app", digest, 10_000))
        try:
            await push_blob(http, east.url, "wait/app", data)
            assert await asyncio.wait_for(fetching, 30) == data
            assert not never.done()
        finally:
            never.cancel()
            with contextlib.suppress(asyncio.CancelledError, ReplicationError):
                await never
    finally:
        await client.close()


async def test_fetch_blob_wait_keeps_residency(two_regions, http):
    brazil = two_regions.nodes["brazilsouth"]
    data = b"stays in brazil" * 100
    digest = await push_blob(http, brazil.url, "br/app", data)
    outsider, insider = _client(brazil, "eastus"), _client(brazil, "brazilsouth")
    try:
        with pytest.raises(ReplicationError) as caught:
            await _fetch(outsider, "br/app", digest, 2000)
        assert caught.value.outcome is Outcome.PERMANENT
        assert grpc.StatusCode.PERMISSION_DENIED.name in caught.value.reason
        assert await _fetch(insider, "br/app", digest, 2000) == data
    finally:
        await outsider.close()
        await insider.close()


def _planner(region: str, zone: str, one_wan_copy_per_region: bool = True) -> Transfer:
    """A ``Transfer`` with only what ``blob_attempts`` reads (no node)."""
    transfer = Transfer.__new__(Transfer)
    transfer.region, transfer.zone, transfer._crossing = region, zone, Counter()
    transfer.one_wan_copy_per_region = one_wan_copy_per_region
    view = ClusterView(name=f"{region}-{zone}" if zone else region, region=region, zone=zone,
                       zone_redundancy=ZoneRedundancy(True, ZONES, ZONE_WRITE_QUORUM) if zone else ZoneRedundancy())
    transfer.region_zones, transfer.zone_peer = view.zone_redundancy.zones, view.is_zone_peer
    transfer.sibling_reachable = lambda zone: True
    return transfer


def _peer(region: str, zone: str) -> SimpleNamespace:
    name = f"{region}-{zone}" if zone else region
    return SimpleNamespace(name=name, peer=Peer(name=name, region=region, zone=zone))


def test_only_a_sibling_and_the_origin_region_are_ever_waited_on():
    """The order of sources (pure: no sockets). A sibling zone waits on the zone
    that fetches; that zone asks a zone of the origin region; nothing else is
    waited on, every source is still tried in the end, and a zone of the
    origin region keeps the announcer-first order."""
    everyone = [_peer(r, z) for r, z in TOPOLOGY] + [_peer("brazilsouth", "")]
    for zone in ("1", "2", "3"):
        transfer = _planner("westeurope", zone)
        sources = [p for p in everyone if p.name != f"westeurope-{zone}"]
        for seed in range(12):
            digest = "sha256:" + f"{seed * 0x1357:08x}" + "0" * 56
            attempts = transfer.blob_attempts(digest, "eastus", sources)
            assert sorted(a.peer.name for a in attempts) == sorted(p.name for p in sources)
            fetcher = _fetcher_zone(digest)
            waited = [a for a in attempts if a.wait_ms]
            crossing = attempts[0] if fetcher == zone else attempts[1]
            assert crossing.wan and crossing.peer.peer.region == "eastus"
            assert crossing.wait_ms == ORIGIN_ZONE_WAIT_MS
            if fetcher == zone:
                assert waited == [crossing]
            else:
                assert attempts[0].peer.name == f"westeurope-{fetcher}"
                assert attempts[0].wait_ms == SIBLING_WAIT_MS and not attempts[0].wan
                assert waited == attempts[:2]
    origin = _planner("eastus", "2")
    sources = [p for p in everyone if p.name != "eastus-2"]
    plain = origin.blob_attempts("sha256:" + "ab" * 32, "eastus", sources)
    assert [a.peer.name for a in plain] == [p.name for p in sources]
    assert not any(a.wait_ms for a in plain)
    # By default every zone crosses the WAN itself and waits on no sibling.
    zone = _planner("westeurope", "2", one_wan_copy_per_region=False)
    sources = [p for p in everyone if p.name != "westeurope-2"]
    for seed in range(12):
        attempts = zone.blob_attempts("sha256:" + f"{seed:08x}" + "0" * 56, "eastus", sources)
        assert attempts[0].wan and [a for a in attempts if a.wait_ms] == attempts[:1]


def test_the_zone_the_origin_names_is_the_one_waited_on():
    everyone = [_peer(r, z) for r, z in TOPOLOGY]
    transfer = _planner("westeurope", "1")
    sources = [p for p in everyone if p.name != "westeurope-1"]
    digest = "sha256:" + "cd" * 32
    # Named by the origin: that sibling, whatever the digest's own pick.
    for named in ("2", "3"):
        attempts = transfer.blob_attempts(digest, "eastus", sources, named)
        assert attempts[0].peer.name == f"westeurope-{named}"
        assert attempts[0].wait_ms == SIBLING_WAIT_MS and attempts[1].wan
    # This zone named: it crosses the WAN itself, first.
    assert transfer.blob_attempts(digest, "eastus", sources, "1")[0].wan
    # None named (no zone at the head of the origin's log): no sibling is waited on.
    attempts = transfer.blob_attempts(digest, "eastus", sources, "")
    assert attempts[0].wan and not any(a.wait_ms and not a.wan for a in attempts)


def test_an_images_layers_cross_from_different_origin_zones():
    transfer = _planner("southeastasia", "")
    sources = [_peer(r, z) for r, z in TOPOLOGY]
    picked = []
    for seed in range(3):  # three layers announced at once, none finished yet
        digest = "sha256:" + f"{seed:08x}" + "0" * 56
        first = transfer.blob_attempts(digest, "eastus", sources)[0]
        transfer._crossing[first.peer.name] += 1   # as ensure_blob records it
        picked.append(first.peer.name)
    assert sorted(picked) == ["eastus-1", "eastus-2", "eastus-3"]


@pytest.mark.serial  # the 0.2 s gather window against a push's arrival
async def test_relayed_events_of_an_image_travel_together(cluster, http):
    """westeurope-1 relays an eastus push as its blobs land there, one event at a
    time; a subscriber gets those events in about one batch, not one each."""
    relay = cluster.nodes["westeurope-1"]
    client = _client(relay, "southeastasia")
    call = client.subscribe()
    try:
        await call.write(client.start_message(relay.node.identity.node_id,
                                              relay.node.meta.last_seq))
        image = make_image([64 << 10] * 5, seed=14)
        await push_image(http, cluster.nodes["eastus-1"].url, "wan/relay", image, tag="v1")
        batches, kinds = 0, []
        while "tag_set" not in kinds:
            batch = await asyncio.wait_for(call.read(), 20)
            mine = [e.kind for e in batch.events if e.repository == "wan/relay"]
            batches += bool(mine)
            kinds += mine
        assert kinds.count("blob_put") == len(image.blobs)
        assert batches <= 2, f"{len(kinds)} relayed events came in {batches} batches"
    finally:
        call.cancel()
        await client.close()


@pytest.mark.serial  # the origin's stream, slowed, against the 1 s wait for it
@pytest.mark.parametrize("cluster", [False], indirect=True, ids=["one_per_zone"])
async def test_a_relay_that_overtakes_the_origin_waits_for_its_bytes(cluster, http):
    """eastus-1's stream to westeurope-1 carries the blobs and is made slow;
    eastus-2's relay of the same events (no bytes) arrives first. westeurope-1
    waits for the origin's stream rather than fetch: each blob crosses once."""
    node = cluster.nodes["westeurope-1"]
    cluster.links[("westeurope-1", "eastus-1")].set_faults(
        LinkFaults(extra_latency_ms=ORIGIN_WAIT_S * 1000 / 3))
    # Only eastus-2 may relay: the race is the origin's slow stream against it.
    for other in ("westeurope-2", "westeurope-3", "eastus-3"):
        cluster.links[("westeurope-1", other)].cut()
    image = make_image([256 << 10] * 4, seed=15)
    blob_bytes = sum(len(b) for b in image.blobs)
    links_in = [link for (src, dst), link in cluster.links.items()
                if src == "westeurope-1" and cluster.nodes[dst].region == "eastus"]
    before = sum(link.bytes_forwarded for link in links_in)
    relayed = node.replication.metrics.bytes.labels("eastus-2", "in")
    relayed_before = relayed._value.get()
    await push_image(http, cluster.nodes["eastus-1"].url, "wan/overtake", image, tag="v1")
    await eventually(lambda: _pullable(http, node, "wan/overtake", "v1", image),
                     timeout=20, what="wan/overtake:v1 on westeurope-1")
    assert relayed._value.get() == relayed_before, "a blob was fetched on the relay's word"
    crossed = sum(link.bytes_forwarded for link in links_in) - before
    assert blob_bytes <= crossed < 1.5 * blob_bytes, (crossed, blob_bytes)


@pytest.mark.parametrize("cluster", [False], indirect=True, ids=["one_per_zone"])
async def test_the_origin_reads_an_inline_blob_once_for_every_subscriber(cluster, http):
    origin = cluster.nodes["eastus-1"]
    service = origin.replication.service
    reads: Counter[str] = Counter()
    read_blob = service._read_blob

    async def counted(digest: str, size: int):
        reads[digest] += 1
        return await read_blob(digest, size)

    service._read_blob = counted
    image = make_image([300 << 10, 200 << 10, 100 << 10], seed=16)
    await push_image(http, origin.url, "wan/once-read", image, tag="v1")
    for node in cluster.running():
        await eventually(lambda n=node: _pullable(http, n, "wan/once-read", "v1", image),
                         timeout=20, what=f"wan/once-read:v1 on {node.name}")
    sent = origin.replication.metrics.bytes
    inline = sum(sent.labels(f"{n.region}/{n.zone}", "out")._value.get()
                 for n in cluster.running())
    assert inline >= 5 * sum(len(b) for b in image.blobs)   # all five subscribers got bytes
    assert {digest_of(b) for b in image.blobs} <= set(reads)
    assert max(reads.values()) == 1, reads
