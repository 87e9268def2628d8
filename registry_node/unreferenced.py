"""Blobs that no manifest references: garbage collection's candidates,
maintained on write.

Owns: the set ``unref\\0<digest>`` (``keys.unreferenced``) of the blobs this
node holds (``blob\\0<digest>``) that no manifest of any repository references
(no ``ref\\0<digest>\\0…``, and no ``binref\\0<digest>\\0…``: a manifest
in a recycle bin keeps what it needs, ``recycle_bin``), kept beside the keys it is derived from, so a GC
pass reads its candidates instead of every blob: its cost follows what became
garbage (or is about to be referenced), not what is stored.

Invariant: after every commit, ``unref\\0<d>`` exists exactly when ``blob\\0<d>``
does and no ``ref\\0<d>\\0…`` does. ``MetadataStore.commit`` calls ``stage`` on
every batch before writing it, and the changed entries go into that same
``WriteBatch``: a crash (``kill -9``) keeps a blob's record, its references
and its candidacy together or none of them, so no code path that writes a
blob record or a manifest can forget the set and no crash can part them.
``stage`` reads the state before the batch from the database; commits are
synchronous on the event loop, so nothing changes between that read and the
write. A database written before the set was kept (no
``meta\\0unreferenced``, or another ``SCHEME``) is recomputed once when opened.

What the set is, and is not, trusted for: it decides which blobs a GC pass
*looks at*, never which it removes. The collector checks the references
again in the event-loop step that removes a blob (``gc``), so an entry that
is wrong in the unsafe direction (a referenced blob listed) costs one wasted
check; one missing would only leave garbage on disk. Either can only come
from a georeg older than the set writing to the database: a downgrade must
therefore delete ``meta\\0unreferenced`` (node stopped), as for the
fingerprints, and the next upgrade recomputes the set.
``MetadataStore.unreferenced_discrepancies`` finds a database where that was
forgotten.

Deleted entries stay as RocksDB tombstones in the ``unref`` range until
compaction drops them, so a pass's scan of the range steps over the
tombstones of recent candidates too (a blob is a candidate from its upload
until its manifest arrives); measured in ``tests/gc_idle_cost.py``.

Cost per commit: one point read per blob record or reference written (two
where a reference is removed, plus a seek for another reference of the same
target), in the same step as the commit's other reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from . import keys

SCHEME = b"1"          # meta\0unreferenced: bump when what the set holds changes

Get = Callable[[bytes], bytes | None]
Scan = Callable[[bytes], Iterator[tuple[bytes, bytes]]]


def stage(puts: dict[bytes, bytes], deletes: Iterable[bytes], get: Get,
          scan: Scan) -> dict[bytes, bytes | None]:
    """The ``unref`` keys a batch of ``puts`` and ``deletes`` changes, with
    their new values (``None``: delete it), given ``get`` and ``scan`` reading
    the database as it is before the batch."""
    deletes = deletes if isinstance(deletes, (set, frozenset, dict)) else set(deletes)
    touched: set[str] = set()
    referenced: set[str] = set()     # a reference to it is written by this batch
    for key in puts:
        match keys.reference_holder(key):
            case keys.RefKey(target=target) | keys.RecycledRefKey(target=target):
                touched.add(target)
                referenced.add(target)
            case keys.BlobKey(digest=digest):
                touched.add(digest)
    for key in deletes:
        match keys.reference_holder(key):
            case keys.RefKey(target=digest) | keys.RecycledRefKey(target=digest) \
                    | keys.BlobKey(digest=digest):
                touched.add(digest)
    out: dict[bytes, bytes | None] = {}
    for digest in touched:
        candidate = digest not in referenced and _held(digest, puts, deletes, get) \
            and not _referenced_elsewhere(digest, deletes, scan)
        key = keys.unreferenced(digest)
        if candidate != (get(key) is not None):
            out[key] = b"" if candidate else None
    return out


def _held(digest: str, puts: dict[bytes, bytes], deletes: Iterable[bytes], get: Get) -> bool:
    """Whether ``blob\\0<digest>`` exists once the batch is written."""
    key = keys.blob(digest)
    return key in puts or (key not in deletes and get(key) is not None)


def _referenced_elsewhere(digest: str, deletes: Iterable[bytes], scan: Scan) -> bool:
    """Whether a reference to ``digest`` that the batch does not delete is stored."""
    return any(key not in deletes for prefix in reference_prefixes(digest)
               for key, _ in scan(prefix))


def reference_prefixes(digest: str) -> tuple[bytes, bytes]:
    """Where the references that keep ``digest`` from garbage collection are:
    live manifests', and recycled manifests' (``recycle_bin``)."""
    return keys.ref_prefix(digest), keys.recycled_ref_prefix(digest)


def referenced(digest: str, has_prefix: Callable[[bytes], bool]) -> bool:
    """Whether a live or recycled manifest references ``digest``."""
    return any(has_prefix(prefix) for prefix in reference_prefixes(digest))


def recompute(scan: Scan, has_prefix: Callable[[bytes], bool]) -> set[str]:
    """Every blob held and referenced by no manifest, the slow way (O(blobs))."""
    held = (keys.parse(key, keys.BlobKey).digest for key, _ in scan(keys.BLOB))
    return {digest for digest in held if not referenced(digest, has_prefix)}


def stored(scan: Scan) -> set[str]:
    """The maintained set, as stored."""
    return {keys.parse(key, keys.UnreferencedKey).digest for key, _ in scan(keys.UNREFERENCED)}
