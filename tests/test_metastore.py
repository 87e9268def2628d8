"""The metadata store's memory: bounded however much metadata a node keeps."""

from __future__ import annotations

import random

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
