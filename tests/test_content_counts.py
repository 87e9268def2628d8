"""What a node reports it holds (images and distinct blob bytes by residency
region: ``Replica.content_summary``, in every health check's ``/georeg/v1/node``),
maintained on write (``registry_node.content_counts``).

The invariant: after any commit, the stored counts equal what a walk of every
repository's manifests and their blobs finds (the walk the node did on every
health check while its log moved, before the counts were kept). Driven on a real
node by the operations of the GC-candidate tests (local pushes and deletes with
shared layers and an index, what other regions did, GC passes, reopening), by
Hypothesis. And the point of it: answering costs the same few reads at any size
(the walk read every manifest and blob record: while pushes ran, every node of a
cluster spent a share of a core on it that grew with what it held).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from registry_node import keys
from registry_node.metastore import MetadataStore
from registry_node.records import BlobRecord, ManifestRecord, decode

from .test_gc_candidates import GRACE_S, ReadCount, Subject, _fill, driven_by_operations


def walked(meta: MetadataStore) -> dict[str, dict[str, int]]:
    """Images and distinct blob bytes by residency region, the slow way: every
    repository of the catalog, each of its manifests, each blob it references."""
    images: dict[str, int] = {}
    blobs: dict[str, dict[str, int]] = {}
    for repo in [keys.parse(k, keys.RepoKey).repository for k, _ in meta.scan(keys.REPO)]:
        for _, raw in meta.scan(keys.manifest_prefix(repo)):
            record = decode(raw, ManifestRecord)
            region = record.residency_region
            images[region] = images.get(region, 0) + 1
            sizes = blobs.setdefault(region, {})
            for digest in record.references:
                if (blob := meta.get(keys.blob(digest))) is not None:
                    sizes[digest] = decode(blob, BlobRecord).size
    return {region: {"images": images[region], "bytes": sum(blobs.get(region, {}).values())}
            for region in images}


def assert_counted(subject: Subject, where: str) -> None:
    meta = subject.node.meta
    assert subject.replica.content_summary() == walked(meta), where
    assert meta.content_discrepancies() == [], where


# A layer shared by two manifests of a repository, by two repositories
# (SHARED_LAYER_RUNS), by an index's children; a region's last image deleted;
# an image from another region over the same blobs; reopening.
@driven_by_operations(
    [("push image", 2, 4, 0), ("remote manifest", 1, 0, 1), ("delete manifest", 2, 0),
     ("delete manifest", 2, 4), ("remote manifest delete", 1, 0, 2), ("reopen",),
     ("delete manifest", 2, 1), ("gc", GRACE_S + 1)])
def test_the_counts_equal_a_walk_of_everything_after_any_writes(ops):
    with tempfile.TemporaryDirectory(prefix="georeg-counts-") as tmp:
        subject = Subject(Path(tmp) / "node")

        async def scenario() -> None:
            subject.open()
            try:
                for n, op in enumerate(ops):
                    await subject.run(op)
                    assert_counted(subject, f"after step {n}: {op}")
                    if op == ("reopen",):
                        assert not subject.node.meta.content_counts_rebuilt, "kept, not rebuilt"
            finally:
                subject.close()

        asyncio.run(scenario())


async def test_answering_reads_the_same_few_records_at_any_size(tmp_path):
    """20 images or 200, the log moved since the last answer and the answer's
    age past any cache: the same few reads (the walk read ~4 per image)."""
    subject = Subject(tmp_path / "node")
    subject.open()
    try:
        count = ReadCount(subject.node)

        async def answered() -> int:
            subject.clock.advance(60.0)
            before = count.records
            summary = subject.replica.content_summary()
            reads = count.records - before
            assert summary == walked(subject.node.meta)
            return reads

        await _fill(subject.node, 20)
        small = await answered()
        await _fill(subject.node, 180, first=20)
        large = await answered()
        assert small == large, f"20 images: {small} reads, 200 images: {large}"
        assert large <= 2, f"{large} records read for one answer"
    finally:
        subject.close()


def test_a_database_without_the_counts_counts_once_when_opened(tmp_path):
    """A data dir written before the counts were kept (no marker): opening it
    counts once, and the counts are maintained from there."""
    subject = Subject(tmp_path / "node")

    async def scenario() -> None:
        subject.open()
        await subject.run(("push image", 0, 0, 0))
        await subject.run(("push image", 1, 4, 1))
        await subject.run(("remote manifest", 2, 3, 1))
        expected = walked(subject.node.meta)
        assert expected and subject.replica.content_summary() == expected
        subject.node.meta._db.delete(keys.CONTENT_COUNTS_SCHEME)   # what an older georeg left
        subject.close()
        subject.open()
        assert subject.node.meta.content_counts_rebuilt
        assert_counted(subject, "reopened")
        await subject.run(("delete manifest", 0, 0))
        assert_counted(subject, "after a delete")
        subject.close()
        subject.open()
        assert not subject.node.meta.content_counts_rebuilt
        assert_counted(subject, "reopened again")
        subject.close()

    asyncio.run(scenario())
