"""Every key in a node's metadata database is built here, and read back here:
nowhere else splits, slices or assembles key bytes.

Components are joined by NUL (``\\x00``). No repository name, tag, digest or
upload id can contain NUL (see ``reference``), so a prefix scan over one
repository never runs into another: ``r\\0app\\0`` cannot match ``app/web``.
Sequence numbers are 8-byte big-endian so byte order is numeric order.

The key space::

    meta\\0schema                          → schema version (ascii int)
    meta\\0identity                        → NodeIdentity      which region/zone wrote this DB
    meta\\0hlc                             → last HLC stamp issued (ascii int)
    meta\\0keycheck                        → key check value   which node key encrypted this DB
    meta\\0fingerprints                    → scheme (ascii int) the fp\\0 sums below are maintained
    meta\\0unreferenced                    → scheme (ascii int) the unref\\0 set below is maintained
    meta\\0contentcounts                   → scheme (ascii int) meta\\0content and cnt\\0 are maintained
    meta\\0content                         → ContentCounts     images and blob bytes held, by
                                                                residency region (``content_counts``)
    meta\\0logfloor                        → seq (ascii int)   the log is truncated up to here
    meta\\0tombindex                       → scheme (ascii int) every tombstone has its tgc\\0 entry
    meta\\0tombstones                      → count (ascii int) tombstones held (kept by each commit)
    meta\\0usage                           → StorageUsage      bytes and records of the blobs and
                                                                manifests held (kept by each commit:
                                                                ``usage``)
    meta\\0webhookfeed                     → seq (ascii int)   webhooks have been made from the log
                                                                up to here (``webhook_outbox``)
    meta\\0webhookseq                      → number (ascii int) the last webhook entry's number
    log\\0<seq:u64be>                       → Event             the replication log, seq from 1
                                                                (above meta\\0logfloor)
    blob\\0<digest>                         → BlobRecord        the node holds this blob's file
    ref\\0<target>\\0<repo>\\0<manifest>      → b""               <manifest> in <repo> needs <target>
    binref\\0<target>\\0<repo>\\0<manifest>   → b""               <manifest>, in <repo>'s recycle bin,
                                                                needs <target>: kept from GC as a
                                                                reference is (``recycle_bin``)
    user\\0<digest>\\0<repo>                → b""               <repo> links blob <digest>
    unref\\0<digest>                        → b""               blob\\0<digest> is held and no ref\\0<digest>\\0…
                                                                is: a GC candidate (see ``unreferenced``)
    cnt\\0<digest>                          → ReferringCounts   how many manifests of each residency
                                                                region reference <digest>
                                                                (``content_counts``)
    repo\\0<repo>                           → RepoRecord        the catalog
    r\\0<repo>\\0
    ├── b\\0<digest>                        → BlobLink          blob is visible in <repo>
    ├── m\\0<digest>                        → ManifestRecord    manifest (sealed body inside)
    ├── t\\0<tag>                           → TagRecord         tag → digest, with its HLC
    └── s\\0<subject>\\0<referrer>           → sealed Descriptor referrers of <subject> (annotations are client data)
    upload\\0<uuid>                         → UploadRecord      an open upload session
    tomb\\0<repo>\\0
    ├── t\\0<tag>                           → Tombstone         a deleted tag
    ├── m\\0<digest>                        → Tombstone         a deleted manifest
    └── b\\0<digest>                        → Tombstone         a deleted blob link
    bin\\0<repo>\\0                           the recycle bin (soft delete, ``recycle_bin``)
    ├── m\\0<digest>                        → RecycledManifest  a soft-deleted manifest, its tags
    └── t\\0<tag>                           → RecycledTag       a soft-deleted (untagged) tag
    attr\\0<repo>\\0                          changeable attributes (locks), registers of their own
    ├── r                                 → Attributes        the repository's
    ├── t\\0<tag>                           → Attributes        a tag's (kept when the tag moves)
    └── m\\0<digest>                        → Attributes        a manifest's
    cursor\\0<peer name>                    → Cursor            how far a peer's log is applied
    reader\\0<node name>                   → LogReader         how far a node has read this log
                                                                (``replicator.retention``)
    tgc\\0<seq:u64be><tomb key>              → TombstoneCandidate  a tombstone written by the
                                                                event at <seq>, to collect once
                                                                every peer read past it
    untag\\0<region>\\0<repo>\\0<digest>     → UntaggedNote      a manifest first pushed in
                                                                <region> that may be untagged: a
                                                                tag or an index left it (when,
                                                                here, and that change's stamp;
                                                                ``untagged``)
    fail\\0<repo>\\0<digest>                → ReplicationFailure  why content could not replicate
                                                                (<digest> is the event's tag when
                                                                it names no digest)
    xfer\\0<digest>                         → upload id         an inbound blob transfer to resume
    conf\\0<kind>\\0<name>                  → ConfigRecord      registry configuration object (or
                                                                its tombstone), registry-wide
    fp\\0<bucket>\\0<repo>                  → FingerprintSums   hash-sums of the tag and
                                                                manifest registers (live and
                                                                tombstones) of <repo>, by region
                                                                (see ``fingerprints``)
    fpb\\0<bucket>                          → FingerprintSums   the same, over every <repo> of
                                                                the bucket (two hex digits:
                                                                ``fingerprint_bucket``)
    whp\\0<webhook>\\0<number:016x>          → WebhookEntry      a webhook event to deliver: the
                                                                outbox, in order per webhook
    whl\\0<webhook>\\0<number:016x>          → WebhookEntry      a delivered, failed or given-up
                                                                event: the webhook's delivery log
    whq\\0<question id>                     → CompletionQuestion  an image whose ``replicated`` /
                                                                ``replication_failed`` is awaited

Each leaf of the tree has a builder (``tag(repo, tag)`` → bytes) and a frozen
value named after it (``TagKey(repository, tag)``) that ``parse`` returns for
those bytes; ``TagKey(…).encode()`` calls the builder, so the two cannot drift.
``parse`` checks the shape only — family, kind, number of components, UTF-8,
no empty component, an 8-byte sequence — and raises ``MalformedKey`` for
anything else; names, tags and digests were validated (``reference``) before
they were ever stored, and are not re-validated on the way out.

Blob bytes are not here: they live in ``blobs/<alg>/<hex[:2]>/<hex>`` under the
data dir, encrypted (see ``crypto``); uploads in progress in ``uploads/<uuid>``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TypeVar, overload

import msgspec

SEP = b"\x00"

META = b"meta\x00"
SCHEMA = META + b"schema"
IDENTITY = META + b"identity"
HLC = META + b"hlc"
KEY_CHECK = META + b"keycheck"
FINGERPRINTS = META + b"fingerprints"
UNREFERENCED_SCHEME = META + b"unreferenced"
CONTENT_COUNTS_SCHEME = META + b"contentcounts"
CONTENT_COUNTS = META + b"content"
LOG_FLOOR = META + b"logfloor"
TOMB_INDEX = META + b"tombindex"
TOMB_COUNT = META + b"tombstones"
USAGE = META + b"usage"
WEBHOOK_FEED = META + b"webhookfeed"
WEBHOOK_SEQ = META + b"webhookseq"

LOG = b"log\x00"
BLOB = b"blob\x00"
REF = b"ref\x00"
BLOB_USER = b"user\x00"
UNREFERENCED = b"unref\x00"
REFERRING_COUNTS = b"cnt\x00"
REPO = b"repo\x00"
REPO_DATA = b"r\x00"
UPLOAD = b"upload\x00"
TOMB = b"tomb\x00"
CURSOR = b"cursor\x00"
READER = b"reader\x00"
TOMB_CANDIDATE = b"tgc\x00"
FAIL = b"fail\x00"
UNTAGGED = b"untag\x00"
TRANSFER = b"xfer\x00"
CONFIG = b"conf\x00"
FINGERPRINT = b"fp\x00"
FINGERPRINT_BUCKET = b"fpb\x00"
WEBHOOK_PENDING = b"whp\x00"
WEBHOOK_LOG = b"whl\x00"
COMPLETION_QUESTION = b"whq\x00"
ATTRIBUTES = b"attr\x00"
RECYCLE_BIN = b"bin\x00"
RECYCLED_REF = b"binref\x00"

FINGERPRINT_BUCKETS = 64
"""Repositories are spread over this many buckets by a hash of their name."""

# The second level of ``r\0<repo>\0`` and ``tomb\0<repo>\0``.
_LINK = b"b"
_MANIFEST = b"m"
_TAG = b"t"
_REFERRER = b"s"
_REPOSITORY = b"r"          # ``attr\0<repo>\0r``: the repository's own attributes

_SEQ = struct.Struct(">Q")
LAST_SEQ = 2**64 - 1
"""The largest sequence a log key can hold (``log(LAST_SEQ)`` sorts after every log key)."""


def _b(text: str) -> bytes:
    return text.encode()


# -- builders ----------------------------------------------------------------


def log(seq: int) -> bytes:
    return LOG + _SEQ.pack(seq)


def blob(digest: str) -> bytes:
    return BLOB + _b(digest)


def ref_prefix(target: str) -> bytes:
    """All manifests, in any repository, that reference ``target``."""
    return REF + _b(target) + SEP


def ref_repo_prefix(target: str, repo: str) -> bytes:
    """Manifests of ``repo`` that reference ``target``."""
    return REF + _b(target) + SEP + _b(repo) + SEP


def ref(target: str, repo: str, manifest: str) -> bytes:
    return ref_repo_prefix(target, repo) + _b(manifest)


def blob_user(digest: str, repo: str) -> bytes:
    """Reverse of ``blob_link``: which repositories link a blob."""
    return blob_users_prefix(digest) + _b(repo)


def blob_users_prefix(digest: str) -> bytes:
    return BLOB_USER + _b(digest) + SEP


def unreferenced(digest: str) -> bytes:
    """Marks blob ``digest`` as held with no manifest referencing it."""
    return UNREFERENCED + _b(digest)


def referring_counts(digest: str) -> bytes:
    """How many manifests of each residency region reference ``digest``."""
    return REFERRING_COUNTS + _b(digest)


def repo(name: str) -> bytes:
    return REPO + _b(name)


def repo_prefix(name: str) -> bytes:
    """Everything stored under one repository (links, manifests, tags, referrers)."""
    return REPO_DATA + _b(name) + SEP


def blob_link(name: str, digest: str) -> bytes:
    return blob_link_prefix(name) + _b(digest)


def blob_link_prefix(name: str) -> bytes:
    return repo_prefix(name) + _LINK + SEP


def manifest(name: str, digest: str) -> bytes:
    return manifest_prefix(name) + _b(digest)


def manifest_prefix(name: str) -> bytes:
    return repo_prefix(name) + _MANIFEST + SEP


def tag(name: str, tag_name: str) -> bytes:
    return tag_prefix(name) + _b(tag_name)


def tag_prefix(name: str) -> bytes:
    return repo_prefix(name) + _TAG + SEP


def referrer(name: str, subject: str, referrer_digest: str) -> bytes:
    return referrer_prefix(name, subject) + _b(referrer_digest)


def referrer_prefix(name: str, subject: str) -> bytes:
    return repo_prefix(name) + _REFERRER + SEP + _b(subject) + SEP


def upload(uuid: str) -> bytes:
    return UPLOAD + _b(uuid)


def tomb_prefix(name: str) -> bytes:
    return TOMB + _b(name) + SEP


def tag_tomb(name: str, tag_name: str) -> bytes:
    return tomb_prefix(name) + _TAG + SEP + _b(tag_name)


def manifest_tomb(name: str, digest: str) -> bytes:
    return tomb_prefix(name) + _MANIFEST + SEP + _b(digest)


def blob_tomb(name: str, digest: str) -> bytes:
    return tomb_prefix(name) + _LINK + SEP + _b(digest)


def attributes_prefix(name: str) -> bytes:
    """Every attributes register of one repository (its own, its tags', its manifests')."""
    return ATTRIBUTES + _b(name) + SEP


def repository_attributes(name: str) -> bytes:
    return attributes_prefix(name) + _REPOSITORY


def tag_attributes_prefix(name: str) -> bytes:
    return attributes_prefix(name) + _TAG + SEP


def tag_attributes(name: str, tag_name: str) -> bytes:
    return tag_attributes_prefix(name) + _b(tag_name)


def manifest_attributes_prefix(name: str) -> bytes:
    return attributes_prefix(name) + _MANIFEST + SEP


def manifest_attributes(name: str, digest: str) -> bytes:
    return manifest_attributes_prefix(name) + _b(digest)


def recycle_bin_prefix(name: str) -> bytes:
    """Everything in one repository's recycle bin (manifests, then tags)."""
    return RECYCLE_BIN + _b(name) + SEP


def recycled_manifest_prefix(name: str) -> bytes:
    return recycle_bin_prefix(name) + _MANIFEST + SEP


def recycled_manifest(name: str, digest: str) -> bytes:
    return recycled_manifest_prefix(name) + _b(digest)


def recycled_tag_prefix(name: str) -> bytes:
    return recycle_bin_prefix(name) + _TAG + SEP


def recycled_tag(name: str, tag_name: str) -> bytes:
    return recycled_tag_prefix(name) + _b(tag_name)


def recycled_ref_prefix(target: str) -> bytes:
    """Every recycled manifest, in any repository, that references ``target``."""
    return RECYCLED_REF + _b(target) + SEP


def recycled_ref(target: str, repo: str, manifest: str) -> bytes:
    return recycled_ref_prefix(target) + _b(repo) + SEP + _b(manifest)


def cursor(peer: str) -> bytes:
    return CURSOR + _b(peer)


def reader(name: str) -> bytes:
    return READER + _b(name)


def tombstone_candidate(seq: int, tomb_key: bytes) -> bytes:
    """The tombstone at ``tomb_key`` (a ``tag_tomb``, ``manifest_tomb`` or
    ``blob_tomb`` key), written by the event logged at ``seq``: candidates
    sort by the sequence, so collection reads the oldest first and stops."""
    return TOMB_CANDIDATE + _SEQ.pack(seq) + tomb_key


def failure(name: str, digest: str) -> bytes:
    return FAIL + _b(name) + SEP + _b(digest)


def untagged(region: str, name: str, digest: str) -> bytes:
    return untagged_prefix(region) + _b(name) + SEP + _b(digest)


def untagged_prefix(region: str) -> bytes:
    """The notes of the manifests first pushed in ``region`` (the ones its sweep decides)."""
    return UNTAGGED + _b(region) + SEP


def transfer(digest: str) -> bytes:
    return TRANSFER + _b(digest)


def configuration_prefix(kind: str) -> bytes:
    """Every object (and tombstone) of one configuration kind."""
    return CONFIG + _b(kind) + SEP


def configuration(kind: str, name: str) -> bytes:
    return configuration_prefix(kind) + _b(name)


def webhook_pending_prefix(webhook: str) -> bytes:
    """A webhook's outbox: its events still to deliver, oldest first."""
    return WEBHOOK_PENDING + _b(webhook) + SEP


def webhook_pending(webhook: str, number: int) -> bytes:
    return webhook_pending_prefix(webhook) + _b(f"{number:016x}")


def webhook_log_prefix(webhook: str) -> bytes:
    """A webhook's delivery log: its events delivered, failed or given up, oldest first."""
    return WEBHOOK_LOG + _b(webhook) + SEP


def webhook_log(webhook: str, number: int) -> bytes:
    return webhook_log_prefix(webhook) + _b(f"{number:016x}")


def completion_question(question: str) -> bytes:
    return COMPLETION_QUESTION + _b(question)


def fingerprint_bucket(name: str) -> int:
    """The bucket of repository ``name``: fixed by its name, the same on every node."""
    return hashlib.sha256(_b(name)).digest()[0] % FINGERPRINT_BUCKETS


def fingerprint(name: str) -> bytes:
    return fingerprint_in(fingerprint_bucket(name), name)


def fingerprint_in(bucket: int, name: str) -> bytes:
    """``fingerprint(name)`` when ``bucket`` is ``fingerprint_bucket(name)``."""
    return fingerprint_prefix(bucket) + _b(name)


def fingerprint_prefix(bucket: int) -> bytes:
    """The sums of every repository of one bucket."""
    return FINGERPRINT + _b(f"{bucket:02x}") + SEP


def bucket_fingerprint(bucket: int) -> bytes:
    return FINGERPRINT_BUCKET + _b(f"{bucket:02x}")


def register(key: bytes) -> (TagKey | ManifestKey | TagTombKey | ManifestTombKey | AttributesKey
                             | None):
    """The register ``key`` holds, if it is one that anti-entropy compares (a
    tag or manifest, live or deleted, or a set of changeable attributes);
    ``None`` for every other key, cheaply, since every key of every commit is
    asked (``fingerprints``)."""
    if not (key.startswith(REPO_DATA) or key.startswith(TOMB) or key.startswith(ATTRIBUTES)):
        return None
    parsed = _parse(key)
    if isinstance(parsed, (TagKey, ManifestKey, TagTombKey, ManifestTombKey, AttributesKey)):
        return parsed
    return None


def reference_holder(key: bytes) -> BlobKey | RefKey | RecycledRefKey | None:
    """The key parsed, if it is one whose write may change a blob's GC
    candidacy (a blob record, or a manifest's reference to its target, live
    or in a recycle bin);
    ``None`` for every other key, cheaply, since every key of every commit is
    asked (``unreferenced``)."""
    if not (key.startswith(BLOB) or key.startswith(REF) or key.startswith(RECYCLED_REF)):
        return None
    return _parse(key)


BLOB_RECORD, MANIFEST_RECORD, RECYCLED_MANIFEST_RECORD = "blob", "manifest", "recycled"


def content_record(key: bytes) -> str | None:
    """``BLOB_RECORD``, ``MANIFEST_RECORD`` or ``RECYCLED_MANIFEST_RECORD`` (a
    manifest in the recycle bin) if ``key`` holds a record that storage usage
    counts; ``None`` for every other key. Cheap (no parse: only the family
    and the kind are looked at), since every key of every commit is asked
    (``usage``)."""
    if key.startswith(BLOB):
        return BLOB_RECORD
    for family, kind in ((REPO_DATA, MANIFEST_RECORD), (RECYCLE_BIN, RECYCLED_MANIFEST_RECORD)):
        if key.startswith(family):
            # <family><repo>\0<kind>\0…: no repository name holds NUL, so the
            # kind follows the first NUL after the family.
            kind_at = key.find(SEP, len(family)) + 1
            return kind if kind_at and key[kind_at:kind_at + 2] == _MANIFEST + SEP else None
    return None


def counted_content(key: bytes) -> ManifestKey | BlobKey | None:
    """The key parsed, if its write may change what a node reports it holds
    (a manifest, or a blob record); ``None`` for every other key, cheaply,
    since every key of every commit is asked (``content_counts``): only the
    keys ``content_record`` picks out are parsed. A manifest in the recycle
    bin is not: the counts say how far replication has brought what is served
    (sync progress), and a binned manifest is not served; storage usage
    counts it."""
    if content_record(key) in (None, RECYCLED_MANIFEST_RECORD):
        return None
    parsed = _parse(key)
    return parsed if isinstance(parsed, (ManifestKey, BlobKey)) else None


def is_tombstone(key: bytes) -> bool:
    """Whether ``key`` is a tombstone's (``tomb\\0…``)."""
    return key.startswith(TOMB)


def in_repository(key: bytes, name: str) -> bool:
    """Whether ``key`` is stored under repository ``name`` (``r\\0<name>\\0…``)."""
    return key.startswith(repo_prefix(name))


# -- parsed keys ---------------------------------------------------------------
# One frozen value per leaf of the tree, fields in the order the key holds them.
# msgspec Structs, not dataclasses: a frozen dataclass costs several times as
# much to make, and listings parse a key per entry.


class MetaKey(msgspec.Struct, frozen=True):
    """``meta\\0<name>``: one of the node's own settings (schema, identity, hlc, keycheck)."""

    name: str

    def encode(self) -> bytes:
        return META + _b(self.name)


class LogKey(msgspec.Struct, frozen=True):
    seq: int

    def encode(self) -> bytes:
        return log(self.seq)


class BlobKey(msgspec.Struct, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return blob(self.digest)


class ReferringCountsKey(msgspec.Struct, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return referring_counts(self.digest)


class RefKey(msgspec.Struct, frozen=True):
    """Manifest ``manifest`` of ``repository`` needs ``target`` (a blob or child manifest)."""

    target: str
    repository: str
    manifest: str

    def encode(self) -> bytes:
        return ref(self.target, self.repository, self.manifest)


class RecycledRefKey(msgspec.Struct, frozen=True):
    """Manifest ``manifest``, in the recycle bin of ``repository``, needs ``target``."""

    target: str
    repository: str
    manifest: str

    def encode(self) -> bytes:
        return recycled_ref(self.target, self.repository, self.manifest)


class BlobUserKey(msgspec.Struct, frozen=True):
    digest: str
    repository: str

    def encode(self) -> bytes:
        return blob_user(self.digest, self.repository)


class UnreferencedKey(msgspec.Struct, frozen=True):
    """Blob ``digest`` is held and referenced by no manifest: a GC candidate."""

    digest: str

    def encode(self) -> bytes:
        return unreferenced(self.digest)


class RepoKey(msgspec.Struct, frozen=True):
    """A catalog entry."""

    repository: str

    def encode(self) -> bytes:
        return repo(self.repository)


class RepoDataKey(msgspec.Struct, frozen=True):
    """An entry stored under ``repository`` (one of the four below)."""

    repository: str


class BlobLinkKey(RepoDataKey, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return blob_link(self.repository, self.digest)


class ManifestKey(RepoDataKey, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return manifest(self.repository, self.digest)


class TagKey(RepoDataKey, frozen=True):
    tag: str

    def encode(self) -> bytes:
        return tag(self.repository, self.tag)


class ReferrerKey(RepoDataKey, frozen=True):
    subject: str
    referrer: str

    def encode(self) -> bytes:
        return referrer(self.repository, self.subject, self.referrer)


class UploadKey(msgspec.Struct, frozen=True):
    upload_id: str

    def encode(self) -> bytes:
        return upload(self.upload_id)


class TombKey(msgspec.Struct, frozen=True):
    """A deleted register of ``repository`` (one of the three below)."""

    repository: str


class TagTombKey(TombKey, frozen=True):
    tag: str

    def encode(self) -> bytes:
        return tag_tomb(self.repository, self.tag)


class ManifestTombKey(TombKey, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return manifest_tomb(self.repository, self.digest)


class BlobTombKey(TombKey, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return blob_tomb(self.repository, self.digest)


class AttributesKey(msgspec.Struct, frozen=True):
    """The attributes register of ``repository`` or of one of its tags or
    manifests (one of the three below)."""

    repository: str


class RepositoryAttributesKey(AttributesKey, frozen=True):
    def encode(self) -> bytes:
        return repository_attributes(self.repository)


class TagAttributesKey(AttributesKey, frozen=True):
    tag: str

    def encode(self) -> bytes:
        return tag_attributes(self.repository, self.tag)


class ManifestAttributesKey(AttributesKey, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return manifest_attributes(self.repository, self.digest)


class RecycledKey(msgspec.Struct, frozen=True):
    """An entry of ``repository``'s recycle bin (one of the two below)."""

    repository: str


class RecycledManifestKey(RecycledKey, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return recycled_manifest(self.repository, self.digest)


class RecycledTagKey(RecycledKey, frozen=True):
    tag: str

    def encode(self) -> bytes:
        return recycled_tag(self.repository, self.tag)


class CursorKey(msgspec.Struct, frozen=True):
    peer: str

    def encode(self) -> bytes:
        return cursor(self.peer)


class ReaderKey(msgspec.Struct, frozen=True):
    """A node (by its name: a region/zone label is ambiguous, see
    ``replicator.retention``) reading this node's log."""

    name: str

    def encode(self) -> bytes:
        return reader(self.name)


class TombstoneCandidateKey(msgspec.Struct, frozen=True):
    """A tombstone (``tomb``: its key) to collect once every reader of this log
    read past the event at ``seq`` that wrote it (``replicator.retention``)."""

    seq: int
    tomb: TagTombKey | ManifestTombKey | BlobTombKey

    def encode(self) -> bytes:
        return tombstone_candidate(self.seq, self.tomb.encode())


class FailureKey(msgspec.Struct, frozen=True):
    repository: str
    digest: str

    def encode(self) -> bytes:
        return failure(self.repository, self.digest)


class UntaggedKey(msgspec.Struct, frozen=True):
    """Manifest ``digest`` of ``repository``, first pushed in ``region``, may be
    untagged (a retention candidate)."""

    region: str
    repository: str
    digest: str

    def encode(self) -> bytes:
        return untagged(self.region, self.repository, self.digest)


class TransferKey(msgspec.Struct, frozen=True):
    digest: str

    def encode(self) -> bytes:
        return transfer(self.digest)


class FingerprintKey(msgspec.Struct, frozen=True):
    bucket: str                  # two hex digits, ``fingerprint_bucket(repository)``
    repository: str

    def encode(self) -> bytes:
        return fingerprint_in(int(self.bucket, 16), self.repository)


class BucketFingerprintKey(msgspec.Struct, frozen=True):
    bucket: str

    def encode(self) -> bytes:
        return bucket_fingerprint(int(self.bucket, 16))


class ConfigKey(msgspec.Struct, frozen=True):
    """A registry configuration object: ``name`` of ``kind`` (``configuration``)."""

    kind: str
    name: str

    def encode(self) -> bytes:
        return configuration(self.kind, self.name)


class WebhookPendingKey(msgspec.Struct, frozen=True):
    """Event ``number`` in ``webhook``'s outbox (numbers grow across every webhook)."""

    webhook: str
    number: int

    def encode(self) -> bytes:
        return webhook_pending(self.webhook, self.number)


class WebhookLogKey(msgspec.Struct, frozen=True):
    """Event ``number`` in ``webhook``'s delivery log."""

    webhook: str
    number: int

    def encode(self) -> bytes:
        return webhook_log(self.webhook, self.number)


class CompletionQuestionKey(msgspec.Struct, frozen=True):
    question: str

    def encode(self) -> bytes:
        return completion_question(self.question)


Key = (MetaKey | LogKey | BlobKey | RefKey | BlobUserKey | UnreferencedKey | ReferringCountsKey
       | RepoKey
       | BlobLinkKey | ManifestKey | TagKey | ReferrerKey | UploadKey | TagTombKey | ManifestTombKey | BlobTombKey
       | CursorKey | FailureKey | UntaggedKey | TransferKey | ConfigKey | FingerprintKey
       | BucketFingerprintKey | ReaderKey | TombstoneCandidateKey | WebhookPendingKey
       | WebhookLogKey | CompletionQuestionKey | RepositoryAttributesKey | TagAttributesKey
       | ManifestAttributesKey | RecycledRefKey | RecycledManifestKey | RecycledTagKey)


def _head(family: bytes) -> bytes:
    return family.removesuffix(SEP)


_LOG_HEAD = _head(LOG)
_TOMB_CANDIDATE_HEAD = _head(TOMB_CANDIDATE)
_META_HEAD = _head(META)
_META_NAMES = frozenset(k.removeprefix(META).decode()
                        for k in (SCHEMA, IDENTITY, HLC, KEY_CHECK, FINGERPRINTS,
                                  UNREFERENCED_SCHEME, CONTENT_COUNTS_SCHEME, CONTENT_COUNTS,
                                  LOG_FLOOR, TOMB_INDEX, TOMB_COUNT,
                                  WEBHOOK_FEED, WEBHOOK_SEQ))
# Families of ``<family><webhook>\0<number:016x>``.
_WEBHOOK_ENTRIES: dict[bytes, type] = {_head(WEBHOOK_PENDING): WebhookPendingKey,
                                       _head(WEBHOOK_LOG): WebhookLogKey}
_HEX = frozenset(b"0123456789abcdef")
# Families whose components follow the family name directly.
_FLAT: dict[bytes, type] = {_head(family): kind for family, kind in [
    (BLOB, BlobKey), (REF, RefKey), (BLOB_USER, BlobUserKey), (UNREFERENCED, UnreferencedKey),
    (REFERRING_COUNTS, ReferringCountsKey),
    (REPO, RepoKey),
    (UPLOAD, UploadKey), (CURSOR, CursorKey), (FAIL, FailureKey), (UNTAGGED, UntaggedKey),
    (TRANSFER, TransferKey),
    (CONFIG, ConfigKey), (FINGERPRINT, FingerprintKey),
    (FINGERPRINT_BUCKET, BucketFingerprintKey), (READER, ReaderKey),
    (COMPLETION_QUESTION, CompletionQuestionKey), (RECYCLED_REF, RecycledRefKey)]}
# Families of ``<family><repo>\0<kind>\0…``, by kind.
_IN_REPOSITORY: dict[bytes, dict[str, type]] = {
    _head(REPO_DATA): {_LINK.decode(): BlobLinkKey, _MANIFEST.decode(): ManifestKey,
                       _TAG.decode(): TagKey, _REFERRER.decode(): ReferrerKey},
    _head(TOMB): {_TAG.decode(): TagTombKey, _MANIFEST.decode(): ManifestTombKey,
                  _LINK.decode(): BlobTombKey},
    _head(ATTRIBUTES): {_REPOSITORY.decode(): RepositoryAttributesKey,
                        _TAG.decode(): TagAttributesKey, _MANIFEST.decode(): ManifestAttributesKey},
    _head(RECYCLE_BIN): {_MANIFEST.decode(): RecycledManifestKey, _TAG.decode(): RecycledTagKey},
}
_FIELDS: dict[type, tuple[str, ...]] = {kind: kind.__struct_fields__ for kind in Key.__args__
                                         if kind not in (TombstoneCandidateKey, WebhookPendingKey,
                                                         WebhookLogKey)}


class MalformedKey(ValueError):
    """Bytes that are not a key of this grammar (or not of the family expected)."""

    def __init__(self, key: bytes, why: str) -> None:
        super().__init__(f"malformed metadata key {key!r}: {why}")
        self.key = key
        self.why = why


_K = TypeVar("_K")


@overload
def parse(key: bytes) -> Key: ...


@overload
def parse(key: bytes, expected: type[_K]) -> _K: ...


def parse(key, expected=None):
    """The typed value of ``key`` (see the tree); with ``expected``, also
    refuse a well-formed key of another family. Raises ``MalformedKey``."""
    parsed = _parse(key)
    if expected is not None and not isinstance(parsed, expected):
        raise MalformedKey(key, f"a {type(parsed).__name__}, not a {expected.__name__}")
    return parsed


def _parse(key: bytes) -> Key:
    head, sep, rest = key.partition(SEP)
    if not sep:
        raise MalformedKey(key, "no NUL after the family name")
    if head == _LOG_HEAD:  # binary: the sequence may itself hold NUL bytes
        if len(rest) != _SEQ.size:
            raise MalformedKey(key, f"a log sequence is {_SEQ.size} bytes, not {len(rest)}")
        return LogKey(_SEQ.unpack(rest)[0])
    if head == _TOMB_CANDIDATE_HEAD:  # binary sequence, then a whole tombstone key
        if len(rest) <= _SEQ.size:
            raise MalformedKey(key, "a tombstone candidate is a sequence and a tombstone key")
        tomb = _parse(rest[_SEQ.size:])
        if not isinstance(tomb, TombKey):
            raise MalformedKey(key, f"a tombstone candidate names a {type(tomb).__name__}")
        return TombstoneCandidateKey(_SEQ.unpack(rest[:_SEQ.size])[0], tomb)
    if head in _WEBHOOK_ENTRIES:
        name, sep, number = rest.partition(SEP)
        if not name or not sep:
            raise MalformedKey(key, "a webhook entry is a webhook name and a number")
        if len(number) != 16 or not set(number) <= _HEX:
            raise MalformedKey(key, "a webhook entry's number is 16 lowercase hex digits")
        try:
            return _WEBHOOK_ENTRIES[head](name.decode(), int(number, 16))
        except UnicodeDecodeError:
            raise MalformedKey(key, "a component that is not UTF-8") from None
    kind = _FLAT.get(head)
    kinds = _IN_REPOSITORY.get(head) if kind is None else None
    if kind is None and kinds is None and head != _META_HEAD:
        raise MalformedKey(key, f"unknown family {head!r}")
    try:
        # UTF-8 encodes no character but NUL itself with a zero byte, so
        # splitting the text is splitting the bytes.
        parts = rest.decode().split("\x00")
    except UnicodeDecodeError:
        raise MalformedKey(key, "a component that is not UTF-8") from None
    if "" in parts:
        raise MalformedKey(key, "an empty component")
    if kinds is not None:
        if len(parts) < 2:
            raise MalformedKey(key, "no kind after the repository")
        if (kind := kinds.get(parts[1])) is None:
            raise MalformedKey(key, f"kind {parts[1]!r} is not one of {sorted(kinds)}")
        del parts[1]
    if kind is None:
        if len(parts) != 1 or parts[0] not in _META_NAMES:
            raise MalformedKey(key, f"meta names one of {sorted(_META_NAMES)}")
        return MetaKey(parts[0])
    if len(parts) != len(names := _FIELDS[kind]):
        raise MalformedKey(key, f"a {kind.__name__} has {len(names)} components "
                                f"({', '.join(names)}), not {len(parts)}")
    return kind(*parts)


def render(key: bytes) -> str:
    """``key`` as a person reads it (in reports): components joined by ``/``, a
    log key as ``log/<seq>``. Any bytes render, well-formed or not."""
    try:
        parsed = _parse(key)
    except MalformedKey:
        parsed = None
    if isinstance(parsed, LogKey):
        return f"log/{parsed.seq}"
    if isinstance(parsed, TombstoneCandidateKey):
        return f"tgc/{parsed.seq}/{render(parsed.tomb.encode())}"
    return key.replace(SEP, b"/").decode(errors="replace")
