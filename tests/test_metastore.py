"""The metadata store's memory: bounded however much metadata a node keeps;
and its group sync, which also fsyncs the directories a replicated blob was
renamed into, before the WAL, and reports a failure instead of promising."""

from __future__ import annotations

import random

import pytest

from registry_node.metastore import BLOCK_CACHE_BYTES, MEMTABLE_BYTES, Batch, MetadataStore

MIB = 1 << 20


def test_metadata_memory_stays_bounded_as_the_store_grows(tmp_path):
    """24 MB of metadata written, then all of it read back in random order: what
    RocksDB holds in memory stays within its caps (with RocksDB's defaults, a
    64 MiB memtable and a 32 MiB block cache, it held 28 MiB here and the
    memtable alone keeps growing to 64 MiB)."""
    meta = MetadataStore(tmp_path / "meta", sync=False)
    rng = random.Random(7)
    try:
        keys = []
        for i in range(20_000):
            batch = Batch()
            for k in range(5):
                key = b"t/%08d/%d/" % (i, k) + rng.randbytes(16)
                batch.put(key, rng.randbytes(230))
                keys.append(key)
            meta.commit(batch)
        rng.shuffle(keys)
        for key in keys:
            assert meta.get(key) is not None
        held = meta.memory_bytes()
        assert held <= 2 * MEMTABLE_BYTES + BLOCK_CACHE_BYTES + MIB, f"{held / MIB:.1f} MiB held"
    finally:
        meta.close()


async def test_a_directory_to_sync_goes_with_the_wal_and_its_failure_is_reported(tmp_path):
    meta = MetadataStore(tmp_path / "meta", sync=True)
    try:
        placed = tmp_path / "blobs" / "ab"
        placed.mkdir(parents=True)
        meta.sync_directory(placed)
        batch = Batch()
        batch.put(b"t/record", b"1")
        meta.commit(batch)
        await meta.synced()                 # the directory and the WAL, one trip

        gone = tmp_path / "blobs" / "cd"    # a directory that cannot be fsynced
        meta.sync_directory(gone)
        batch = Batch()
        batch.put(b"t/record", b"2")
        meta.commit(batch)
        with pytest.raises(OSError):        # no acknowledgement may follow
            await meta.synced()
        gone.mkdir()
        await meta.synced()                 # still pending, and done once it can be
    finally:
        meta.close()


async def test_a_trim_pass_after_writes_writes_the_memtable_out(node, http):
    """The node's memory pass, after commits, flushes RocksDB's memtable: its
    arena goes back, the data stay (read back, and again after a restart)."""
    from registry_node.app import MEMORY_TRIM

    from .helpers import make_image, push_image, start_node

    images = [make_image([1024, 2048], seed=i) for i in range(40)]
    for i, image in enumerate(images):
        await push_image(http, node.url, "quiet/app", image, tag=f"v{i}")
    meta = node.node.meta
    written = meta.memtable_bytes()
    assert written > 64 * 1024, f"only {written} bytes in the memtable"
    await node.runner.app[MEMORY_TRIM].once()
    assert meta.memtable_bytes() < written / 4

    async def all_there(url: str) -> None:
        for i, image in enumerate(images):
            async with http.get(f"{url}/v2/quiet/app/manifests/v{i}",
                                headers={"Accept": image.media_type}) as r:
                assert r.status == 200 and await r.read() == image.manifest

    await all_there(node.url)
    await node.stop()
    again = await start_node(node.node.config)
    try:
        await all_there(again.url)
    finally:
        await again.stop()
