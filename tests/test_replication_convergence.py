"""Acceptance test 1 of replication: a seeded random workload over three
regions converges, residency holds in the API and on disk, and applying
anything twice is a no-op. Plus regressions found on the way.

The cluster is real (``InProcessCluster``): eastus zone-redundant (three zone
nodes), westeurope, and brazilsouth, confined by default residency. Every
random choice comes from one ``random.Random(seed)``; the seed is printed, and
``GEOREG_CONVERGENCE_SEED=<seed>`` replays the same workload (timing still
varies: the cluster is real).
"""

from __future__ import annotations

import asyncio
import os
import random

import aiohttp
import msgspec
import pytest

from cluster.network.links import LinkFaults
from registry_node import fingerprints, keys
from registry_node.hlc import unpack, wall_ms_now
from registry_node.metastore import Batch, MetadataStore
from registry_node.records import Cursor, EventKind, TagRecord, decode, encode
from replicator.convert import node_ref
from replicator.service import ReplicationService
from replicator.topology import ReplicationSettings
from replicator.wire.v1 import replication_pb2 as pb

from .helpers import Image, digest_of, eventually, push_image
from .replication_invariants import (
    Write,
    disk_leaks,
    layered_image,
    metric_sum,
    metrics_text,
    replay,
    residency_problems,
    served_manifest_problems,
    start_cluster,
    stop_cluster,
    stored_manifests,
    writes_since,
)

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"), ("westeurope", ""),
            ("brazilsouth", "")]
GLOBAL_REPOS = ["team/api", "team/web"]
CONFINED_REPOS = ["brazil-only/payroll"]
TAGS = ["latest", "v1", "v2", "canary"]
PUSH_KINDS = (EventKind.MANIFEST_PUT, EventKind.TAG_SET)


async def push_missing(http: aiohttp.ClientSession, node, repo: str, image: Image,
                       tag: str) -> int:
    """Push as a client does (HEAD each blob, upload what is missing, then the
    manifest). Returns the manifest PUT's status."""
    base = f"{node.url}/v2/{repo}"
    for blob in image.blobs:
        async with http.head(f"{base}/blobs/{digest_of(blob)}") as r:
            if r.status == 200:
                continue
        async with http.post(f"{base}/blobs/uploads/", params={"digest": digest_of(blob)},
                             data=blob) as r:
            assert r.status == 201, (node.name, r.status, await r.text())
    async with http.put(f"{base}/manifests/{tag}", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        return r.status


class Workload:
    """Random writes in every region, each recorded with the stamp its origin
    logged, so ``replay`` knows which write must win everywhere."""

    def __init__(self, cluster, http: aiohttp.ClientSession, rng: random.Random) -> None:
        self.cluster = cluster
        self.http = http
        self.rng = rng
        self.writes: list[Write] = []
        self.images: dict[str, tuple[str, Image, bool]] = {}   # digest → (repo, image, confined)
        self.confined_digests: set[str] = set()

    def writers(self, confined: bool) -> list:
        return [n for n in self.cluster.running()
                if (n.region == "brazilsouth") == confined]

    async def _recorded(self, node, repo: str, kinds, action) -> None:
        before = node.registry.meta.last_seq
        try:
            await action
        finally:
            self.writes += writes_since(node, before, kinds, repo)

    def _new_image(self, confined: bool) -> tuple[str, Image]:
        repo = self.rng.choice(CONFINED_REPOS if confined else GLOBAL_REPOS)
        image = layered_image(self.rng, confined, self.rng.randint(1, 3))
        self.images[image.digest] = (repo, image, confined)
        if confined:
            self.confined_digests |= {image.digest, *(digest_of(b) for b in image.blobs)}
        return repo, image

    async def push(self, node, repo: str, image: Image, tag: str) -> None:
        async def go():
            status = await push_missing(self.http, node, repo, image, tag)
            assert status in (201, 400), (node.name, status)  # 400: a blob vanished under a delete
        await self._recorded(node, repo, PUSH_KINDS, go())

    def live(self, confined: bool) -> list[tuple[str, str]]:
        _, manifests = replay(self.writes)
        return sorted((r, d) for r, d in manifests if self.images[d][2] == confined)

    async def step(self) -> str:
        rng = self.rng
        confined = rng.random() < 0.25
        node = rng.choice(self.writers(confined))
        op = rng.choice(["push", "push", "retag", "untag", "delete", "race"])
        live = self.live(confined)
        if op == "race" and not confined:
            # The same tag pushed at once from two regions, two different images.
            repo = rng.choice(GLOBAL_REPOS)
            tag = rng.choice(TAGS)
            nodes = [rng.choice([n for n in self.writers(False) if n.region == region])
                     for region in ("eastus", "westeurope")]
            images = []
            for _ in nodes:
                image = layered_image(rng, False)
                self.images[image.digest] = (repo, image, False)
                images.append(image)
            await asyncio.gather(*(self.push(n, repo, i, tag) for n, i in zip(nodes, images, strict=True)))
            return f"race {repo}:{tag} from {[n.name for n in nodes]}"
        if op in ("push", "race") or not live:
            repo, image = self._new_image(confined)
            tag = rng.choice(TAGS)
            await self.push(node, repo, image, tag)
            return f"push {repo}:{tag} at {node.name}"
        repo, digest = rng.choice(live)
        if op == "retag":
            tag = rng.choice(TAGS)
            await self.push(node, repo, self.images[digest][1], tag)
            return f"retag {repo}:{tag} at {node.name}"
        if op == "untag":
            tags, _ = replay(self.writes)
            candidates = sorted(t for (r, t) in tags if r == repo)
            if not candidates:
                return "nothing to untag"
            tag = rng.choice(candidates)

            async def untag():
                async with self.http.delete(f"{node.url}/v2/{repo}/manifests/{tag}") as r:
                    assert r.status in (202, 404), r.status
            await self._recorded(node, repo, [EventKind.TAG_DELETE], untag())
            return f"untag {repo}:{tag} at {node.name}"

        async def delete():
            async with self.http.delete(f"{node.url}/v2/{repo}/manifests/{digest}") as r:
                assert r.status in (202, 404), r.status
        await self._recorded(node, repo, [EventKind.MANIFEST_DELETE], delete())
        return f"delete {repo}@{digest[:19]} at {node.name}"


async def converged_to(cluster, http, expected_tags, expected_manifests) -> dict:
    """What differs from the expected state, per node and repository (empty: converged)."""
    diffs = {}
    for node in cluster.running():
        repos = GLOBAL_REPOS + (CONFINED_REPOS if node.region == "brazilsouth" else [])
        for repo in repos:
            want_tags = {t: d for (r, t), d in expected_tags.items() if r == repo}
            want_manifests = {d for r, d in expected_manifests if r == repo}
            got = (await cluster.tags(http, node, repo), stored_manifests(node, repo))
            if got != (want_tags, want_manifests):
                diffs[(node.name, repo)] = got
    return diffs


async def test_random_workload_converges_and_confined_content_stays_home(tmp_path, http):
    seed = int(os.environ.get("GEOREG_CONVERGENCE_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"convergence workload seed: {seed} (replay: GEOREG_CONVERGENCE_SEED={seed})")
    rng = random.Random(seed)
    cluster = await start_cluster(tmp_path, TOPOLOGY)
    try:
        work = Workload(cluster, http, rng)
        done = []
        for round_ in range(4):
            # Half the rounds run with westeurope cut off from eastus (both
            # ways, or one way): writes on both sides are truly concurrent.
            if round_ % 2:
                cluster.partition("westeurope", "eastus", one_way=rng.random() < 0.5)
            for _ in range(10):
                done.append(await work.step())
            cluster.heal()
        tags, manifests = replay(work.writes)
        diffs: dict = {}

        async def converged() -> bool:
            diffs.clear()
            diffs.update(await converged_to(cluster, http, tags, manifests))
            return not diffs

        try:
            await eventually(converged, timeout=40, interval=0.25, what="convergence")
        except AssertionError:
            raise AssertionError(f"seed {seed}: no convergence to {tags} / {manifests}; "
                                 f"differences: {diffs}; workload: {done}") from None
        assert any(w.kind is EventKind.TAG_SET for w in work.writes)

        # Complete images everywhere; nothing of brazilsouth anywhere else.
        confined = sorted(work.confined_digests)
        brazil = cluster.nodes["brazilsouth"]
        problems = []
        for node in cluster.running():
            problems += await served_manifest_problems(http, node)
            if node is not brazil:
                problems += await residency_problems(http, node, CONFINED_REPOS, confined)
                problems += disk_leaks(node, CONFINED_REPOS, confined)
        assert not problems, f"seed {seed}:\n" + "\n".join(problems)
        # The check is not vacuous: brazilsouth holds what the others must not.
        assert any(brazil.registry.blobs.exists(d) for d in confined), f"seed {seed}"
        assert disk_leaks(brazil, CONFINED_REPOS, confined), f"seed {seed}"
    finally:
        await stop_cluster(cluster)


# -- applying anything twice is a no-op ----------------------------------------------


def quiesced(cluster) -> bool:
    """Every running node is subscribed to every running peer and has applied its whole log."""
    for node in cluster.running():
        for sub in node.replication.subscriptions:
            peer = cluster.nodes[sub.peer.name]
            if not peer.running:
                continue
            if not sub.connected or sub.cursor().seq != peer.registry.meta.last_seq:
                return False
    return True


async def totals(cluster, http) -> tuple[dict[str, int], dict[str, float]]:
    """(last log sequence, replication bytes received) per running node."""
    seqs = {n.name: n.registry.meta.last_seq for n in cluster.running()}
    received = {n.name: metric_sum(await metrics_text(http, n), "georeg_replication_bytes_total",
                                   direction="in")
                for n in cluster.running()}
    return seqs, received


@pytest.fixture
async def cluster(tmp_path):
    c = await start_cluster(tmp_path, TOPOLOGY)
    try:
        yield c
    finally:
        await stop_cluster(c)


async def test_applying_anything_twice_is_a_no_op(cluster, http):
    rng = random.Random(7)
    images = [("eastus-1", "twice/a", "v1"), ("westeurope", "twice/b", "v1"),
              ("eastus-2", "twice/a", "v2")]
    images = [(node, repo, tag, layered_image(rng, False, layers=3)) for node, repo, tag in images]
    for node, repo, tag, image in images:
        await push_image(http, cluster.nodes[node].url, repo, image, tag=tag)
    await eventually(lambda: quiesced(cluster), timeout=20, what="replication to settle")
    seqs, received = await totals(cluster, http)
    assert sum(received.values()) > 0, "blobs must have travelled once"

    # 1. The same image pushed again, every blob uploaded again, at its origin
    #    and at a replica that received it — by tag and by digest.
    for origin, repo, tag, image in images:
        for name in (origin, "westeurope" if origin != "westeurope" else "eastus-3"):
            await push_image(http, cluster.nodes[name].url, repo, image, tag=tag)
            await push_image(http, cluster.nodes[name].url, repo, image)
    await eventually(lambda: quiesced(cluster), timeout=20, what="replication to settle")
    assert await totals(cluster, http) == (seqs, received), \
        "re-pushing content already present logged events or moved bytes"

    # 2. A node restarted with its cursors rolled back to the start of every
    #    peer's log receives everything again, and applies none of it.
    node = cluster.nodes["westeurope"]
    await cluster.stop("westeurope")   # graceful: its cursors are persisted, to roll back
    meta = MetadataStore(node.data_dir / "meta")
    try:
        batch = Batch()
        for key, raw in meta.scan(keys.CURSOR):
            cursor = decode(raw, Cursor)
            assert cursor.seq > 0
            batch.put(key, encode(msgspec.structs.replace(cursor, seq=0)))
        meta.commit(batch)
    finally:
        meta.close()
    await cluster.restart("westeurope")
    await eventually(lambda: quiesced(cluster), timeout=20, what="the rolled-back node to catch up")
    text = await metrics_text(http, node)
    assert metric_sum(text, "georeg_replication_bytes_total", direction="in") == 0
    assert metric_sum(text, "georeg_replication_events_applied_total") == 0
    after_seqs, _ = await totals(cluster, http)
    assert after_seqs == seqs, "re-delivered events were logged again"

    # 3. Anti-entropy against every peer, on every node: nothing to repair,
    #    and nothing even to look at: every repository's fingerprint agrees,
    #    in the maintained scheme and in the one older nodes recompute.
    for n in cluster.running():
        for peer in n.replication.clients:
            assert await n.replication.anti_entropy.sync_with(peer) == 0, (n.name, peer.name)
            for scheme in (fingerprints.RECOMPUTED, fingerprints.SUMMED):
                assert await fingerprint_differences(n, peer, scheme) == [], (n.name, peer.name)
    assert (await totals(cluster, http))[0] == seqs


async def fingerprint_differences(node, peer, scheme: int) -> list[str]:
    """Repositories whose fingerprint from ``peer`` (over what both may hold)
    differs from ``node``'s own, asked for in ``scheme``."""
    replication = node.replication
    summary = await peer.stub.Summarize(pb.SummaryRequest(
        requester=node_ref(node.registry.identity), fingerprint_scheme=scheme))
    assert summary.fingerprint_scheme == scheme
    residency, here, there = replication.residency, node.region, peer.peer.region
    differing = []
    for entry in summary.repositories:
        def visible(origin: str, repo=entry.repository) -> bool:
            return residency.allows(origin, repo, here) and residency.allows(origin, repo, there)
        if replication.replica.fingerprint(entry.repository, visible, scheme) != entry.fingerprint:
            differing.append(entry.repository)
    return differing


async def bucket_differences(node, peer) -> list[int]:
    """Fingerprint buckets whose sum from ``peer`` (over what both may hold)
    differs from ``node``'s own; a summary with no bucket at all is one."""
    summary = await peer.stub.Summarize(pb.SummaryRequest(
        requester=node_ref(node.registry.identity), fingerprint_scheme=fingerprints.SUMMED,
        buckets_only=True))
    assert summary.bucket_count == keys.FINGERPRINT_BUCKETS and not summary.repositories
    residency, here, there = node.replication.residency, node.region, peer.peer.region

    def visible(origin: str) -> bool:
        return residency.allows(origin, "", here) and residency.allows(origin, "", there)
    theirs = {b.bucket: b.fingerprint for b in summary.buckets}
    if not theirs:
        return [-1]
    return [b for b in range(keys.FINGERPRINT_BUCKETS)
            if node.replication.replica.bucket_fingerprint(b, visible)
            != theirs.get(b, fingerprints.EMPTY)]


# -- regressions ---------------------------------------------------------------------


async def test_retag_concurrent_with_delete_of_its_old_target_survives(tmp_path, http):
    """westeurope moves `t` from M1 to M2 while, cut off from it, eastus deletes
    M1 (later by the clock). Replayed in stamp order — t→M1, t→M2, delete M1 —
    the delete no longer concerns `t`: t→M2 must survive everywhere, as it
    would had the two writes happened one after the other in one region."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        rng = random.Random(11)
        m1, m2 = layered_image(rng, False), layered_image(rng, False)
        d1 = await push_image(http, east.url, "app", m1, tag="t")
        await eventually(lambda: cluster.tags(http, west, "app"), timeout=10, what="t on westeurope")
        cluster.partition("eastus", "westeurope")
        before = west.registry.meta.last_seq
        d2 = await push_image(http, west.url, "app", m2, tag="t")
        retag = writes_since(west, before, [EventKind.TAG_SET], "app")
        await eventually(lambda: wall_ms_now() > unpack(retag[0].stamp[0])[0], timeout=5,
                         what="eastus's clock to pass the re-tag's")
        async with http.delete(f"{east.url}/v2/app/manifests/{d1}") as r:
            assert r.status == 202
        cluster.heal()

        async def settled() -> bool:
            maps = [await cluster.tags(http, n, "app") for n in (east, west)]
            return maps[0] == maps[1] and quiesced(cluster)

        await eventually(settled, timeout=20, what="both regions to agree")
        for node in (east, west):
            assert await cluster.tags(http, node, "app") == {"t": d2}, node.name
            assert stored_manifests(node, "app") == {d2}, node.name
    finally:
        await stop_cluster(cluster)


async def test_tag_whose_manifest_only_stale_peers_hold_does_not_stop_the_subscription(tmp_path, http):
    """A tag set arrives for a manifest this node has a tombstone for (older
    than the tag); the announcing peer has since deleted the manifest, and the
    only other copy is older than the tombstone. The tag cannot be applied —
    that must be a recorded failure, not the end of the subscription."""
    settings = ReplicationSettings(anti_entropy_interval_s=60.0, quorum_timeout_s=5.0)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", ""), ("westus", "")],
                                  settings=settings)
    try:
        east, west, stale = (cluster.nodes[n] for n in ("eastus", "westeurope", "westus"))
        rng = random.Random(5)
        image = layered_image(rng, False)
        digest = await push_image(http, east.url, "app", image, tag="base")
        for node in (west, stale):
            await eventually(lambda n=node: cluster.tags(http, n, "app"), timeout=10)
        # westus hears nothing new from now on, but westeurope can still fetch from it.
        cluster.partition("westus", "eastus", one_way=True)
        cluster.partition("westus", "westeurope", one_way=True)
        cluster.partition("westeurope", "eastus")
        async with http.delete(f"{west.url}/v2/app/manifests/{digest}") as r:     # tombstone in westeurope
            assert r.status == 202
        await eventually(lambda: wall_ms_now() > unpack(west.registry.hlc.last)[0], timeout=5,
                         what="eastus's clock to pass the delete's")
        async with http.put(f"{east.url}/v2/app/manifests/again", data=image.manifest,
                            headers={"Content-Type": image.media_type}) as r:    # newer tag in eastus
            assert r.status == 201
        async with http.delete(f"{east.url}/v2/app/manifests/{digest}") as r:     # then gone there too
            assert r.status == 202
        # westeurope may reach eastus again, slowly: its subscription gets the
        # tag set well before an anti-entropy round could tombstone the tag.
        cluster.links[("westeurope", "eastus")].set_faults(LinkFaults(extra_latency_ms=300))
        cluster.links[("eastus", "westeurope")].heal()
        marker = layered_image(rng, False)
        await push_image(http, east.url, "app", marker, tag="marker")
        sub = next(s for s in west.replication.subscriptions if s.peer.name == "eastus")
        await eventually(lambda: sub.connected and sub.cursor().seq == east.registry.meta.last_seq,
                         timeout=20, what="westeurope's subscription to eastus to catch up")
        assert (await cluster.tags(http, west, "app")).get("marker") == marker.digest
    finally:
        await stop_cluster(cluster)


async def test_retry_of_an_unconfirmed_write_is_acknowledged_only_once_durable(tmp_path, http):
    """A zone write whose confirmation is late gets an indefinite 503 ("stored
    here, not confirmed"); the client retries. The retry changes nothing here
    (the write is already stored), but a 201 still promises two zones: it may
    only come once the second zone has the write."""
    settings = ReplicationSettings(anti_entropy_interval_s=1.0, quorum_timeout_s=1.0)
    cluster = await start_cluster(tmp_path, [("eastus", "1"), ("eastus", "2"), ("eastus", "3")],
                                  settings=settings)
    try:
        zone1, zone2 = cluster.nodes["eastus-1"], cluster.nodes["eastus-2"]
        await cluster.crash("eastus-3")
        await eventually(lambda: zone1.replication.quorum.live_peers == {"eastus/2"}, timeout=10)
        image = layered_image(random.Random(3), False)
        for blob in image.blobs:   # confirmed at once: the link is still fast
            async with http.post(f"{zone1.url}/v2/app/blobs/uploads/",
                                 params={"digest": digest_of(blob)}, data=blob) as r:
                assert r.status == 201
        # Zone 2 stops hearing zone 1 (the connection stays up, nothing moves):
        # the manifest is stored in zone 1 and waits for a confirmation.
        link = cluster.links[("eastus-2", "eastus-1")]
        link.set_faults(LinkFaults(stall=True))
        url = f"{zone1.url}/v2/app/manifests/v1"
        headers = {"Content-Type": image.media_type}

        def zone2_has_it() -> bool:
            return zone2.registry.meta.get(keys.tag("app", "v1")) is not None

        async with http.put(url, data=image.manifest, headers=headers) as r:
            assert r.status == 503, r.status
            assert "confirm" in (await r.json())["errors"][0]["message"]
        async with http.put(url, data=image.manifest, headers=headers) as r:   # the retry
            assert r.status == 503 or zone2_has_it(), "201 for a write only one zone holds"
        link.heal()
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            async with http.put(url, data=image.manifest, headers=headers) as r:
                if r.status == 201:
                    assert zone2_has_it(), "201 for a write only one zone holds"
                    break
                assert r.status == 503, r.status
            assert asyncio.get_running_loop().time() < deadline, "never confirmed after healing"
    finally:
        await stop_cluster(cluster)


async def test_converged_nodes_agree_on_every_fingerprint_over_what_both_may_hold(tmp_path, http):
    """One repository written in East US and in Brazil South (confined): each
    node holds registers the other may not, yet over what both may hold their
    fingerprints agree, in either scheme, so a round between them repairs
    nothing and fetches no repository's state."""
    rng = random.Random(25)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("brazilsouth", "")])
    try:
        eastus, brazil = cluster.nodes["eastus"], cluster.nodes["brazilsouth"]
        await push_image(http, eastus.url, "mixed/app", layered_image(rng, False), tag="global")
        await push_image(http, eastus.url, "mixed/app", layered_image(rng, False), tag="old")
        async with http.delete(f"{eastus.url}/v2/mixed/app/manifests/old") as r:
            assert r.status == 202
        await push_image(http, brazil.url, "mixed/app", layered_image(rng, True), tag="payroll")
        await eventually(lambda: quiesced(cluster), timeout=20, what="replication to settle")

        def everything(region: str) -> bool:
            return True
        assert (brazil.replication.replica.fingerprint("mixed/app", everything)
                != eastus.replication.replica.fingerprint("mixed/app", everything)), \
            "Brazil South should hold a register East US may not"
        for node in (eastus, brazil):
            for peer in node.replication.clients:
                for scheme in (fingerprints.RECOMPUTED, fingerprints.SUMMED):
                    assert await fingerprint_differences(node, peer, scheme) == [], \
                        (node.name, peer.name, scheme)
                assert await bucket_differences(node, peer) == [], (node.name, peer.name)
                assert await node.replication.anti_entropy.sync_with(peer) == 0
    finally:
        await stop_cluster(cluster)


async def test_a_round_compares_only_the_buckets_that_differ_and_fetches_only_what_changed(
        tmp_path, http):
    """West Europe hears nothing by the log (its subscriptions are ended); a
    round of anti-entropy against East US must find the three repositories
    written since — and look into no repository outside their buckets, and
    fetch the state of no other repository."""
    rng = random.Random(2525)
    settings = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")], settings=settings)
    try:
        eastus, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        repos = [f"many/r{i}" for i in range(40)]
        for repo in repos:
            await push_image(http, eastus.url, repo, layered_image(rng, False, layers=1), tag="v1")
        await eventually(lambda: quiesced(cluster), timeout=30, what="replication to settle")
        for task in west.replication._tasks.values():
            task.cancel()
        await eventually(lambda: all(t.done() for t in west.replication._tasks.values()),
                         what="westeurope's subscriptions ended")
        rounds = west.replication.anti_entropy
        source = next(c for c in west.replication.clients if c.peer.name == "eastus")

        assert await rounds.sync_with(source) == 0
        assert (rounds.buckets_differing, rounds.compared, rounds.fetched) == (0, 0, 0), \
            "converged: not one repository should even be compared"

        await push_image(http, eastus.url, "many/r3", layered_image(rng, False, layers=1), tag="v2")
        async with http.delete(f"{eastus.url}/v2/many/r7/manifests/v1") as r:
            assert r.status == 202
        await push_image(http, eastus.url, "many/new", layered_image(rng, False, layers=1), tag="v1")
        written = {"many/r3", "many/new", "many/r7"}
        buckets = {keys.fingerprint_bucket(r) for r in written}
        in_those_buckets = [r for r in [*repos, "many/new"] if keys.fingerprint_bucket(r) in buckets]

        assert await rounds.sync_with(source) >= 3
        assert rounds.buckets_differing == len(buckets)
        assert rounds.compared == len(in_those_buckets) < len(repos)
        assert rounds.fetched == len(written)
        replica = west.replication.replica
        assert replica.resolve_tag("many/r3", "v2") == eastus.replication.replica.resolve_tag(
            "many/r3", "v2") is not None
        assert replica.resolve_tag("many/r7", "v1") is None
        assert replica.resolve_tag("many/new", "v1") is not None

        assert await rounds.sync_with(source) == 0
        assert rounds.fetched == len(written), "converged again: nothing more to fetch"

        # What the rounds did can be read from outside (``georeg bench scale``).
        expected = {"buckets_differing": len(buckets), "compared": len(in_those_buckets),
                    "fetched": len(written), "repaired": rounds.repaired, "rounds": rounds.rounds}
        async with http.get(f"{west.url}/georeg/v1/node") as r:
            assert r.status == 200
            assert (await r.json())["anti_entropy"] == expected
        text = await metrics_text(http, west)
        for what, count in expected.items():
            assert metric_sum(text, "georeg_anti_entropy_total", what=what) == count, what
    finally:
        await stop_cluster(cluster)


async def west_behind_eastus(tmp_path, http, rng: random.Random, count: int = 12):
    """East US and West Europe, converged over ``count`` repositories; then
    West Europe's subscriptions are ended and East US writes three
    repositories. Returns (cluster, West Europe's anti-entropy, its client of
    East US, the repositories written since)."""
    settings = ReplicationSettings(anti_entropy_interval_s=3600, quorum_timeout_s=5.0)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")], settings=settings)
    eastus, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
    for i in range(count):
        await push_image(http, eastus.url, f"many/r{i}", layered_image(rng, False, layers=1), tag="v1")
    await eventually(lambda: quiesced(cluster), timeout=30, what="replication to settle")
    for task in west.replication._tasks.values():
        task.cancel()
    await eventually(lambda: all(t.done() for t in west.replication._tasks.values()),
                     what="westeurope's subscriptions ended")
    await push_image(http, eastus.url, "many/r3", layered_image(rng, False, layers=1), tag="v2")
    async with http.delete(f"{eastus.url}/v2/many/r7/manifests/v1") as r:
        assert r.status == 202
    await push_image(http, eastus.url, "many/new", layered_image(rng, False, layers=1), tag="v1")
    source = next(c for c in west.replication.clients if c.peer.name == "eastus")
    return cluster, west.replication.anti_entropy, source, {"many/r3", "many/r7", "many/new"}


def assert_repaired(cluster) -> None:
    west = cluster.nodes["westeurope"].replication.replica
    east = cluster.nodes["eastus"].replication.replica
    assert west.resolve_tag("many/r3", "v2") == east.resolve_tag("many/r3", "v2") is not None
    assert west.resolve_tag("many/r7", "v1") is None
    assert west.resolve_tag("many/new", "v1") is not None


async def test_a_peer_with_another_bucket_count_is_compared_per_repository(
        tmp_path, http, monkeypatch):
    """A peer whose buckets are laid out otherwise (another georeg) answers the
    buckets-only question with sums this node cannot compare, and no
    repositories: it must be asked again for every repository's fingerprint,
    not skipped (which would leave this node never repaired from it)."""
    real = ReplicationService.Summarize

    async def in_32_buckets(self, request, context):
        reply = await real(self, request, context)
        if request.buckets_only:
            reply.bucket_count = 32
        return reply
    monkeypatch.setattr(ReplicationService, "Summarize", in_32_buckets)
    cluster, rounds, source, written = await west_behind_eastus(tmp_path, http, random.Random(26))
    try:
        assert await rounds.sync_with(source) >= 3
        assert rounds.fetched == len(written)
        assert rounds.compared == 13, "every repository East US holds, by its fingerprint"
        assert_repaired(cluster)
        assert await rounds.sync_with(source) == 0
    finally:
        await stop_cluster(cluster)


async def test_fingerprints_are_compared_in_the_scheme_of_the_reply_that_carried_them(
        tmp_path, http, monkeypatch):
    """The buckets come in one reply and the repositories in a second; a peer
    may answer that second one in another scheme (it was replaced in between
    by an older georeg, which ignores the buckets asked for). Compared in the
    first reply's scheme every repository would differ and be fetched whole."""
    real = ReplicationService.Summarize

    async def older_after_the_buckets(self, request, context):
        if not request.buckets_only:
            request = pb.SummaryRequest(requester=request.requester,
                                        fingerprint_scheme=fingerprints.RECOMPUTED)
        return await real(self, request, context)
    monkeypatch.setattr(ReplicationService, "Summarize", older_after_the_buckets)
    cluster, rounds, source, written = await west_behind_eastus(tmp_path, http, random.Random(27))
    try:
        assert await rounds.sync_with(source) >= 3
        assert rounds.fetched == len(written), "only what changed is fetched"
        assert_repaired(cluster)
    finally:
        await stop_cluster(cluster)


async def test_a_peer_summing_without_attributes_is_compared_in_the_scheme_both_know(
        tmp_path, http, monkeypatch):
    """A georeg from before attributes were summed answers a question in the
    current scheme with its own sums (scheme 1, which this node does not keep)
    and asks in scheme 1 itself: both sides fall back to RECOMPUTED, over tags
    and manifests, instead of failing every round (``unknown scheme``)."""
    real = ReplicationService.Summarize
    asked: list[int] = []

    async def older(self, request, context):
        asked.append(request.fingerprint_scheme)
        if request.fingerprint_scheme == fingerprints.RECOMPUTED:
            return await real(self, request, context)
        # What an older node answers to a scheme it does not know: its own.
        return pb.Summary(fingerprint_scheme=fingerprints.SUMMED_WITHOUT_ATTRIBUTES,
                          repositories=[pb.RepositorySummary(repository="many/r3",
                                                             fingerprint=bytes(32))])
    monkeypatch.setattr(ReplicationService, "Summarize", older)
    cluster, rounds, source, written = await west_behind_eastus(tmp_path, http, random.Random(28))
    try:
        assert await rounds.sync_with(source) >= 3
        assert asked[-1] == fingerprints.RECOMPUTED
        assert rounds.fetched == len(written), "only what changed is fetched"
        assert_repaired(cluster)
        # And asked by an older node in its scheme, this one answers in RECOMPUTED
        # (the service itself: the one serving here is the stand-in above).
        west = cluster.nodes["westeurope"]
        reply = await real(cluster.nodes["eastus"].replication.service, pb.SummaryRequest(
            requester=node_ref(west.registry.identity),
            fingerprint_scheme=fingerprints.SUMMED_WITHOUT_ATTRIBUTES), None)
        assert reply.fingerprint_scheme == fingerprints.RECOMPUTED
        mine = {r: west.replication.replica.fingerprint(r, lambda region: True,
                                                        fingerprints.RECOMPUTED)
                for r in ("many/r3", "many/r7", "many/new")}
        assert {e.repository: e.fingerprint for e in reply.repositories
                if e.repository in mine} == mine
    finally:
        await stop_cluster(cluster)


async def test_summarizing_many_repositories_lets_the_node_serve_in_between(tmp_path, http):
    """A summary of every repository (a new replica, or per-repository
    residency rules) reads one fingerprint per repository, a hundred thousand
    at scale: it must let the event loop run in between, or the node's HTTP
    and gRPC stand still until it is done."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    try:
        eastus, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        batch = Batch()   # registers only, written here: no event, nothing replicates
        for i in range(2500):
            batch.put(keys.tag(f"bulk/r{i}", "v1"), encode(TagRecord(
                digest=digest_of(b"%d" % i), hlc=1 << 20, origin_region="eastus", origin_zone="")))
        eastus.registry.meta.commit(batch)
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)
        replica = eastus.replication.service.replica
        fingerprint = replica.fingerprint
        # The ticks at each fingerprint read, by the task that read it: the
        # node's own anti-entropy may summarize at the same time (seen in CI).
        seen: dict[asyncio.Task | None, list[int]] = {}

        def watched(*args, **kwargs):
            seen.setdefault(asyncio.current_task(), []).append(ticks)
            return fingerprint(*args, **kwargs)
        replica.fingerprint = watched
        ticker = asyncio.create_task(ticking())
        try:
            source = next(c for c in west.replication.clients if c.peer.name == "eastus")
            summary = await source.stub.Summarize(pb.SummaryRequest(
                requester=node_ref(west.registry.identity), fingerprint_scheme=fingerprints.SUMMED))
        finally:
            ticker.cancel()
            del replica.fingerprint
        assert len(summary.repositories) >= 2500
        ours = [reads for reads in seen.values() if len(reads) == len(summary.repositories)]
        assert ours, {task: len(reads) for task, reads in seen.items()}
        for reads in ours:
            assert reads[-1] - reads[0] >= 2, "the loop never ran while the summary was made"
    finally:
        await stop_cluster(cluster)
