"""Multi-node replication through real gRPC and real TCP links, in one process."""

from __future__ import annotations

import json

import aiohttp
import msgspec
import pytest

from cluster.network.links import LinkFaults
from registry_node import hlc, keys
from registry_node.records import EventKind
from replicator.topology import ReplicationSettings

from .helpers import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    digest_of,
    eventually,
    make_image,
    push_blob,
    push_image,
)
from .replication_harness import InProcessCluster
from .replication_invariants import writes_since

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"), ("westeurope", ""),
            ("brazilsouth", "")]


@pytest.fixture
async def cluster(tmp_path):
    async with InProcessCluster(tmp_path, TOPOLOGY) as c:
        yield c


async def manifest_status(session: aiohttp.ClientSession, url: str, repo: str, ref: str) -> int:
    async with session.get(f"{url}/v2/{repo}/manifests/{ref}") as r:
        return r.status


async def test_push_in_one_region_is_pullable_everywhere(cluster, http):
    image = make_image([1 << 20, 1 << 20, 1 << 20], seed=1)
    origin = cluster.nodes["eastus-1"]
    digest = await push_image(http, origin.url, "app/web", image, tag="v1")
    for node in cluster.nodes.values():
        await eventually(lambda n=node: _pullable(http, n.url, "app/web", "v1", image),
                         timeout=15, what=f"v1 on {node.name}")
    # Every blob arrived intact and the manifest is the same bytes everywhere.
    for node in cluster.nodes.values():
        for blob in image.blobs:
            async with http.get(f"{node.url}/v2/app/web/blobs/{digest_of(blob)}") as r:
                assert r.status == 200 and await r.read() == blob
        async with http.head(f"{node.url}/v2/app/web/manifests/v1") as r:
            assert r.headers["Docker-Content-Digest"] == digest


async def _pullable(http, url, repo, tag, image) -> bool:
    async with http.get(f"{url}/v2/{repo}/manifests/{tag}") as r:
        return r.status == 200 and await r.read() == image.manifest


async def test_confined_region_content_stays_home(cluster, http):
    image = make_image([4096], seed=2)
    brazil = cluster.nodes["brazilsouth"]
    await push_image(http, brazil.url, "br/app", image, tag="v1")
    # A later push elsewhere is a marker that replication has flowed past it.
    marker = make_image([100], seed=3)
    await push_image(http, brazil.url, "shared/marker", make_image([50], seed=4), tag="v1")
    await push_image(http, cluster.nodes["westeurope"].url, "we/marker", marker, tag="v1")
    await eventually(lambda: _pullable(http, brazil.url, "we/marker", "v1", marker),
                     timeout=15, what="westeurope content in brazilsouth")
    for node in cluster.nodes.values():
        if node.region == "brazilsouth":
            continue
        assert await manifest_status(http, node.url, "br/app", "v1") == 404
        assert not node.registry.meta.has_prefix(keys.repo_prefix("br/app"))
    # The same manifest PUT outside Brazil South (a client failed over there)
    # misses its blobs and is refused; no peer is asked for confined content,
    # and no inbound transfer (its key, file or handle) is left naming it.
    eastus = cluster.nodes["eastus-1"]
    async with http.put(f"{eastus.url}/v2/br/app/manifests/v1", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status == 400 and (await r.json())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    for blob in image.blobs:
        assert eastus.registry.meta.get(keys.transfer(digest_of(blob))) is None
    assert not eastus.replication.transfer._inbound


async def test_zone_quorum_through_one_and_two_zone_outages(cluster, http):
    zone1 = cluster.nodes["eastus-1"]
    await eventually(lambda: zone1.replication.quorum.writable, timeout=10, what="zone peers")
    await cluster.crash("eastus-3")
    image = make_image([2048], seed=5)
    await push_image(http, zone1.url, "zr/app", image, tag="v1")   # 2 of 3 zones: accepted
    # The acknowledged write is already durable in zone 2.
    assert await manifest_status(http, cluster.nodes["eastus-2"].url, "zr/app", "v1") == 200
    await cluster.crash("eastus-2")
    await eventually(lambda: not zone1.replication.quorum.writable, timeout=10,
                     what="zone 1 noticing it is alone")
    async with http.post(f"{zone1.url}/v2/zr/app/blobs/uploads/",
                         params={"digest": digest_of(b"x")}, data=b"x") as r:
        assert r.status == 503
        body = await r.json()
        assert body["errors"][0]["code"] == "UNAVAILABLE"
        assert "zones" in body["errors"][0]["detail"]["reason"]
        assert body["errors"][0]["detail"]["outcome"] == "definite"   # refused before anything
    assert await manifest_status(http, zone1.url, "zr/app", "v1") == 200  # reads go on
    await cluster.restart("eastus-2")
    await cluster.restart("eastus-3")
    await eventually(lambda: zone1.replication.quorum.writable, timeout=15, what="quorum back")
    image2 = make_image([1024], seed=6)
    await push_image(http, zone1.url, "zr/app", image2, tag="v2")
    await eventually(lambda: _pullable(http, cluster.nodes["eastus-3"].url, "zr/app", "v2", image2),
                     timeout=15, what="returning zone catching up")


async def test_a_zone_missing_from_the_view_still_counts_toward_the_quorum(cluster, http):
    """The plan, not the peer list, says which zones a write needs: eastus-1's
    view lacks zone 3's entry (as a view mid-way through a replica change
    might), yet zone 3 — subscribed to it and acknowledging — confirms its
    writes while zone 2 is down."""
    zone1 = cluster.nodes["eastus-1"]
    await cluster.crash("eastus-1")
    zone1.view = msgspec.structs.replace(
        zone1.view, peers=tuple(p for p in zone1.view.peers if p.name != "eastus-3"))
    await cluster.restart("eastus-1")
    await cluster.crash("eastus-2")
    quorum = cluster.nodes["eastus-1"].replication.quorum
    assert quorum.zone_peers == {"eastus/2", "eastus/3"}
    await eventually(lambda: quorum.live_peers == {"eastus/3"}, timeout=10,
                     what="zone 3 subscribed to zone 1")
    image = make_image([1500], seed=15)
    await push_image(http, zone1.url, "zr/missing", image, tag="v1")   # zones 1 and 3: accepted
    assert await manifest_status(http, cluster.nodes["eastus-3"].url, "zr/missing", "v1") == 200


async def test_transitive_propagation_through_a_partition(cluster, http):
    cluster.partition("westeurope", "eastus")   # westeurope only reaches brazilsouth
    image = make_image([1000], seed=7)
    await push_image(http, cluster.nodes["westeurope"].url, "we/app", image, tag="v1")
    await eventually(lambda: _pullable(http, cluster.nodes["eastus-2"].url, "we/app", "v1", image),
                     timeout=20, what="westeurope push reaching eastus through brazilsouth")


@pytest.mark.parametrize("clocks", ["running", "tied"])
async def test_concurrent_pushes_of_one_tag_converge_to_the_last_writer(cluster, http, clocks):
    """Two regions cut apart both push ``race/app:latest``. After healing, every
    replica serves the write that last-writer-wins names: the larger HLC stamp
    — or, when the HLCs tie, the deterministic tie-break on the origin
    (region, then zone). With tied clocks westeurope pushes first and East US
    second, so neither arrival order nor wall time can pass for the rule."""
    east, west = cluster.nodes["eastus-1"], cluster.nodes["westeurope"]
    cluster.partition("westeurope", "eastus")
    cluster.partition("westeurope", "brazilsouth")
    if clocks == "tied":
        # Both clocks frozen one millisecond past now and every stamp issued so
        # far: the same operations then draw the same stamps on both nodes.
        frozen = max(hlc.wall_ms_now(),
                     *(hlc.unpack(n.registry.hlc.last)[0] for n in cluster.running())) + 1
        for node in (east, west):
            node.registry.hlc = hlc.HybridLogicalClock(lambda: frozen, last=hlc.pack(frozen, 0))
    pushes = [(east, make_image([300], seed=8)), (west, make_image([301], seed=9))]
    if clocks == "tied":
        pushes.reverse()
    writes = []
    for node, image in pushes:
        before = node.registry.meta.last_seq
        await push_image(http, node.url, "race/app", image, tag="latest")
        writes += writes_since(node, before, {EventKind.TAG_SET}, "race/app")
    assert len(writes) == 2, writes
    if clocks == "tied":
        assert writes[0].stamp[0] == writes[1].stamp[0], f"the HLCs did not tie: {writes}"
    winner = max(writes, key=lambda w: w.stamp)
    if clocks == "tied":   # ("westeurope" > "eastus"): the first push wins the tie
        assert winner.digest == pushes[0][1].digest
    cluster.heal()
    last: dict[str, dict[str, str]] = {}

    async def everywhere_the_winner() -> bool:
        for n in cluster.running():
            last[n.name] = await cluster.tags(http, n, "race/app")
        return all(tags == {"latest": winner.digest} for tags in last.values())

    try:
        await eventually(everywhere_the_winner, timeout=20, what="the last writer everywhere")
    except AssertionError:
        raise AssertionError(f"last writer {winner}; replicas serve {last}") from None


async def test_deletes_replicate_and_are_not_undone(cluster, http):
    image = make_image([500], seed=10)
    origin = cluster.nodes["westeurope"]
    digest = await push_image(http, origin.url, "del/app", image, tag="v1")
    for node in cluster.nodes.values():
        await eventually(lambda n=node: _pullable(http, n.url, "del/app", "v1", image), timeout=15)
    async with http.delete(f"{cluster.nodes['eastus-2'].url}/v2/del/app/manifests/{digest}") as r:
        assert r.status == 202
    for node in cluster.nodes.values():
        await eventually(lambda n=node: _gone(http, n.url, "del/app", digest), timeout=15,
                         what=f"delete reaching {node.name}")


async def _gone(http, url, repo, digest) -> bool:
    return await manifest_status(http, url, repo, digest) == 404


def slow_links_from(cluster: InProcessCluster, region: str, ms: float) -> None:
    """Every link from ``region``'s nodes gets ``ms`` of extra one-way latency."""
    for (src, _), link in cluster.links.items():
        if cluster.nodes[src].region == region:
            link.set_faults(LinkFaults(extra_latency_ms=ms))


@pytest.fixture
async def lagging_cluster(tmp_path):
    """The cluster, but westeurope gets nothing unless it asks: its subscriptions
    are ended (its peer clients stay) and anti-entropy never runs. What a pull
    or a manifest PUT there needs that it lacks, it can only fetch from a peer,
    however slow or fast the machine: no race with live replication."""
    c = await InProcessCluster(tmp_path, TOPOLOGY, settings=ReplicationSettings(
        anti_entropy_interval_s=3600, quorum_timeout_s=5.0)).start()
    try:
        await c.wait_ready()
        replication = c.nodes["westeurope"].replication
        for task in replication._tasks.values():    # the subscriptions, by peer
            task.cancel()
        yield c
    finally:
        await c.close()


async def test_pull_right_after_a_push_elsewhere_is_served_not_404(lagging_cluster, http):
    """Bounded staleness: a replica that lacks a just-pushed image fetches it from
    a peer instead of answering 404."""
    cluster = lagging_cluster
    image = make_image([2000, 3000], seed=11)
    await push_image(http, cluster.nodes["eastus-1"].url, "fresh/app", image, tag="v1")
    assert await _pullable(http, cluster.nodes["westeurope"].url, "fresh/app", "v1", image)
    assert cluster.nodes["westeurope"].replication.rescue.rescued >= 1


async def test_an_index_naming_what_no_peer_has_is_refused_promptly_with_a_zone_down(
        cluster, http):
    """The rescue asks every peer for the missing child. One zone is down: its
    channel must cost a refused connect, not its RPC timeout per attempt (a
    PUT waited 60 s so before), and the client gets MANIFEST_BLOB_UNKNOWN."""
    await cluster.crash("eastus-3")
    dead_zone = next(c for c in cluster.nodes["westeurope"].replication.clients
                     if c.name == "eastus-3")
    dead_zone.stub = calls = RecordingStub(dead_zone.stub)
    child = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(b"{}"),
                                   "size": 2}}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest_of(child), "size": len(child)}]}).encode()

    async def put() -> tuple[int, dict]:
        async with http.put(f"{cluster.nodes['westeurope'].url}/v2/lonely/app/manifests/v1",
                            data=index, headers={"Content-Type": OCI_INDEX}) as r:
            return r.status, await r.json()

    status, body = await put()
    assert status == 400 and body["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    # The rescue asked the dead zone, and none of its calls waited for the
    # channel to come back (that is what cost 4 attempts x 10 s before). The
    # subscription's own resubscribe waits for the zone, as it should.
    rescue = [(rpc, waits) for rpc, waits in calls.made if rpc != "Subscribe"]
    assert rescue, "the rescue never asked eastus-3"
    assert [(rpc, waits) for rpc, waits in rescue if waits] == []


class RecordingStub:
    """A peer's gRPC stub that notes, for every call made through it, the method
    and whether the call waits for the channel to be ready, then makes it."""

    def __init__(self, stub) -> None:
        self._stub = stub
        self.made: list[tuple[str, bool]] = []

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            self.made.append((name, bool(kwargs.get("wait_for_ready"))))
            return method(*args, **kwargs)
        return call


async def test_manifest_push_finds_layers_that_went_to_another_replica(lagging_cluster, http):
    """Layers uploaded through eastus, the manifest right after through westeurope
    (routing moved): no MANIFEST_BLOB_UNKNOWN, the layers are fetched."""
    cluster = lagging_cluster
    image = make_image([4000, 5000], seed=12)
    for blob in image.blobs:
        await push_blob(http, cluster.nodes["eastus-2"].url, "moved/app", blob)
    async with http.put(f"{cluster.nodes['westeurope'].url}/v2/moved/app/manifests/v1",
                        data=image.manifest, headers={"Content-Type": image.media_type}) as r:
        assert r.status == 201, await r.text()
    assert cluster.nodes["westeurope"].replication.rescue.rescued >= 1
    assert await _pullable(http, cluster.nodes["westeurope"].url, "moved/app", "v1", image)


class LookupsTo:
    """The status lookups (``GetImageStatus``) one node sends one peer, counted
    as they start and as they end (answered, refused or given up): the real
    calls, only watched."""

    def __init__(self, node, peer: str) -> None:
        client = next(c for c in node.replication.clients if c.name == peer)
        self.started = self.ended = 0
        send = client.stub.GetImageStatus

        async def counted(*args, **kwargs):
            self.started += 1
            try:
                return await send(*args, **kwargs)
            finally:
                self.ended += 1

        client.stub.GetImageStatus = counted     # shared by the client's hurried copies

    @property
    def in_flight(self) -> int:
        return self.started - self.ended


async def _status(http, method: str, url: str) -> int:
    async with http.request(method, url) as r:
        await r.read()
        return r.status


@pytest.mark.parametrize("method, reference", [
    ("HEAD", "never-pushed"), ("GET", "never-pushed"),
    ("GET", digest_of(b"a manifest nobody pushed"))])
async def test_a_missing_manifest_is_answered_without_waiting_for_a_stalled_peer(
        cluster, http, method, reference):
    """A 404 for a manifest that exists nowhere, with one peer behind a stalled
    link (its connection open, nothing delivered): the first lookup to it runs
    out (the lookup timeout), and from then on every 404 is answered while the
    lookup to that peer is still in flight: nobody waits for it any more."""
    west = cluster.nodes["westeurope"]
    stalled = LookupsTo(west, "eastus-1")
    cluster.links[("westeurope", "eastus-1")].set_faults(LinkFaults(stall=True))
    url = f"{west.url}/v2/absent/app/manifests/{reference}"
    assert await _status(http, method, url) == 404      # waits for eastus-1, once
    for _ in range(3):
        assert await _status(http, method, url) == 404
        # Exactly one: not waited for, and not asked again while a lookup is out.
        assert stalled.in_flight == 1, "the 404 waited for the stalled peer"
    rescue = west.replication.rescue
    assert rescue.is_silent("eastus-1")
    assert rescue.last_round.not_waited_for == ["eastus-1"]
    assert rescue.not_waited_for["eastus-1"] == 3


async def test_a_stalled_peer_is_waited_for_again_once_it_answers(cluster, http):
    """Silence lasts until something arrives from the peer: after the link
    heals, the next round's lookup to it is answered, and the rounds after it
    wait for it again (content only it holds is found again)."""
    west = cluster.nodes["westeurope"]
    link = cluster.links[("westeurope", "eastus-1")]
    link.set_faults(LinkFaults(stall=True))
    url = f"{west.url}/v2/absent/app/manifests/never-pushed"
    assert await _status(http, "HEAD", url) == 404
    assert west.replication.rescue.is_silent("eastus-1")
    link.heal()

    async def waited_for_again() -> bool:
        await _status(http, "HEAD", url)
        return "eastus-1" in west.replication.rescue.last_round.waited_for

    await eventually(waited_for_again, timeout=15, what="eastus-1 waited for again")
    assert not west.replication.rescue.is_silent("eastus-1")


async def test_a_push_elsewhere_is_still_rescued_while_a_peer_is_silent(cluster, http):
    """Bounded staleness with a silent peer about: an image pushed to eastus-2,
    whose stream to westeurope is behind (150 ms more each way), is fetched on
    the first pull, by digest and by tag, while eastus-1 sits behind a stalled
    link and is not waited for."""
    west = cluster.nodes["westeurope"]
    cluster.links[("westeurope", "eastus-1")].set_faults(LinkFaults(stall=True))
    assert await _status(http, "HEAD", f"{west.url}/v2/absent/app/manifests/v0") == 404
    assert west.replication.rescue.is_silent("eastus-1")
    for (src, dst), link in cluster.links.items():
        if src == "westeurope" and dst != "eastus-1":
            link.set_faults(LinkFaults(extra_latency_ms=150))
    rescue = west.replication.rescue
    by_tag, by_digest = make_image([2000, 3000], seed=13), make_image([2500], seed=14)
    await push_image(http, cluster.nodes["eastus-2"].url, "fresh/app", by_tag, tag="v1")
    assert await _pullable(http, west.url, "fresh/app", "v1", by_tag)
    assert rescue.rescued == 1 and rescue.last_round.not_waited_for == ["eastus-1"]
    digest = await push_image(http, cluster.nodes["eastus-2"].url, "fresh/app", by_digest,
                              tag="v2")
    async with http.get(f"{west.url}/v2/fresh/app/manifests/{digest}") as r:
        assert r.status == 200 and await r.read() == by_digest.manifest
    assert rescue.rescued == 2 and rescue.last_round.not_waited_for == ["eastus-1"]
    for blob in (*by_tag.blobs, *by_digest.blobs):
        async with http.get(f"{west.url}/v2/fresh/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob
