"""Replication completion (``replicator.completion``): what webhook delivery
asks a node through ``app[REPLICATION_COMPLETION]`` — has every replica
residency allows this image, or has one of them given up on it.

One in-process cluster for the module (real nodes, real gRPC, a real TCP link
for every ordered pair of nodes): eastus and brazilsouth with one node each,
westeurope zone redundant across three zones (write quorum 2). Anti-entropy
runs only on connect, so what arrives comes by the event path the tests
steer with their partitions.

* a push in eastus: complete, with each region's arrival as its nodes'
  per-image status reports it (westeurope: its second zone's), the same
  answer from any node;
* a push in brazilsouth (confined): complete once brazilsouth has it, other
  regions not waited for, even asked of a node that never gets it;
* one zone of westeurope cut off: still complete; two cut off: westeurope
  pending until the deadline (neither complete nor failed), complete after;
* nothing anywhere: the deadline, every region pending;
* the only copy of a layer corrupt: the regions that give up, with the reason;
* two waits on each of two dozen images: one call per node per round, not
  one per image, nor one per waiter;
* a bad question to ``GetImageStatuses`` is INVALID_ARGUMENT; a peer from
  before it is asked image by image.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import grpc
import pytest
import pytest_asyncio

from registry_node.app import REPLICATION_COMPLETION
from registry_node.records import NodeIdentity
from registry_node.webhooks import Completion
from replicator.completion import (
    Heard,
    ImageCompletion,
    NodeReport,
    ReplicaRegion,
    Standing,
    iso_time,
    region_standing,
    replica_regions,
    verdict,
)
from replicator.errors import Outcome, ReplicationError
from replicator.peers import PeerClient
from replicator.residency import ResidencyPolicy
from replicator.topology import ClusterView, Peer, ReplicationSettings, ZoneRedundancy
from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from .helpers import digest_of, eventually, push_image
from .replication_harness import InProcessCluster, module_cluster
from .replication_invariants import layered_image, metric_sum, metrics_text

in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOPOLOGY = [("eastus", ""), ("westeurope", "1"), ("westeurope", "2"), ("westeurope", "3"),
            ("brazilsouth", "")]
REGIONS = ("brazilsouth", "eastus", "westeurope")
WEST = ("westeurope-1", "westeurope-2", "westeurope-3")
SETTINGS = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0)
LONG = 30.0     # a deadline no passing test comes near


cluster, http = module_cluster("completion", TOPOLOGY, SETTINGS)


@pytest_asyncio.fixture(loop_scope="module")
async def healed(cluster):
    """Every link as it was, whatever the test cut."""
    yield
    cluster.heal()


def completion(cluster: InProcessCluster, name: str):
    """The node's completion, where webhook delivery finds it."""
    return cluster.nodes[name].runner.app[REPLICATION_COMPLETION]


def arrived(cluster: InProcessCluster, name: str, repo: str, digest: str) -> str | None:
    """When ``name`` stored the image, as its per-image status reports it."""
    state = cluster.nodes[name].replication.replica.image_state(repo, digest)
    return iso_time(state.arrived_ns) if state.present else None


@in_module_loop
async def test_complete_with_each_regions_arrival_from_any_node(cluster, http, healed):
    image = layered_image(random.Random(1), False)
    await push_image(http, cluster.nodes["eastus"].url, "done/web", image, tag="v1")
    answer = await completion(cluster, "eastus").wait("done/web", image.digest, deadline_s=LONG)
    assert answer.complete and not answer.failures and answer.pending == (), answer
    assert set(answer.arrivals) == set(REGIONS)
    assert answer.arrivals["eastus"] == arrived(cluster, "eastus", "done/web", image.digest)
    assert answer.arrivals["brazilsouth"] == arrived(cluster, "brazilsouth", "done/web",
                                                     image.digest)
    # westeurope holds it once two of its three zones do: the second arrival.
    await eventually(lambda: all(arrived(cluster, n, "done/web", image.digest) for n in WEST),
                     timeout=LONG, what="every westeurope zone")
    zones = sorted(arrived(cluster, n, "done/web", image.digest) for n in WEST)
    assert answer.arrivals["westeurope"] == zones[1], (answer.arrivals, zones)
    assert answer.arrivals["eastus"] <= min(answer.arrivals.values())
    # Asked of another node, later: the same answer (it comes from what nodes stored).
    again = await completion(cluster, "westeurope-2").wait("done/web", image.digest,
                                                           deadline_s=LONG)
    assert again == answer


@in_module_loop
async def test_a_confined_regions_image_is_waited_for_there_alone(cluster, http, healed):
    image = layered_image(random.Random(2), True)
    await push_image(http, cluster.nodes["brazilsouth"].url, "br/payroll", image, tag="v1")
    # Asked of a node that never gets it: brazilsouth's holding is all there is to wait for.
    answer = await completion(cluster, "westeurope-1").wait("br/payroll", image.digest,
                                                            deadline_s=LONG)
    assert answer.complete and answer.pending == () and not answer.failures, answer
    assert answer.arrivals == {"brazilsouth": arrived(cluster, "brazilsouth", "br/payroll",
                                                      image.digest)}
    assert arrived(cluster, "westeurope-1", "br/payroll", image.digest) is None


@in_module_loop
async def test_a_zone_redundant_region_holds_an_image_at_its_write_quorum(cluster, http, healed):
    # One zone cut off: the other two are a quorum.
    cluster.isolate("westeurope-3")
    image = layered_image(random.Random(3), False)
    await push_image(http, cluster.nodes["eastus"].url, "done/zones", image, tag="v1")
    answer = await completion(cluster, "eastus").wait("done/zones", image.digest, deadline_s=LONG)
    assert answer.complete and set(answer.arrivals) == set(REGIONS), answer
    assert answer.arrivals["westeurope"] == max(
        arrived(cluster, n, "done/zones", image.digest) for n in WEST[:2])
    cluster.heal()

    # Two cut off: westeurope-1 alone has it, which is not the region holding it.
    for name in WEST[1:]:
        cluster.isolate(name)
    second = layered_image(random.Random(4), False)
    await push_image(http, cluster.nodes["eastus"].url, "done/zones", second, tag="v2")
    await eventually(lambda: arrived(cluster, "westeurope-1", "done/zones", second.digest),
                     timeout=LONG, what="westeurope-1 to have the image")
    await eventually(lambda: arrived(cluster, "brazilsouth", "done/zones", second.digest),
                     timeout=LONG, what="brazilsouth to have the image")
    answer = await completion(cluster, "eastus").wait("done/zones", second.digest, deadline_s=1.0)
    assert not answer.complete and not answer.failures, answer
    assert answer.pending == ("westeurope",) and set(answer.arrivals) == {"eastus", "brazilsouth"}
    cluster.heal()
    answer = await completion(cluster, "eastus").wait("done/zones", second.digest, deadline_s=LONG)
    assert answer.complete and set(answer.arrivals) == set(REGIONS), answer


@in_module_loop
async def test_an_image_nobody_has_waits_out_its_deadline(cluster):
    digest = digest_of(b"never pushed")
    answer = await completion(cluster, "eastus").wait("nowhere/app", digest, deadline_s=0.5)
    assert not answer.complete and not answer.failures and not answer.arrivals
    assert answer.pending == REGIONS, answer
    with pytest.raises(ValueError):
        await completion(cluster, "eastus").wait("Not A Repo", digest, deadline_s=0.5)


@in_module_loop
async def test_a_region_that_gives_up_is_a_failure_with_its_reason(cluster, http, healed):
    """The only copy of a layer rots at the origin before any replica fetched it:
    FetchBlob answers DATA_LOSS, and the replicas record that they gave up."""
    for region in ("westeurope", "brazilsouth"):
        cluster.partition(region, "eastus", one_way=True)   # nobody fetches from eastus yet
    image = layered_image(random.Random(5), False, layers=1)
    east = cluster.nodes["eastus"]
    await push_image(http, east.url, "done/rot", image, tag="v1")
    path = east.registry.blobs.path(digest_of(image.layers[0]))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    cluster.heal()
    answer = await completion(cluster, "eastus").wait("done/rot", image.digest, deadline_s=LONG)
    assert not answer.complete and answer.failures, answer
    assert set(answer.failures) <= {"westeurope", "brazilsouth"}, answer
    # Each with the reason its nodes' per-image status gives (the last source
    # tried: a sibling or brazilsouth may answer last that it has nothing either).
    for region, reason in answer.failures.items():
        recorded = {cluster.nodes[n].replication.replica.failure("done/rot", image.digest)
                    for n in cluster.names_in(region)}
        assert reason in {f.reason for f in recorded if f is not None}, (region, reason)
    assert "eastus" in answer.arrivals


@in_module_loop
async def test_many_waits_share_one_call_per_node_and_round(cluster, http, healed):
    metrics = aiohttp.ClientSession()
    east = cluster.nodes["eastus"]

    async def asked(peer: str, what: str) -> float:
        text = await metrics_text(metrics, east)
        if what == "images":
            return metric_sum(text, "georeg_replication_completion_images_asked_total", peer=peer)
        return metric_sum(text, "georeg_replication_completion_requests_total", peer=peer,
                          call=what)

    try:
        # westeurope can be asked but cannot fetch: every image stays pending there.
        cluster.partition("westeurope", "eastus", one_way=True)
        cluster.partition("westeurope", "brazilsouth", one_way=True)
        rng = random.Random(6)
        images = [layered_image(rng, False, layers=1) for _ in range(24)]
        for n, image in enumerate(images):
            await push_image(http, east.url, "done/many", image, tag=f"v{n}")
        before = {n: (await asked(n, "batch"), await asked(n, "images")) for n in WEST}
        home = completion(cluster, "eastus")
        waits = [asyncio.ensure_future(home.wait("done/many", image.digest, deadline_s=LONG))
                 for image in images for _ in range(2)]
        await asyncio.sleep(0)                 # every wait has begun
        assert home.waiting == len(images)     # two waiters of an image share its answers

        async def rounds_ran() -> bool:
            return all([await asked(n, "batch") - before[n][0] >= 2 for n in WEST])

        await eventually(rounds_ran, timeout=LONG, what="two rounds to every westeurope zone")
        for name in WEST:
            # Every round so far asked all the images, in one call.
            calls = await asked(name, "batch") - before[name][0]
            assert await asked(name, "images") - before[name][1] == len(images) * calls, name
        cluster.heal()
        answers = await asyncio.gather(*waits)
        assert all(a.complete and set(a.arrivals) == set(REGIONS) for a in answers), answers
        for name in WEST:
            # As the images arrive, each is asked as its zone is seen to hold it:
            # still fewer calls than images asked, and never one per image.
            calls = await asked(name, "batch") - before[name][0]
            assert await asked(name, "images") - before[name][1] > calls
            assert await asked(name, "single") == 0
        assert home.waiting == 0
        text = await metrics_text(metrics, east)
        assert metric_sum(text, "georeg_replication_completion_waiting") == 0
    finally:
        await metrics.close()


@in_module_loop
async def test_batched_status_refuses_bad_questions_with_invalid_argument(cluster):
    client = next(c for c in cluster.nodes["westeurope-1"].replication.clients
                  if c.name == "eastus")
    good = ("done/web", digest_of(b"anything"))
    for images in ([good, ("Not A Repo", good[1])], [good, ("done/web", "sha256:short")],
                   [good] * 1001):
        with pytest.raises(ReplicationError) as refused:
            await client.image_statuses(images, 5.0)
        assert refused.value.outcome is Outcome.PERMANENT
        assert "INVALID_ARGUMENT" in refused.value.reason, refused.value.reason
    assert client.statuses_batched          # refused, not unknown: still asked in one call
    assert [r.present for r in await client.image_statuses([good] * 1000, 5.0)] == [False] * 1000


class _OldPeer(pbg.ReplicationServicer):
    """A node from before GetImageStatuses: it knows one image, by digest."""

    def __init__(self, repository: str, digest: str) -> None:
        self.image = (repository, digest)
        self.asked = 0

    async def GetImageStatus(self, request, context):
        self.asked += 1
        present = (request.repository, request.digest) == self.image
        return pb.ImageStatusReply(digest=request.digest, present=present,
                                   arrived_ns=1_000_000_000 if present else 0,
                                   origin_region="eastus" if present else "")


async def test_a_peer_from_before_batched_status_is_asked_image_by_image():
    known = digest_of(b"known")
    old = _OldPeer("old/app", known)
    server = grpc.aio.server()
    pbg.add_ReplicationServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = PeerClient(Peer(name="old", region="eastus", grpc=f"127.0.0.1:{port}"),
                        NodeIdentity("westeurope", "", "me"))
    try:
        images = [("old/app", known), ("old/app", digest_of(b"unknown"))]
        replies = await client.hurried().image_statuses(images, 5.0)
        assert [r.present for r in replies] == [True, False]
        assert replies[0].arrived_ns == 1_000_000_000 and replies[0].origin_region == "eastus"
        assert not client.statuses_batched and old.asked == 2
        # Remembered: the next question goes image by image at once.
        replies = await client.image_statuses(images[:1], 5.0)
        assert replies[0].present and old.asked == 3
    finally:
        await client.close()
        await server.stop(None)


# -- the rules, without a cluster ------------------------------------------------------


def _region(name: str, nodes: tuple[str, ...], quorum: int = 1) -> ReplicaRegion:
    return ReplicaRegion(name, nodes, len(nodes), quorum)


def test_the_regions_and_their_quorums_come_from_the_view():
    view = ClusterView(
        name="eastus-1", region="eastus", zone="1",
        peers=(Peer("eastus-2", "eastus", "2"), Peer("westeurope-1", "westeurope", "1"),
               Peer("westeurope-3", "westeurope", "3"), Peer("brazilsouth", "brazilsouth")),
        zone_redundancy=ZoneRedundancy(True, ("1", "2", "3"), 2),
        remote_zones={"westeurope": ("1", "2", "3")})
    regions = {r.name: r for r in replica_regions(view)}
    # A zone missing from the peers still counts toward its region's size.
    assert regions["eastus"] == ReplicaRegion("eastus", ("eastus-1", "eastus-2"), 3, 2)
    assert regions["westeurope"] == ReplicaRegion("westeurope", ("westeurope-1", "westeurope-3"),
                                                  3, 2)
    assert regions["brazilsouth"] == ReplicaRegion("brazilsouth", ("brazilsouth",), 1, 1)


def test_a_zone_redundant_region_gives_up_only_when_its_quorum_cannot_be_met():
    west = _region("westeurope", ("w1", "w2", "w3"), quorum=2)
    heard = Heard()
    heard.answered("w1", NodeReport(False, failure="DATA_LOSS"), 10)
    assert region_standing(west, heard) == Standing()          # two zones may still get it
    heard.answered("w2", NodeReport(False, failure="NOT_FOUND"), 10)
    assert region_standing(west, heard).failure == "DATA_LOSS"
    single = _region("brazilsouth", ("b",))
    heard.answered("b", NodeReport(False, failure="gone"), 10)
    assert region_standing(single, heard).failure == "gone"
    heard.silent("b")                                        # unreachable: pending, not failed
    assert region_standing(single, heard) == Standing()


def test_a_regions_arrival_waits_for_zones_that_said_no_too_early():
    west = _region("westeurope", ("w1", "w2", "w3"), quorum=2)
    heard = Heard()
    heard.answered("w1", NodeReport(True, arrived_ns=100, origin_region="westeurope"), 90)
    heard.answered("w2", NodeReport(True, arrived_ns=200, origin_region="westeurope"), 250)
    heard.answered("w3", NodeReport(False), 150)     # asked before the second arrival
    standing = region_standing(west, heard)
    assert standing.holds and standing.arrived_ns == 200 and standing.unsure == ("w3",)
    found = verdict("app", (west,), ResidencyPolicy(), heard)
    assert found.completion.complete and not found.settled and found.unsure == {"w3"}
    heard.answered("w3", NodeReport(True, arrived_ns=160, origin_region="westeurope"),
                   300)                                     # it had it before w2 did
    standing = region_standing(west, heard)
    assert standing.holds and standing.arrived_ns == 160 and standing.unsure == ()
    assert verdict("app", (west,), ResidencyPolicy(), heard).settled
    # A no asked after the quorum's arrival is sure; an unreachable zone cannot be asked.
    heard.answered("w3", NodeReport(False), 250)
    assert region_standing(west, heard).unsure == ()


def test_a_confined_origin_leaves_the_other_regions_out():
    regions = (_region("brazilsouth", ("b",)), _region("eastus", ("e",)))
    heard = Heard()
    heard.answered("b", NodeReport(True, arrived_ns=5, origin_region="brazilsouth"), 6)
    found = verdict("app", regions, ResidencyPolicy(), heard)
    assert found.settled and found.completion == Completion(True, {"brazilsouth": iso_time(5)})
    # Content from eastus goes everywhere, brazilsouth included.
    heard = Heard()
    heard.answered("e", NodeReport(True, arrived_ns=5, origin_region="eastus"), 6)
    found = verdict("app", regions, ResidencyPolicy(), heard)
    assert not found.settled and found.completion.pending == ("brazilsouth",)
    assert found.open_nodes == {"b"}


async def test_a_node_seen_to_hold_the_image_is_asked_at_once_not_at_its_backoff():
    """Injected transport: one region of one node, asked every 60 s at most;
    ``held`` (a manifest_put on its stream) brings the question forward."""
    has = set()
    asked = []

    async def ask(node, images):
        asked.append(len(images))
        return [NodeReport(key in has, arrived_ns=7 if key in has else 0, origin_region="eastus")
                for key in images]

    digest = digest_of(b"image")
    completion = ImageCompletion(lambda: (_region("eastus", ("e",)),), ResidencyPolicy(), ask,
                                 round_interval_s=0.01, max_interval_s=60.0)
    first = asyncio.ensure_future(completion.wait("app", digest, deadline_s=30.0))
    await eventually(lambda: len(asked) >= 2, what="two rounds")
    due = completion._rounds["e"].due[("app", digest)]
    await eventually(lambda: due.interval >= 0.4, what="the interval to grow")
    # A second waiter whose deadline comes well before the next round the
    # backoff would run: only the hint can answer it in time.
    assert due.at - asyncio.get_running_loop().time() >= 0.2
    has.add(("app", digest))
    completion.held("e", "app", digest)
    answer = await completion.wait("app", digest, deadline_s=0.2)
    assert answer.complete and answer.arrivals == {"eastus": iso_time(7)}, answer
    assert (await first) == answer
    await completion.close()
