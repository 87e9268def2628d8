"""What a node holds, by residency region, maintained on write.

Owns: ``meta\\0content`` (``ContentCounts``: how many manifests, and how many
plaintext bytes of the distinct blobs they reference, the node holds, by the
region that decides their residency, ``ManifestRecord.residency_region``) and
``cnt\\0<digest>`` (``ReferringCounts``: how many manifests of each region
reference a digest, which is what makes "distinct" cheap to keep). Every
health check reports them (``/georeg/v1/node``, ``content``): the cluster
measures a replica's sync progress against them. They were once recomputed by
a walk of every manifest and blob record whenever the log had moved; while
pushes ran, every node of a cluster walked everything it held every two
seconds, so a push cost more the more the registry held.

Invariant: after every commit, ``meta\\0content`` and every ``cnt\\0<digest>``
equal ``recompute``. ``MetadataStore.commit`` calls ``stage`` on every batch
before writing it, and the changed counts go into that same ``WriteBatch``: a
crash keeps the records and their counts together or neither. ``stage`` reads
the state before the batch from the database; commits are synchronous on the
event loop, so nothing changes between that read and the write. A database
written before the counts were kept (no ``meta\\0contentcounts``, or another
``SCHEME``) is counted once when opened; a downgrade must delete that marker
(node stopped), as for the fingerprints.

A blob's bytes count for a region while at least one manifest of that region
references it and its record is held: a blob record written after the
manifests that name it (or deleted before them) moves the bytes then. A
reference to a child manifest names no blob record and counts no bytes.

Cost per commit: nothing for a batch without manifest or blob records; else
a read of each such record's previous value, two per digest they reference
(its blob record and its ``cnt``), and one of the totals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from . import keys
from .records import BlobRecord, ContentCounts, ManifestRecord, ReferringCounts, decode, encode

SCHEME = b"1"          # meta\0contentcounts: bump when what the counts hold changes

Get = Callable[[bytes], bytes | None]
Scan = Callable[[bytes], Iterator[tuple[bytes, bytes]]]
Summary = dict[str, dict[str, int]]


def stage(puts: dict[bytes, bytes], deletes: Iterable[bytes], get: Get) -> dict[bytes, bytes | None]:
    """The count keys a batch of ``puts`` and ``deletes`` changes, with their
    new values (``None``: delete it), given ``get`` reading the database as it
    is before the batch."""
    manifests: list[bytes] = []
    blobs: set[str] = set()
    for key in (*puts, *deletes):
        match keys.counted_content(key):
            case keys.ManifestKey():
                manifests.append(key)
            case keys.BlobKey(digest=digest):
                blobs.add(digest)
    if not manifests and not blobs:
        return {}
    images: dict[str, int] = {}
    referring: dict[str, dict[str, int]] = {}     # digest → region → change
    for key in manifests:
        for raw, sign in ((get(key), -1), (puts.get(key), 1)):
            if raw is None:
                continue
            record = decode(raw, ManifestRecord)
            region = record.residency_region
            images[region] = images.get(region, 0) + sign
            for digest in set(record.references):
                change = referring.setdefault(digest, {})
                change[region] = change.get(region, 0) + sign
    out: dict[bytes, bytes | None] = {}
    sizes: dict[str, int] = {}
    for digest in blobs | set(referring):
        held_before = _size(get(keys.blob(digest)))
        key = keys.blob(digest)
        held_after = _size(puts[key]) if key in puts else None if key in deletes else held_before
        count_key = keys.referring_counts(digest)
        raw = get(count_key)
        before = decode(raw, ReferringCounts).regions if raw is not None else {}
        after = dict(before)
        for region, change in referring.get(digest, {}).items():
            after[region] = after.get(region, 0) + change
        after = {region: n for region, n in after.items() if n}
        for region in before.keys() | after.keys():
            change = ((held_after or 0) if after.get(region, 0) > 0 else 0) \
                - ((held_before or 0) if before.get(region, 0) > 0 else 0)
            if change:
                sizes[region] = sizes.get(region, 0) + change
        if after != before:
            out[count_key] = encode(ReferringCounts(after)) if after else None
    if any(images.values()) or any(sizes.values()):
        raw = get(keys.CONTENT_COUNTS)
        totals = decode(raw, ContentCounts) if raw is not None else ContentCounts({}, {})
        out[keys.CONTENT_COUNTS] = encode(ContentCounts(_added(totals.images, images),
                                                        _added(totals.bytes, sizes)))
    return out


def summary(raw: bytes | None) -> Summary:
    """The stored totals as a node reports them: ``{region: {"images", "bytes"}}``
    for every region holding at least one manifest."""
    if raw is None:
        return {}
    counts = decode(raw, ContentCounts)
    return {region: {"images": n, "bytes": counts.bytes.get(region, 0)}
            for region, n in sorted(counts.images.items())}


def recompute(scan: Scan, get: Get) -> tuple[ContentCounts, dict[str, dict[str, int]]]:
    """The totals and every digest's referring counts, the slow way (O(every
    manifest and the blobs it references))."""
    images: dict[str, int] = {}
    referring: dict[str, dict[str, int]] = {}
    for key, raw in scan(keys.REPO_DATA):
        if not isinstance(keys.counted_content(key), keys.ManifestKey):
            continue
        record = decode(raw, ManifestRecord)
        region = record.residency_region
        images[region] = images.get(region, 0) + 1
        for digest in set(record.references):
            regions = referring.setdefault(digest, {})
            regions[region] = regions.get(region, 0) + 1
    sizes: dict[str, int] = {}
    for digest, regions in referring.items():
        size = _size(get(keys.blob(digest)))
        for region in regions if size else ():
            sizes[region] = sizes.get(region, 0) + size
    return ContentCounts(images, sizes), referring


def stored(scan: Scan, get: Get) -> tuple[ContentCounts, dict[str, dict[str, int]]]:
    """The maintained totals and referring counts, as stored."""
    raw = get(keys.CONTENT_COUNTS)
    totals = decode(raw, ContentCounts) if raw is not None else ContentCounts({}, {})
    referring = {keys.parse(key, keys.ReferringCountsKey).digest: decode(value, ReferringCounts).regions
                 for key, value in scan(keys.REFERRING_COUNTS)}
    return totals, referring


def _size(raw: bytes | None) -> int | None:
    return decode(raw, BlobRecord).size if raw is not None else None


def _added(total: dict[str, int], change: dict[str, int]) -> dict[str, int]:
    out = dict(total)
    for region, n in change.items():
        out[region] = out.get(region, 0) + n
    return {region: n for region, n in out.items() if n}
