"""One WAN copy per region, by default: an origin sends a zone-redundant remote
region each blob once, with its event, to the zone ``wan_receiver`` names, and
that zone's siblings get it over their region's links.

One in-process cluster for the module (real nodes, real gRPC, a real TCP link
for every ordered pair of nodes, whose byte counters say what crossed between
regions): eastus and westeurope with three zones each, southeastasia with one
node. Default replication settings, except that anti-entropy runs only on
connect, so the bytes counted are the event path's.

* an image's blobs cross into westeurope once, not once per zone, and its
  layers land on different zones; a single-node region still gets its copy;
* the receiving zone of a layer cut off from the origin region, or down,
  passes its turn to the next zone: the region still receives each blob
  once, and the cut-off zone converges through its siblings (the stopped
  one once back);
* a zone that is connected but catching up is passed over the same way;
* a blob too big to go with its event crosses the WAN once too: the
  receiving zone fetches it, its siblings read it from that zone;
* a receiving zone serves bytes that came with an event while it is still
  storing them, and bytes it fetches across the WAN as they arrive, and
  keeps the residency rule for them;
* a sibling waiting for held bytes it cannot use (a failed transfer's,
  another repository's) waits for the feed or a new hold, not in a loop;
* a growing held blob never holds more than its size, and a tee's bytes count
  against the budget until its last reader is done;
* ``wan_receiver`` spreads digests over the zones and skips unreachable ones.
"""

from __future__ import annotations

import asyncio

import pytest

from registry_node.records import NodeIdentity
from replicator.errors import Outcome, ReplicationError
from replicator.peers import PeerClient
from replicator.service import INLINE_BLOB_MAX
from replicator.topology import Peer, ReplicationSettings, wan_receiver
from replicator.transfer import HeldBlob, HeldBlobs, HeldBroken

from .helpers import digest_of, eventually, make_image, push_image
from .replication_harness import InProcessCluster, module_cluster

# The cluster is the module's: its tests run in the module's event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"),
            ("westeurope", "1"), ("westeurope", "2"), ("westeurope", "3"),
            ("southeastasia", "")]
ZONES = ("1", "2", "3")
# The defaults, but anti-entropy only on connect (its fetches are not the event path's).
SETTINGS = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0)


cluster, http = module_cluster("wancopy", TOPOLOGY, SETTINGS)


async def _pullable(http, node, repo: str, tag: str, image) -> bool:
    async with http.get(f"{node.url}/v2/{repo}/manifests/{tag}") as r:
        return r.status == 200 and await r.read() == image.manifest


def _wan_bytes(cluster: InProcessCluster, into: str, origin: str = "eastus",
               via: str | None = None) -> int:
    """Bytes on the links from ``into``'s nodes (or only ``via``) to ``origin``'s:
    what its subscriptions and fetches brought from there, and their requests."""
    return sum(link.bytes_forwarded for (src, dst), link in cluster.links.items()
               if cluster.nodes[src].region == into and cluster.nodes[dst].region == origin
               and via in (None, src))


async def _push_everywhere(cluster: InProcessCluster, http, repo: str, image,
                           regions=("westeurope", "southeastasia")) -> None:
    await push_image(http, cluster.nodes["eastus-1"].url, repo, image, tag="v1")
    for region in regions:
        for name in cluster.names_in(region):
            await eventually(lambda n=cluster.nodes[name]: _pullable(http, n, repo, "v1", image),
                             timeout=30, what=f"{repo}:v1 on {name}")


@in_module_loop
async def test_each_blob_crosses_into_a_zone_redundant_region_once(cluster, http):
    image = make_image([256 << 10] * 4, seed=31)
    blob_bytes = sum(len(b) for b in image.blobs)
    before = {region: _wan_bytes(cluster, region) for region in ("westeurope", "southeastasia")}
    per_zone = {name: _wan_bytes(cluster, "westeurope", via=name)
                for name in cluster.names_in("westeurope")}
    await _push_everywhere(cluster, http, "wancopy/once", image)
    crossed = _wan_bytes(cluster, "westeurope") - before["westeurope"]
    # Once, plus events and framing; a copy per zone would be three times the blobs.
    assert blob_bytes <= crossed < 1.5 * blob_bytes, (crossed, blob_bytes)
    # The layers crossed into different zones: no WAN stream carried the whole image.
    receivers = {name for name in cluster.names_in("westeurope")
                 if _wan_bytes(cluster, "westeurope", via=name) - per_zone[name] > 200 << 10}
    assert len(receivers) >= 2, receivers
    # A region of one node gets its one copy, as before.
    alone = _wan_bytes(cluster, "southeastasia") - before["southeastasia"]
    assert blob_bytes <= alone < 1.5 * blob_bytes, (alone, blob_bytes)


@in_module_loop
async def test_a_receiving_zone_cut_off_from_the_origin_passes_its_turn(cluster, http):
    image = make_image([192 << 10] * 3, seed=32)
    blob_bytes = sum(len(b) for b in image.blobs)
    layer = digest_of(image.layers[0])
    cut_off = f"westeurope-{wan_receiver(ZONES, layer)}"
    for origin in cluster.names_in("eastus"):
        cluster.links[(cut_off, origin)].cut()
        cluster.links[(origin, cut_off)].cut()
    try:
        # The origin passes the turn on once it sees the zone's stream gone.
        origin_service = cluster.nodes["eastus-1"].replication.service
        await eventually(lambda: not origin_service.streaming_to("westeurope", cut_off[-1]),
                         timeout=10, what=f"eastus-1 to see {cut_off}'s stream end")
        before = _wan_bytes(cluster, "westeurope")
        await _push_everywhere(cluster, http, "wancopy/turn", image, regions=("westeurope",))
        crossed = _wan_bytes(cluster, "westeurope") - before
        # Still once for the region: the next zone in the layer's rotation got it
        # with its event, and the cut-off zone got it from a sibling.
        assert blob_bytes <= crossed < 1.5 * blob_bytes, (crossed, blob_bytes)
        node = cluster.nodes[cut_off]
        async with http.get(f"{node.url}/v2/wancopy/turn/blobs/{layer}") as r:
            assert r.status == 200 and await r.read() == image.layers[0]
    finally:
        cluster.heal()
        await cluster.wait_ready()


@in_module_loop
async def test_a_receiving_zone_that_is_down_does_not_hold_its_region_back(cluster, http):
    image = make_image([160 << 10] * 3, seed=34)
    blob_bytes = sum(len(b) for b in image.blobs)
    down = f"westeurope-{wan_receiver(ZONES, digest_of(image.layers[0]))}"
    await cluster.stop(down)
    try:
        origin_service = cluster.nodes["eastus-1"].replication.service
        await eventually(lambda: not origin_service.streaming_to("westeurope", down[-1]),
                         timeout=10, what=f"eastus-1 to see {down}'s stream end")
        before = _wan_bytes(cluster, "westeurope")
        await push_image(http, cluster.nodes["eastus-1"].url, "wancopy/down", image, tag="v1")
        for name in cluster.names_in("westeurope"):
            if name != down:
                await eventually(lambda n=cluster.nodes[name]: _pullable(http, n, "wancopy/down",
                                                                         "v1", image),
                                 timeout=30, what=f"wancopy/down:v1 on {name}")
        # The next zone took the stopped one's turn: still one copy for the region.
        crossed = _wan_bytes(cluster, "westeurope") - before
        assert blob_bytes <= crossed < 1.5 * blob_bytes, (crossed, blob_bytes)
    finally:
        await cluster.restart(down)
        await cluster.wait_ready()
    await eventually(lambda: _pullable(http, cluster.nodes[down], "wancopy/down", "v1", image),
                     timeout=30, what=f"wancopy/down:v1 on {down}, back")


@in_module_loop
async def test_a_zone_catching_up_is_not_named_the_receiver(cluster, http):
    """A zone whose stream is connected but behind the head of the origin's log
    gets no bytes with events: the origin names the next zone at the head,
    which then has the layer with its event, and tells every zone so."""
    image = make_image([96 << 10] * 2, seed=35)
    layer = digest_of(image.layers[0])
    behind_zone = wan_receiver(ZONES, layer)
    behind = f"westeurope-{behind_zone}"
    nxt = cluster.nodes[f"westeurope-{wan_receiver(ZONES, layer, lambda z: z != behind_zone)}"]
    origin_service = cluster.nodes["eastus-1"].replication.service
    await cluster.stop(behind)
    with_event: list[str] = []      # complete holds on the next zone: bytes that came with events
    held = nxt.replication.transfer.held
    hold = held.hold
    held.hold = lambda digest, blob: (with_event.append(digest) if blob.complete else None,
                                      hold(digest, blob))
    stream = ("westeurope", behind_zone)
    try:
        await eventually(lambda: not origin_service.streaming_to(*stream),
                         timeout=10, what=f"eastus-1 to see {behind}'s stream end")
        # The zone's stream as the origin sees it while that zone catches up
        # from far behind: subscribed, its batches full, not at the head.
        origin_service._streams[stream] += 1
        await push_image(http, cluster.nodes["eastus-1"].url, "wancopy/behind", image, tag="v1")
        for name in cluster.names_in("westeurope"):
            if name != behind:
                await eventually(lambda n=cluster.nodes[name]: _pullable(
                    http, n, "wancopy/behind", "v1", image), timeout=30,
                    what=f"wancopy/behind:v1 on {name}")
        assert layer in with_event
    finally:
        del held.hold
        origin_service._streams[stream] -= 1
        if origin_service._streams[stream] <= 0:
            del origin_service._streams[stream]
        await cluster.restart(behind)
        await cluster.wait_ready()


@in_module_loop
async def test_a_blob_too_big_to_go_with_its_event_crosses_once(cluster, http):
    image = make_image([INLINE_BLOB_MAX + (64 << 10), 32 << 10], seed=33)
    blob_bytes = sum(len(b) for b in image.blobs)
    layer = digest_of(image.layers[0])
    # What the receiving zone holds for its siblings while it fetches (a record
    # of calls on the real object; it still holds them).
    held = cluster.nodes[f"westeurope-{wan_receiver(ZONES, layer)}"].replication.transfer.held
    growing: list[str] = []
    hold = held.hold
    held.hold = lambda digest, blob: (growing.append(digest) if not blob.complete else None,
                                      hold(digest, blob))
    before = _wan_bytes(cluster, "westeurope")
    try:
        await _push_everywhere(cluster, http, "wancopy/big", image, regions=("westeurope",))
    finally:
        del held.hold
    crossed = _wan_bytes(cluster, "westeurope") - before
    assert blob_bytes <= crossed < 1.5 * blob_bytes, (crossed, blob_bytes)
    # Its siblings could read the layer as it arrived, not once it was stored.
    assert growing == [layer]


def _client(node, requester_region: str, requester_zone: str = "") -> PeerClient:
    peer = Peer(name=node.name, region=node.region, zone=node.zone,
                grpc=f"127.0.0.1:{node.grpc_port}")
    return PeerClient(peer, NodeIdentity(region=requester_region, zone=requester_zone,
                                         node_id="test"))


async def _fetch(client: PeerClient, repo: str, digest: str, wait_ms: int, offset: int = 0) -> bytes:
    return b"".join([c async for c in client.fetch_blob(repo, digest, offset, wait_ms)])


@in_module_loop
async def test_held_bytes_are_served_before_they_are_stored_and_keep_residency(cluster):
    """Bytes that came with an event, held while the node stores them, go to a
    sibling that asks with a wait; only for the event's repository, and only
    where the event's origin may send them."""
    node = cluster.nodes["westeurope-2"]
    held = node.replication.transfer.held
    body = b"held, not yet stored" * 500
    digest = digest_of(body)
    sibling = _client(node, "westeurope", "1")
    outsider = _client(node, "eastus", "1")
    try:
        blob = HeldBlob(body, "wancopy/held", "westeurope")
        held.hold(digest, blob)
        try:
            assert not node.replication.replica.has_blob(digest)
            assert await _fetch(sibling, "wancopy/held", digest, 5000) == body
            assert await _fetch(sibling, "wancopy/held", digest, 5000, offset=100) == body[100:]
            # Another repository's request waits for the stored blob, which never comes.
            with pytest.raises(ReplicationError) as caught:
                await _fetch(sibling, "wancopy/other", digest, 300)
            assert caught.value.outcome is Outcome.PERMANENT and "NOT_FOUND" in caught.value.reason
        finally:
            held.release(digest, blob)
        confined = HeldBlob(body, "wancopy/held", "southeastasia")   # confined by default
        held.hold(digest, confined)
        try:
            with pytest.raises(ReplicationError) as caught:
                await _fetch(outsider, "wancopy/held", digest, 5000)
            assert "PERMISSION_DENIED" in caught.value.reason
        finally:
            held.release(digest, confined)
    finally:
        await sibling.close()
        await outsider.close()


@in_module_loop
async def test_a_receiving_zone_passes_bytes_on_as_they_arrive(cluster):
    """A blob the receiving zone is still fetching across the WAN: a sibling
    reads each part as it arrives, not once the whole blob is stored; a
    transfer that breaks off ends the sibling's read (it resumes elsewhere)."""
    node = cluster.nodes["westeurope-3"]
    held = node.replication.transfer.held
    parts = [b"first part " * 3000, b"second part " * 3000]
    digest = digest_of(b"".join(parts))
    sibling = _client(node, "westeurope", "1")
    growing = HeldBlob(None, "wancopy/growing", "eastus")
    held.hold(digest, growing)
    try:
        chunks = sibling.fetch_blob("wancopy/growing", digest, 0, 5000)
        reading = asyncio.ensure_future(anext(chunks))
        growing.append(parts[0])
        assert await asyncio.wait_for(reading, 30) == parts[0]   # before the rest exists
        growing.append(parts[1])
        growing.finish()
        assert b"".join([c async for c in chunks]) == parts[1]
        # From an offset, once whole.
        assert await _fetch(sibling, "wancopy/growing", digest, 5000, offset=5) == \
            b"".join(parts)[5:]
    finally:
        held.release(digest, growing)
    broken = HeldBlob(None, "wancopy/growing", "eastus")
    held.hold(digest, broken)
    try:
        chunks = sibling.fetch_blob("wancopy/growing", digest, 0, 5000)
        reading = asyncio.ensure_future(anext(chunks))
        broken.append(parts[0])
        assert await asyncio.wait_for(reading, 30) == parts[0]
        broken.fail()
        with pytest.raises(ReplicationError) as caught:
            await anext(chunks)
        assert "UNAVAILABLE" in caught.value.reason
    finally:
        held.release(digest, broken)
        await sibling.close()


@in_module_loop
async def test_a_sibling_waiting_on_held_bytes_it_cannot_use_does_not_spin(cluster):
    """Bytes held for a transfer that failed, or for another repository, are
    not a reason to look again: the wait goes on until an event is logged or
    new bytes are held, and new usable bytes end it."""
    node = cluster.nodes["westeurope-1"]
    service = node.replication.service
    held = node.replication.transfer.held
    body = b"held, but not for this" * 400
    digest = digest_of(body)
    sibling = _client(node, "westeurope", "2")
    looks = 0
    content_regions = service._content_regions

    def counted(repo: str, d: str) -> set[str]:   # the real lookup, counted
        nonlocal looks
        looks += d == digest
        return content_regions(repo, d)
    service._content_regions = counted
    try:
        failed = HeldBlob(None, "wancopy/spin", "eastus")
        held.hold(digest, failed)
        failed.append(body[:100])
        failed.fail()
        elsewhere = HeldBlob(body, "wancopy/elsewhere", "eastus")
        for unusable in (None, elsewhere):
            if unusable is not None:
                held.hold(digest, unusable)
            looks = 0
            with pytest.raises(ReplicationError) as caught:
                await _fetch(sibling, "wancopy/spin", digest, 500)
            assert "NOT_FOUND" in caught.value.reason
            # One look when asked and one per event logged meanwhile, not one
            # per turn of the event loop (thousands in half a second).
            assert looks < 25, looks
        # Usable bytes held during the wait end it.
        fetching = asyncio.ensure_future(_fetch(sibling, "wancopy/spin", digest, 5000))
        await eventually(lambda: looks >= 2, timeout=10, what="the fetch to wait")
        usable = HeldBlob(body, "wancopy/spin", "eastus")
        held.hold(digest, usable)
        assert await asyncio.wait_for(fetching, 30) == body
        held.release(digest, usable)
    finally:
        del service._content_regions
        held.release(digest, elsewhere)
        await sibling.close()


@in_module_loop
async def test_a_growing_held_blob_never_holds_more_than_its_size():
    holder = HeldBlobs()
    blob = HeldBlob(None, "r", "eastus")
    blob.expected = 10
    holder.hold("sha256:0a", blob)
    blob.append(b"12345678")
    blob.append(b"9abc")         # a source sending more than the blob: not the blob
    assert blob.failed and blob.size == 8
    assert holder.get("sha256:0a") is None     # failed: no longer held, for anyone
    with pytest.raises(HeldBroken):
        async for _ in blob.read(0):
            pass


@in_module_loop
async def test_a_tee_counts_against_the_budget_until_its_last_reader_is_done():
    holder = HeldBlobs(budget=100)
    first = holder.tee("sha256:01", "r", "eastus", 60)
    first.append(b"x" * 60)
    first.finish()
    reader = first.read(0)
    assert await anext(reader) == b"x" * 60
    holder.release("sha256:01", first)        # its transfer ended; a sibling still reads it
    assert holder.tee("sha256:02", "r", "eastus", 60) is None   # its bytes are still here
    await reader.aclose()
    second = holder.tee("sha256:02", "r", "eastus", 60)
    assert second is not None and holder.teeing == 60
    assert holder.tee("sha256:03", "r", "eastus", 41) is None
    holder.release("sha256:02", second)       # no reader: given back at once
    assert holder.teeing == 0


@in_module_loop
async def test_a_held_blob_reads_from_any_offset_as_it_grows():
    blob = HeldBlob(None, "r", "eastus")
    blob.append(b"abc")
    blob.append(b"defg")
    reader = blob.read(2)
    assert await anext(reader) == b"c"
    assert await anext(reader) == b"defg"
    later = asyncio.ensure_future(anext(reader))   # waits for more
    blob.append(b"hi")
    assert await later == b"hi"
    blob.finish()
    assert [c async for c in reader] == []
    assert [c async for c in blob.read(8)] == [b"i"]
    broken = HeldBlob(None, "r", "eastus")
    broken.fail()
    with pytest.raises(HeldBroken):
        await anext(broken.read(0))


def test_wan_receiver_spreads_digests_and_skips_unreachable_zones():
    digests = ["sha256:" + f"{n * 0x9e3779b1 % (1 << 32):08x}" + "0" * 56 for n in range(60)]
    picks = [wan_receiver(ZONES, d) for d in digests]
    assert set(picks) == set(ZONES)
    assert all(wan_receiver(("3", "1", "2"), d) == p for d, p in zip(digests, picks, strict=True))
    for digest, pick in zip(digests, picks, strict=True):
        others = [z for z in ZONES if z != pick]
        nxt = wan_receiver(ZONES, digest, lambda z, p=pick: z != p)
        assert nxt in others
        # The next in the rotation after the pick, the same for everyone.
        assert nxt == ZONES[(ZONES.index(pick) + 1) % 3]
        assert wan_receiver(ZONES, digest, lambda z: False) == pick
    assert wan_receiver((), digests[0]) == ""
