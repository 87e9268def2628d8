"""Storage a node holds, as ACR counts a registry's: every unique blob once
(``blob\\0<digest>``, whatever number of repositories link it) plus every
manifest record (``r\\0<repo>\\0m\\0<digest>``: each repository keeps its own
sealed copy) and every manifest in a recycle bin (``bin\\0<repo>\\0m\\0<digest>``,
its record's size: ACR counts soft-deleted artifacts toward storage), in
plaintext bytes — maintained on write.

Owns: the one value ``meta\\0usage`` (``keys.USAGE``), a ``StorageUsage``
kept beside the records it sums, so reading it costs one lookup whatever is
stored (``show-usage``, the storage limit checked on every upload).

Invariant: after every commit, ``meta\\0usage`` equals the sum over the blob
and manifest records held. ``MetadataStore.commit`` calls ``stage`` on every
batch and writes the new value into the same ``WriteBatch``: a crash
(``kill -9``) keeps a record and its count together or neither, and no code
path that writes a blob or manifest record (a push, replication,
anti-entropy, a delete, garbage collection) can forget it. ``stage`` reads
the records being replaced from the database before the write, in the same
event-loop step as the commit. A database without the value (written before
it was kept) is summed once when opened (``recompute``); a downgrade to a
georeg that does not keep it must delete ``meta\\0usage`` (node stopped), as
for the fingerprints and the unreferenced set, and the next upgrade sums it
again. ``MetadataStore.usage_discrepancies`` finds one where that was
forgotten.

What it does not count: upload sessions in progress (their bytes are not
stored yet; the storage limit reserves them while they commit,
``Registry``), blob files with no record (a crash between placing a file and
recording it; garbage collection removes them), and tombstones.

Cost per commit: one point read per blob or manifest record written or
deleted (the value it replaces), in the same step as the commit's other reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import msgspec

from . import keys
from .records import BlobRecord, ManifestRecord, RecycledManifest
from .records import decode as decode_record

Get = Callable[[bytes], bytes | None]
Scan = Callable[[bytes], Iterator[tuple[bytes, bytes]]]


class StorageUsage(msgspec.Struct, frozen=True):
    """What a node stores, in plaintext bytes and records."""

    blob_bytes: int = 0
    blobs: int = 0
    manifest_bytes: int = 0
    manifests: int = 0
    recycled_bytes: int = 0       # manifests in recycle bins (soft delete)
    recycled: int = 0

    @property
    def bytes(self) -> int:
        return self.blob_bytes + self.manifest_bytes + self.recycled_bytes

    def __add__(self, other: StorageUsage) -> StorageUsage:
        return StorageUsage(self.blob_bytes + other.blob_bytes, self.blobs + other.blobs,
                            self.manifest_bytes + other.manifest_bytes,
                            self.manifests + other.manifests,
                            self.recycled_bytes + other.recycled_bytes,
                            self.recycled + other.recycled)

    def as_dict(self) -> dict[str, int]:
        return {"bytes": self.bytes, "blob_bytes": self.blob_bytes, "blobs": self.blobs,
                "manifest_bytes": self.manifest_bytes, "manifests": self.manifests,
                "recycled_bytes": self.recycled_bytes, "recycled": self.recycled}


ZERO = StorageUsage()
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StorageUsage)


def encode(usage: StorageUsage) -> bytes:
    return _encoder.encode(usage)


def decode(raw: bytes | None) -> StorageUsage:
    return ZERO if raw is None else _decoder.decode(raw)


def _size(kind: str, raw: bytes) -> int:
    if kind == keys.RECYCLED_MANIFEST_RECORD:
        return decode_record(raw, RecycledManifest).record.size
    record = BlobRecord if kind == keys.BLOB_RECORD else ManifestRecord
    return decode_record(raw, record).size


def _usage(sums: dict[str, list[int]]) -> StorageUsage:
    (blob_bytes, blobs), (manifest_bytes, manifests), (recycled_bytes, recycled) = (
        sums[keys.BLOB_RECORD], sums[keys.MANIFEST_RECORD], sums[keys.RECYCLED_MANIFEST_RECORD])
    return StorageUsage(blob_bytes, blobs, manifest_bytes, manifests, recycled_bytes, recycled)


def stage(puts: dict[bytes, bytes], deletes: Iterable[bytes], get: Get) -> StorageUsage | None:
    """How a batch of ``puts`` and ``deletes`` changes the usage, given ``get``
    reading the database as it is before the batch; None when it does not
    (the common case: a batch that writes no blob or manifest record)."""
    # [bytes, records] per kind; plain ints, as this runs on every commit.
    delta = {keys.BLOB_RECORD: [0, 0], keys.MANIFEST_RECORD: [0, 0],
             keys.RECYCLED_MANIFEST_RECORD: [0, 0]}
    changed = False
    for key, value in puts.items():
        kind = keys.content_record(key)
        if kind is None:
            continue
        changed = True
        sums = delta[kind]
        old = get(key)
        if old is not None:
            sums[0] -= _size(kind, old)
            sums[1] -= 1
        sums[0] += _size(kind, value)
        sums[1] += 1
    for key in deletes:
        kind = keys.content_record(key)
        if kind is None:
            continue
        old = get(key)
        if old is not None:
            changed = True
            sums = delta[kind]
            sums[0] -= _size(kind, old)
            sums[1] -= 1
    if not changed:
        return None
    found = _usage(delta)
    return found if found != ZERO else None


def recompute(scan: Scan) -> StorageUsage:
    """The usage summed from every record held, the slow way (O(records))."""
    sums = {keys.BLOB_RECORD: [0, 0], keys.MANIFEST_RECORD: [0, 0],
            keys.RECYCLED_MANIFEST_RECORD: [0, 0]}
    for prefix in (keys.BLOB, keys.REPO_DATA, keys.RECYCLE_BIN):
        for key, raw in scan(prefix):
            kind = keys.content_record(key)
            if kind is not None:
                sums[kind][0] += _size(kind, raw)
                sums[kind][1] += 1
    return _usage(sums)
