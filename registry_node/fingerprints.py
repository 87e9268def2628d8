"""Anti-entropy fingerprints, maintained on write.

Owns: what a repository's fingerprint is, and keeping it stored beside the
registers it summarises, so that comparing two replicas costs a read per
repository instead of a scan of everything they hold.

A register contributes one term, the SHA-256 of what anti-entropy compares of
it, read as a 256-bit integer:

* a tag: its name, digest and stamp, live or deleted (a tombstone);
* a manifest: its digest only while present (its stamp is renewed by tag sets
  that residency may keep from some replicas), its digest and stamp once
  deleted;
* a set of changeable attributes (``locks``: the repository's, a tag's or a
  manifest's): what it is about, its four values and its stamp. The region
  is its origin region, as for the ``attributes_set`` event that carries it.

A fingerprint is the sum of the terms modulo 2**256 (a hash-sum, as Dynamo's
and Cassandra's range digests are order-free): any order of the same writes
gives the same sum, and a write changes it in O(1) — add the new value's term,
subtract the old one's. Sums are kept per repository *and per region*, the
region whose residency decides where the register may go (a tag or tombstone:
its origin region; a manifest: the region it was first pushed in), because the
state two replicas may both hold is the registers of some regions only; a
fingerprint over it is the sum of those regions' sums (``visible_fingerprint``).

Repositories are spread over ``keys.FINGERPRINT_BUCKETS`` buckets by a hash of
their name, and each bucket keeps the sum of its repositories' sums, by
region, in the same commit. Two nodes compare the buckets first — a fixed
number of reads, however many repositories there are — and then only the
repositories of the buckets that differ. (A bucket's sum is filtered by region
only; a residency policy with per-repository rules compares repositories
directly.)

Invariant: after every commit, ``fp\\0<bucket>\\0<repo>`` equals ``recompute(repo)``,
and ``fpb\\0<bucket>`` the sum of its repositories' sums.
``MetadataStore.commit`` calls ``stage`` on every batch before writing it, and
the updated sums go into that same ``WriteBatch``: a crash keeps the registers
and their sums together or neither. ``stage`` reads the registers' previous
values from the database; commits are synchronous on the event loop, so
nothing changes between that read and the write. A database written before
fingerprints were kept (no ``meta\\0fingerprints``) is summed once on open
(``rebuild``).

Equal fingerprints mean equal compared state with overwhelming probability for
registers written by honest replicas; a hash-sum is not a commitment against a
peer that chooses registers to collide (peers are authenticated by mTLS).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from . import keys
from .records import (
    AttributesRecord,
    FingerprintSums,
    ManifestRecord,
    TagRecord,
    Tombstone,
    decode,
    encode,
)

# Two versions, changed together when a term changes (``term``): ``SCHEME``,
# the stored one (a database marked with another is summed again on open), and
# ``SUMMED``, the wire one (a peer summing the old terms must not be compared
# with: every repository would differ). Changing only the bucket layout
# (``keys.FINGERPRINT_BUCKETS``) bumps ``SCHEME`` alone: peers learn it from
# ``Summary.bucket_count``.
#
# Downgrading: a georeg older than the sums writes registers without them and
# leaves the marker in place, so the next upgrade would trust sums that no
# longer add up (those registers never offered in a summary). A downgrade must
# therefore delete ``meta\0fingerprints`` (with the node stopped); the upgrade
# then sums everything again. ``MetadataStore.fingerprint_discrepancies``
# finds a database where that was forgotten.
SCHEME = b"3"          # meta\0fingerprints: bump when a term or the layout changes
# How fingerprints travel (proto: SummaryRequest/Summary.fingerprint_scheme).
RECOMPUTED = 0         # SHA-256 over tags and manifests in key order (georeg before the sums)
SUMMED_WITHOUT_ATTRIBUTES = 1   # the sums before attributes were registers: a georeg
                                # that asks in it, or answers in it, is compared in RECOMPUTED
SUMMED = 2             # ``visible_fingerprint`` of the maintained sums; see above
MODULUS = 1 << 256
EMPTY = bytes(32)

Get = Callable[[bytes], bytes | None]


def term(register: keys.TagKey | keys.ManifestKey | keys.TagTombKey | keys.ManifestTombKey
         | keys.AttributesKey, value: bytes) -> tuple[str, int]:
    """(region deciding residency, the register's term) for one stored register."""
    match register:
        case keys.TagKey(tag=tag):
            record = decode(value, TagRecord)
            region, text = record.origin_region, (
                f"t|{tag}|{record.digest}|0|{record.hlc}|{record.origin_region}|{record.origin_zone}")
        case keys.TagTombKey(tag=tag):
            tomb = decode(value, Tombstone)
            region, text = tomb.origin_region, (
                f"t|{tag}|{tomb.digest}|1|{tomb.hlc}|{tomb.origin_region}|{tomb.origin_zone}")
        case keys.ManifestKey(digest=digest):
            record = decode(value, ManifestRecord)
            region, text = record.residency_region, f"m|{digest}|0"
        case keys.ManifestTombKey(digest=digest):
            tomb = decode(value, Tombstone)
            region, text = tomb.origin_region, (
                f"m|{digest}|1|{tomb.hlc}|{tomb.origin_region}|{tomb.origin_zone}")
        case keys.AttributesKey():
            record = decode(value, AttributesRecord)
            a = record.attributes
            region, text = record.origin_region, (
                f"a|{attributes_target(register)}|{int(a.delete_enabled)}{int(a.write_enabled)}"
                f"{int(a.read_enabled)}{int(a.list_enabled)}|{record.hlc}|{record.origin_region}"
                f"|{record.origin_zone}")
    return region, int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def attributes_target(register: keys.AttributesKey) -> str:
    """What an attributes register is about, unambiguously: ``r``, ``t|<tag>``
    or ``m|<digest>``."""
    match register:
        case keys.TagAttributesKey(tag=tag):
            return f"t|{tag}"
        case keys.ManifestAttributesKey(digest=digest):
            return f"m|{digest}"
    return "r"


def sums_of(raw: bytes | None) -> dict[str, int]:
    if raw is None:
        return {}
    return {region: int.from_bytes(s, "big") for region, s in decode(raw, FingerprintSums).sums.items()}


def encode_sums(sums: dict[str, int]) -> bytes | None:
    """The stored value for ``sums``; ``None`` when nothing is left to sum."""
    kept = {region: (s % MODULUS).to_bytes(32, "big") for region, s in sorted(sums.items())
            if s % MODULUS}
    return encode(FingerprintSums(kept)) if kept else None


def stage(puts: dict[bytes, bytes], deletes: Iterable[bytes], get: Get) -> dict[bytes, bytes | None]:
    """The fingerprint keys a batch of ``puts`` and ``deletes`` changes, with
    their new values (``None``: delete it), given ``get`` reading the database
    as it is before the batch. Writing the same value again, or deleting an
    absent register, changes nothing."""
    deltas: dict[str, dict[str, int]] = {}

    def account(key: bytes, new: bytes | None) -> None:
        register = keys.register(key)
        if register is None:
            return
        repo = deltas.setdefault(register.repository, {})
        old = get(key)
        if old is not None:
            region, t = term(register, old)
            repo[region] = repo.get(region, 0) - t
        if new is not None:
            region, t = term(register, new)
            repo[region] = repo.get(region, 0) + t

    for key, value in puts.items():
        account(key, value)
    for key in deletes:
        account(key, None)
    out: dict[bytes, bytes | None] = {}
    buckets: dict[int, dict[str, int]] = {}
    for repo, delta in deltas.items():
        if not any(d % MODULUS for d in delta.values()):
            continue
        _add(out, keys.fingerprint(repo), delta, get)
        bucket = buckets.setdefault(keys.fingerprint_bucket(repo), {})
        for region, d in delta.items():
            bucket[region] = bucket.get(region, 0) + d
    for bucket, delta in buckets.items():
        _add(out, keys.bucket_fingerprint(bucket), delta, get)
    return out


def _add(out: dict[bytes, bytes | None], key: bytes, delta: dict[str, int], get: Get) -> None:
    sums = sums_of(get(key))
    for region, d in delta.items():
        sums[region] = sums.get(region, 0) + d
    out[key] = encode_sums(sums)


def registers(scan: Callable[[bytes], Iterator[tuple[bytes, bytes]]],
              repo: str) -> Iterator[tuple[bytes, bytes]]:
    """Every register of ``repo`` that a fingerprint sums, as stored."""
    for prefix in (keys.tag_prefix(repo), keys.manifest_prefix(repo), keys.tomb_prefix(repo),
                   keys.attributes_prefix(repo)):
        for key, value in scan(prefix):
            if keys.register(key) is not None:
                yield key, value


def recompute(scan: Callable[[bytes], Iterator[tuple[bytes, bytes]]], repo: str) -> dict[str, int]:
    """The sums of ``repo`` from its registers, the slow way (O(its registers))."""
    sums: dict[str, int] = {}
    for key, value in registers(scan, repo):
        region, t = term(keys.register(key), value)
        sums[region] = (sums.get(region, 0) + t) % MODULUS
    return {region: s for region, s in sums.items() if s}


def recompute_all(scan: Callable[[bytes], Iterator[tuple[bytes, bytes]]]
                  ) -> tuple[dict[str, dict[str, int]], dict[int, dict[str, int]]]:
    """Every repository's sums and every bucket's, the slow way (O(everything))."""
    names = {keys.parse(k, keys.RepoKey).repository for k, _ in scan(keys.REPO)}
    names.update(keys.parse(k, keys.TombKey).repository for k, _ in scan(keys.TOMB))
    names.update(keys.parse(k, keys.AttributesKey).repository for k, _ in scan(keys.ATTRIBUTES))
    repos: dict[str, dict[str, int]] = {}
    buckets: dict[int, dict[str, int]] = {}
    for name in sorted(names):
        if sums := recompute(scan, name):
            repos[name] = sums
            add_sums(buckets.setdefault(keys.fingerprint_bucket(name), {}), sums)
    buckets = {b: {region: s for region, s in sums.items() if s} for b, sums in buckets.items()}
    return repos, {b: sums for b, sums in buckets.items() if sums}


def add_sums(total: dict[str, int], sums: dict[str, int]) -> dict[str, int]:
    """``total`` plus ``sums``, region by region (in place; returned)."""
    for region, s in sums.items():
        total[region] = (total.get(region, 0) + s) % MODULUS
    return total


def visible_fingerprint(sums: dict[str, int], visible: Callable[[str], bool]) -> bytes:
    """The fingerprint of the registers whose region passes ``visible``."""
    return (sum(s for region, s in sums.items() if visible(region)) % MODULUS).to_bytes(32, "big")
