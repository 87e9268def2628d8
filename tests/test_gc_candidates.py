"""Garbage collection's candidates, maintained on write (registry_node.unreferenced),
and what a pass costs with them.

The invariant: after any commit, the stored set of unreferenced blobs equals
a recomputation (every blob held that no manifest references). Driven on a
real node — its Registry for local pushes and deletes (layers shared across
repositories, an index over two manifests, re-puts, tag moves, repository
deletes), its Replica for what other regions did, GC passes on a clock the
test moves, reopening the database — by Hypothesis; after SIGKILLs of a node
process in the middle of writes, read back from the data dir it left. And
the point of it: a pass over a node holding many images and no garbage reads
a constant number of records, however many images there are.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import aiohttp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from registry_node import hlc, keys, unreferenced
from registry_node.config import NodeConfig
from registry_node.errors import RegistryError
from registry_node.gc import GarbageCollector
from registry_node.metastore import Batch, MetadataStore
from registry_node.node import Node
from registry_node.records import Event, EventKind, ManifestRecord, RecycledManifest, decode
from registry_node.reference import Digest
from registry_node.replica import MissingContent, Replica

from .helpers import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    ManualClock,
    descriptor,
    digest_of,
    eventually,
)
from .profiles import scaled

GRACE_S = 60.0
DAY_S = 86_400.0          # soft delete's shortest days: a purge is a gc this far on
REPOS = ("team/app", "web", "lib/base")
TAGS = ("latest", "v1")
BLOBS = [b'{"architecture":"amd64","os":"linux"}', b'{"architecture":"arm64","os":"linux"}',
         b"base layer", b"app layer", b"web layer", b"lonely layer"]
# (config, layers): base layer shared by the first three, across repositories.
IMAGES = [(0, (2, 3)), (0, (2, 4)), (1, (2,)), (1, (5,))]


def image_body(config: int, layers: tuple[int, ...]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": descriptor(BLOBS[config], OCI_CONFIG),
                       "layers": [descriptor(BLOBS[i], OCI_LAYER) for i in layers]}).encode()


IMAGE_BODIES = [image_body(*image) for image in IMAGES]
# An index over the first two images: its references are child manifests.
INDEX_BODY = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
    {**descriptor(IMAGE_BODIES[i], OCI_MANIFEST), "platform": {"architecture": a, "os": "linux"}}
    for i, a in ((0, "amd64"), (1, "arm64"))]}).encode()
MANIFESTS = [*IMAGE_BODIES, INDEX_BODY]
MEDIA_TYPES = [*[OCI_MANIFEST] * len(IMAGE_BODIES), OCI_INDEX]
DIGESTS = [digest_of(body) for body in MANIFESTS]

repo_i = st.integers(0, len(REPOS) - 1)
blob_i = st.integers(0, len(BLOBS) - 1)
manifest_i = st.integers(0, len(MANIFESTS) - 1)
tag_i = st.integers(0, len(TAGS) - 1)

push_image = st.tuples(st.just("push image"), repo_i, manifest_i, st.none() | tag_i)
delete_manifest = st.tuples(st.just("delete manifest"), repo_i, manifest_i)
# Pushes and deletes of whole images weigh more: shared layers need several.
operations = st.one_of(
    push_image, push_image, push_image, delete_manifest,
    st.tuples(st.just("push blob"), repo_i, blob_i),
    st.tuples(st.just("push manifest"), repo_i, manifest_i, st.none() | tag_i),
    st.tuples(st.just("delete tag"), repo_i, tag_i),
    delete_manifest,
    st.tuples(st.just("delete blob"), repo_i, blob_i),
    st.tuples(st.just("delete repository"), repo_i),
    st.tuples(st.just("remote manifest"), repo_i, manifest_i, st.integers(1, 50)),
    st.tuples(st.just("remote manifest delete"), repo_i, manifest_i, st.integers(1, 50)),
    st.tuples(st.just("head"), repo_i, blob_i),
    st.tuples(st.just("gc"), st.sampled_from([0.0, GRACE_S / 2, GRACE_S + 1, DAY_S + 1])),
    st.tuples(st.just("reopen")),
    # Soft delete: deletes keep manifests (and their blobs) in the bin until a
    # restore, or a gc past the days purges them.
    st.tuples(st.just("soft delete"), st.booleans()),
    st.tuples(st.just("restore"), repo_i, manifest_i),
)
# What both properties driven by ``operations`` (the candidates here, the content
# counts in test_content_counts) must hold for whatever Hypothesis draws: a layer
# shared by two manifests of a repository, and by two repositories.
SHARED_LAYER_RUNS = (
    [("push image", 0, 0, 0), ("push image", 0, 1, 1), ("delete manifest", 0, 0),
     ("gc", GRACE_S + 1)],
    [("push image", 0, 2, 0), ("push image", 1, 2, 0), ("delete repository", 0),
     ("gc", GRACE_S + 1), ("reopen",), ("delete manifest", 1, 2)],
    # A manifest in the recycle bin keeps its blobs through GC; restored, it
    # holds them again; deleted again and purged, they go.
    [("soft delete", True), ("push image", 0, 0, 0), ("push image", 1, 0, None),
     ("delete manifest", 0, 0), ("delete manifest", 1, 0), ("gc", GRACE_S + 1),
     ("reopen",), ("restore", 0, 0), ("delete manifest", 0, 0), ("soft delete", False),
     ("gc", DAY_S + 1)],
)


def driven_by_operations(*runs: list[tuple]) -> Callable:
    """A Hypothesis test of ``ops``, 4 to 30 ``operations``, that always tries
    ``SHARED_LAYER_RUNS`` and then ``runs`` first."""
    def decorate(test: Callable) -> Callable:
        for ops in reversed([*SHARED_LAYER_RUNS, *runs]):
            test = example(ops=ops)(test)
        test = given(ops=st.lists(operations, min_size=4, max_size=30))(test)
        return settings(max_examples=scaled(40), deadline=None,
                        suppress_health_check=[HealthCheck.too_slow,
                                               HealthCheck.data_too_large])(test)
    return decorate


async def _chunks(data: bytes):
    yield data


def assert_maintained(meta: MetadataStore, where: str) -> None:
    """The stored set equals a recomputation, and no manifest (live or in the
    recycle bin) lacks a blob it names."""
    stored = unreferenced.stored(meta.scan)
    recomputed = unreferenced.recompute(meta.scan, meta.has_prefix)
    assert stored == recomputed, f"{where}: stored {sorted(stored)} != recomputed {sorted(recomputed)}"
    for key, raw in meta.scan(keys.REPO_DATA):
        parsed = keys.parse(key)
        if isinstance(parsed, keys.ManifestKey):
            for target in decode(raw, ManifestRecord).references:
                assert (meta.get(keys.blob(target)) is not None
                        or meta.get(keys.manifest(parsed.repository, target)) is not None), \
                    f"{where}: {parsed.repository}@{parsed.digest} lost {target}"
    # A manifest in the recycle bin keeps its blobs (not its child manifests).
    for key, raw in meta.scan(keys.RECYCLE_BIN):
        if isinstance(kept := keys.parse(key), keys.RecycledManifestKey):
            assert all(meta.get(keys.blob(d)) is not None
                       for d in decode(raw, RecycledManifest).record.references
                       if d not in DIGESTS), f"{where}: {kept} in the bin lost a blob"


class Subject:
    """One real node on the test's clock, opened and reopened on one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.config = NodeConfig(data_dir=data_dir, region="eastus", sync=False)
        self.clock = ManualClock()
        self.node: Node | None = None
        self.replica: Replica | None = None
        self.gc: GarbageCollector | None = None

    def open(self) -> None:
        self.node = Node.open(self.config, wall_ns=self.clock.wall_ns,
                              monotonic=self.clock.monotonic)
        self.replica = Replica(self.node.registry, self.node.configuration)
        self.gc = GarbageCollector(self.node.registry, grace_s=GRACE_S,
                                   upload_ttl_s=10 * GRACE_S, interval_s=3600)

    def close(self) -> None:
        self.node.close()

    async def run(self, op: tuple) -> None:
        registry = self.node.registry
        match op:
            case ("push blob", r, b):
                await registry.put_blob(REPOS[r], Digest.parse(digest_of(BLOBS[b])),
                                        _chunks(BLOBS[b]), len(BLOBS[b]))
            case ("push image", r, m, t):
                # As a client does: the blobs (of the children, for the index), then the
                # children, then the manifest.
                parts = [0, 1] if m == len(IMAGES) else [m]
                for part in parts:
                    config, layers = IMAGES[part]
                    for b in (config, *layers):
                        await self.run(("push blob", r, b))
                if m == len(IMAGES):
                    for part in parts:
                        await self.run(("push manifest", r, part, None))
                await self.run(("push manifest", r, m, t))
            case ("push manifest", r, m, t):
                await _refused_or_done(registry.put_manifest(
                    REPOS[r], DIGESTS[m] if t is None else TAGS[t], MANIFESTS[m], MEDIA_TYPES[m]))
            case ("delete tag", r, t):
                await _refused_or_done(registry.delete_manifest(REPOS[r], TAGS[t]))
            case ("delete manifest", r, m):
                await _refused_or_done(registry.delete_manifest(REPOS[r], DIGESTS[m]))
            case ("delete blob", r, b):
                await _refused_or_done(registry.delete_blob(REPOS[r], Digest.parse(digest_of(BLOBS[b]))))
            case ("delete repository", r):
                await _refused_or_done(registry.delete_repository(REPOS[r]))
            case ("remote manifest", r, m, logical):
                event = self._remote(EventKind.MANIFEST_PUT, r, m, logical)
                try:
                    self.replica.apply_manifest(event, MANIFESTS[m])
                except MissingContent:
                    pass      # its blobs or children are not here: refused, nothing written
            case ("remote manifest delete", r, m, logical):
                self.replica.apply_manifest_delete(
                    self._remote(EventKind.MANIFEST_DELETE, r, m, logical))
            case ("head", r, b):
                try:
                    registry.stat_blob(REPOS[r], Digest.parse(digest_of(BLOBS[b])))
                except RegistryError:
                    pass
            case ("gc", advance):
                self.clock.advance(advance)
                await self.gc.collect()
            case ("soft delete", enabled):
                await self.node.configuration.put("registry", "default", {
                    "soft_delete": {"enabled": enabled, "days": 1}})
            case ("restore", r, m):
                await _refused_or_done(registry.restore(REPOS[r], DIGESTS[m]))
            case ("reopen",):
                self.close()
                self.open()
                assert not self.node.meta.unreferenced_rebuilt, "kept, so not rebuilt on open"

    def _remote(self, kind: EventKind, r: int, m: int, logical: int) -> Event:
        return Event(kind=kind, repository=REPOS[r], digest=DIGESTS[m], media_type=MEDIA_TYPES[m],
                     size=len(MANIFESTS[m]), origin_region="westeurope", origin_zone="",
                     hlc=hlc.pack(self.clock.wall_ns() // 1_000_000, logical), acked_ns=1)


async def _refused_or_done(call) -> None:
    try:
        await call
    except RegistryError:
        pass    # a blob or child missing, a delete of what is absent or in use: nothing written


# The cases the set exists for, whatever Hypothesis draws: a layer shared by
# two manifests of a repository, by two repositories (SHARED_LAYER_RUNS), and by
# an index's children.
@driven_by_operations(
    [("push image", 2, 4, 0), ("delete manifest", 2, 0), ("delete manifest", 2, 4),
     ("remote manifest", 2, 0, 1), ("delete manifest", 2, 1), ("gc", GRACE_S + 1)])
def test_the_maintained_candidates_equal_a_recomputation_after_any_writes(ops):
    with tempfile.TemporaryDirectory(prefix="georeg-gcref-") as tmp:
        subject = Subject(Path(tmp) / "node")

        async def scenario() -> None:
            subject.open()
            try:
                for n, op in enumerate(ops):
                    await subject.run(op)
                    assert_maintained(subject.node.meta, f"after step {n}: {op}")
                # And GC reclaims exactly what the old walk of every blob would
                # have: every blob no manifest references, once its grace is over.
                subject.clock.advance(2 * GRACE_S)
                await subject.gc.collect()
                meta = subject.node.meta
                assert list(meta.unreferenced_blobs()) == []
                held = {keys.parse(k, keys.BlobKey).digest for k, _ in meta.scan(keys.BLOB)}
                assert all(unreferenced.referenced(d, meta.has_prefix) for d in held)
                assert_maintained(meta, "after the final pass")
            finally:
                subject.close()

        asyncio.run(scenario())


def test_a_database_without_the_set_finds_its_candidates_when_opened(tmp_path):
    """A data dir written before the set was kept: opening it finds every
    unreferenced blob, and the next pass reclaims them."""
    subject = Subject(tmp_path / "node")

    async def scenario() -> None:
        subject.open()
        for op in [("push blob", 0, b) for b in range(len(BLOBS))] + [("push manifest", 0, 0, 0)]:
            await subject.run(op)
        meta = subject.node.meta
        expected = {digest_of(BLOBS[b]) for b in (1, 4, 5)}
        assert set(meta.unreferenced_blobs()) == expected
        # What an older georeg leaves: the blobs and references, no set, no marker.
        batch = Batch()
        for digest in expected:
            batch.delete(keys.unreferenced(digest))
        batch.delete(keys.UNREFERENCED_SCHEME)
        meta.commit(batch)
        subject.close()
        subject.open()
        meta = subject.node.meta
        assert meta.unreferenced_rebuilt
        assert set(meta.unreferenced_blobs()) == expected
        subject.clock.advance(GRACE_S + 1)
        report = await subject.gc.collect()
        assert report.blobs_reclaimed == 3 and report.candidates == 3
        assert all(subject.node.blobs.exists(digest_of(BLOBS[b])) for b in (0, 2, 3))
        subject.close()

    asyncio.run(scenario())


# -- what a pass costs -------------------------------------------------------------


class ReadCount:
    """Counts the records a node's metadata store hands out (each ``get``, each
    key a scan yields, each ``has_prefix``) and the walks of its blob files.
    Instrumentation, not a stand-in: the real store answers every read."""

    def __init__(self, node: Node) -> None:
        self.records = 0
        self.file_walks = 0
        meta, blobs = node.meta, node.blobs
        get, scan, has_prefix, files = meta.get, meta.scan, meta.has_prefix, blobs.files

        def counted_get(key: bytes) -> bytes | None:
            self.records += 1
            return get(key)

        def counted_scan(prefix: bytes, after: bytes | None = None):
            for item in scan(prefix, after):
                self.records += 1
                yield item

        def counted_has_prefix(prefix: bytes) -> bool:
            self.records += 1
            return has_prefix(prefix)

        def counted_files():
            self.file_walks += 1
            return files()

        meta.get, meta.scan, meta.has_prefix, blobs.files = (
            counted_get, counted_scan, counted_has_prefix, counted_files)

    def during(self, run: Callable[[], object]) -> tuple[int, int]:
        records, walks = self.records, self.file_walks
        run()
        return self.records - records, self.file_walks - walks


async def _fill(node: Node, images: int, first: int = 0) -> None:
    registry = node.registry
    for i in range(first, first + images):
        repo = f"cost/r{i % 7}"
        config, layer = f'{{"n":{i}}}'.encode(), f"layer {i}".encode()
        for blob in (config, layer, BLOBS[2]):
            await registry.put_blob(repo, Digest.parse(digest_of(blob)), _chunks(blob), len(blob))
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": descriptor(config, OCI_CONFIG),
                           "layers": [descriptor(BLOBS[2], OCI_LAYER),
                                      descriptor(layer, OCI_LAYER)]}).encode()
        await registry.put_manifest(repo, f"v{i}", body, OCI_MANIFEST)


async def test_a_pass_over_live_images_reads_the_same_few_records_at_any_size(tmp_path):
    """With no garbage, a pass reads a constant number of records whether the
    node holds 20 images or 200 (the walk of every blob record read 3 per
    blob), and walks the blob files once per process, not every pass. With
    garbage, what it reads grows with the garbage only."""
    subject = Subject(tmp_path / "node")
    subject.open()
    try:
        node, clock, gc = subject.node, subject.clock, subject.gc
        count = ReadCount(node)
        await _fill(node, 20)
        clock.advance(GRACE_S + 1)           # every blob old enough to go: only references keep it

        async def collect() -> tuple[int, int]:
            before = count.records, count.file_walks
            report = await gc.collect()
            assert report.blobs_reclaimed == 0 and report.candidates == 0
            return count.records - before[0], count.file_walks - before[1]

        first = await collect()
        small = await collect()
        await _fill(node, 180, first=20)
        clock.advance(GRACE_S + 1)
        # The first pass after the push looks once at each digest the push named
        # (their touches expire): work that follows activity, not content.
        settling = await collect()
        assert settling[0] <= 2 * 180 * 3, settling
        large = await collect()
        assert first[1] == 1, "the blob files are walked once, in the first pass after the grace"
        assert small == large == (small[0], 0), f"20 images: {small}, 200 images: {large}"
        assert large[0] <= 5, f"{large[0]} records read by an idle pass"

        garbage = [f"garbage {i}".encode() for i in range(10)]
        for blob in garbage:
            await node.registry.put_blob("cost/r0", Digest.parse(digest_of(blob)), _chunks(blob),
                                         len(blob))
        clock.advance(GRACE_S + 1)
        before = count.records
        report = await gc.collect()
        assert report.blobs_reclaimed == len(garbage) == report.candidates
        assert count.records - before <= large[0] + 12 * len(garbage)
        assert not any(node.blobs.exists(digest_of(blob)) for blob in garbage)
        assert await collect() == small
    finally:
        subject.close()


async def test_a_file_left_without_its_record_in_a_running_node_is_swept_without_a_walk(tmp_path):
    """A blob moved into place whose metadata write then failed (the node keeps
    running): found through its expired touch, not by walking every file."""
    subject = Subject(tmp_path / "node")
    subject.open()
    try:
        node, clock, gc = subject.node, subject.clock, subject.gc
        count = ReadCount(node)
        await _fill(node, 5)
        clock.advance(GRACE_S + 1)
        await gc.collect()                   # the once-per-process walk
        data = b"placed, never recorded"
        digest = digest_of(data)
        # What Registry._commit_upload does before its commit, which failed.
        node.registry.touch(digest)
        upload = node.blobs.create_upload("6f1c2f52-7f7e-4c55-9a4f-0d4f7c0d9a11")
        upload.write(data)
        upload.flush()
        node.blobs.commit_upload(upload, digest)
        assert node.blobs.exists(digest)
        clock.advance(GRACE_S - 1)
        await gc.collect()
        assert node.blobs.exists(digest), "named within the grace"
        clock.advance(2)
        walks = count.file_walks
        report = await gc.collect()
        assert report.blobs_reclaimed == 1 and not node.blobs.exists(digest)
        assert count.file_walks == walks
        assert node.registry.touched == {}, "expired touches are dropped"
    finally:
        subject.close()


# -- crashes ---------------------------------------------------------------------

CRASH_REPOS = ("crash/a", "crash/b")


def offline_problems(data_dir: Path, where: str) -> list[str]:
    """The stopped node's data dir, read directly: the set kept, not rebuilt
    on this open, and equal to a recomputation."""
    meta = MetadataStore(data_dir / "meta")
    try:
        if meta.unreferenced_rebuilt:
            return [f"{where}: the data dir had no maintained set"]
        problems = [f"{where}: {problem}" for problem in meta.unreferenced_discrepancies()]
        if not meta.has_prefix(keys.REF):
            problems.append(f"{where}: nothing was referenced before the kill")
        return problems
    finally:
        meta.close()


async def collect_after_restart(data_dir: Path, where: str) -> None:
    """Open what the kill left as its node does, let the grace pass and collect:
    every blob a manifest names is still there, and the set still holds."""
    subject = Subject(data_dir)
    subject.config = NodeConfig(data_dir=data_dir, sync=False)   # the process's region
    subject.open()
    try:
        subject.clock.advance(GRACE_S + 1)
        await subject.gc.collect()
        assert_maintained(subject.node.meta, f"{where}, after a pass")
    finally:
        subject.close()


async def churn(http: aiohttp.ClientSession, base: str, rng: random.Random,
                acks: list[int]) -> None:
    """Push blobs and manifests over shared and own layers, re-tag and delete,
    until the node dies."""
    try:
        while True:
            repo = rng.choice(CRASH_REPOS)
            roll = rng.random()
            if roll < 0.3:
                blob = f"layer {rng.randrange(30)}".encode()
                async with http.post(f"{base}/v2/{repo}/blobs/uploads/",
                                     params={"digest": digest_of(blob)}, data=blob) as r:
                    assert r.status == 201, await r.text()
            elif roll < 0.7:
                n = rng.randrange(30)
                layer = f"layer {n}".encode()
                for blob in (BLOBS[0], layer):
                    async with http.post(f"{base}/v2/{repo}/blobs/uploads/",
                                         params={"digest": digest_of(blob)}, data=blob) as r:
                        assert r.status == 201, await r.text()
                body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": descriptor(BLOBS[0], OCI_CONFIG),
                                   "layers": [descriptor(BLOBS[2], OCI_LAYER),
                                              descriptor(layer, OCI_LAYER)]}).encode() \
                    if rng.random() < 0.5 else image_body(0, (2, 3))
                for blob in (BLOBS[2], BLOBS[3]):
                    async with http.post(f"{base}/v2/{repo}/blobs/uploads/",
                                         params={"digest": digest_of(blob)}, data=blob) as r:
                        assert r.status == 201, await r.text()
                async with http.put(f"{base}/v2/{repo}/manifests/{rng.choice(TAGS)}", data=body,
                                    headers={"Content-Type": OCI_MANIFEST}) as r:
                    assert r.status == 201, await r.text()
            else:
                n = rng.randrange(30)
                body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": descriptor(BLOBS[0], OCI_CONFIG),
                                   "layers": [descriptor(BLOBS[2], OCI_LAYER),
                                              descriptor(f"layer {n}".encode(), OCI_LAYER)]}
                                  ).encode()
                ref = rng.choice([*TAGS, digest_of(body), digest_of(image_body(0, (2, 3)))])
                async with http.delete(f"{base}/v2/{repo}/manifests/{ref}") as r:
                    assert r.status in (202, 404), await r.text()
            acks[0] += 1
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        return      # the node is gone


async def test_a_kill_9_in_the_middle_of_writes_never_parts_the_set_from_the_references(
        node_process):
    """SIGKILL at a random moment of concurrent blob pushes, manifest pushes and
    deletes: whatever the WAL kept, the candidates agree with the blobs and
    references beside them, without a rebuild."""
    proc = node_process("gcref")
    rng = random.Random(2512)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for round_ in range(2):
            acks = [0]
            target = rng.randrange(40, 300)
            clients = [asyncio.create_task(churn(http, proc.url, random.Random(rng.random()), acks))
                       for _ in range(4)]
            await eventually(lambda acks=acks, target=target: acks[0] >= target, timeout=60,
                             what=f"{target} acknowledged writes")
            proc.kill()
            await asyncio.gather(*clients)
            where = f"round {round_} (killed after {acks[0]} acks)"
            problems = offline_problems(proc.data_dir, where)
            assert not problems, "\n".join(problems)
            await collect_after_restart(proc.data_dir, where)
            proc.start()
