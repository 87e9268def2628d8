"""The values stored under the keys of ``keys``: typed, versioned by field
defaults, encoded with msgpack through msgspec.

``Event`` is the unit of replication: every mutation writes one (or more) in the
same write batch as its metadata, so the log is exactly the history of the node.
An event carries its origin (region, zone, origin sequence), a hybrid logical
clock stamp that orders competing writes everywhere, and the wall time at which
the origin acknowledged the client, from which replication lag is measured.
"""

from __future__ import annotations

import enum

import msgspec


class EventKind(enum.StrEnum):
    BLOB_PUT = "blob_put"              # an upload committed into a repository
    BLOB_MOUNT = "blob_mount"          # a blob linked from another repository
    BLOB_DELETE = "blob_delete"        # a blob unlinked from a repository
    MANIFEST_PUT = "manifest_put"
    MANIFEST_DELETE = "manifest_delete"
    TAG_SET = "tag_set"
    TAG_DELETE = "tag_delete"
    BLOB_RECLAIMED = "blob_reclaimed"  # local garbage collection; never replicated
    # A repository's, tag's or manifest's changeable attributes (``locks``):
    # ``tag`` names a tag's, ``digest`` a manifest's, neither the repository's.
    ATTRIBUTES_SET = "attributes_set"
    # Registry configuration (``configuration``): registry-wide, never confined.
    CONFIG_SET = "config_set"
    CONFIG_DELETE = "config_delete"


class ClientRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """The client request that caused an event on the node that took it (what
    a webhook's ``request`` reports): its id, the ``Host`` it was sent to, its
    method and ``User-Agent``. Replication carries it with the event (the node
    that delivers a region's webhooks may be another zone of the region than
    the one that took the push); a region the copy reaches reports the
    registry's request instead (``webhook_events``)."""

    id: str = ""
    host: str = ""
    method: str = ""
    useragent: str = ""


CONFIG_KINDS = frozenset({EventKind.CONFIG_SET, EventKind.CONFIG_DELETE})
"""Events about registry configuration rather than a repository's content:
they carry ``config_kind``, ``config_name`` (and ``config_value``), and an
empty ``repository``; residency does not apply to them."""


class ChangeableAttributes(msgspec.Struct, frozen=True):
    """ACR's ``changeableAttributes``: what may be done to a repository, a tag
    or a manifest. Everything is enabled until someone says otherwise."""

    delete_enabled: bool = True
    write_enabled: bool = True
    read_enabled: bool = True
    list_enabled: bool = True

    def to_acr(self) -> dict[str, bool]:
        return {"deleteEnabled": self.delete_enabled, "writeEnabled": self.write_enabled,
                "readEnabled": self.read_enabled, "listEnabled": self.list_enabled}


# The request behind retention's deletes (``untagged``), as webhooks and logs
# see it and as a replica tells them apart from a client's.
RETENTION_REQUEST = ClientRequest(method="DELETE", useragent="georeg-retention")


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    kind: EventKind
    repository: str
    digest: str = ""
    # Tag events: the tag. MANIFEST_PUT: the tag the manifest was pushed by
    # ("" when pushed by digest), so that every replica fires one webhook push
    # for a put by tag, at its TAG_SET (``webhook_events``).
    tag: str = ""
    media_type: str = ""
    size: int = 0
    # Manifests: the digests they need, blobs first then child manifests, in the
    # order a replica must fetch them. Mounts: the source repository.
    references: tuple[str, ...] = ()
    subject: str = ""
    source_repository: str = ""
    # Origin and ordering.
    origin_region: str = ""
    origin_zone: str = ""
    origin_seq: int = 0
    hlc: int = 0
    acked_ns: int = 0
    # Assigned by the log when the event is committed.
    seq: int = 0
    # Configuration events: the object and (config_set) its msgpack-encoded value.
    config_kind: str = ""
    config_name: str = ""
    config_value: bytes = b""
    # Local to this node's log, never on the wire (``replicator.convert`` maps
    # fields one by one): what webhooks need that the node may no longer hold
    # by the time they are fed. MANIFEST_PUT / MANIFEST_DELETE: the manifest's
    # artifact type (its config's media type for an image manifest: a Helm
    # chart's is ``application/vnd.cncf.helm.config.v1+json``), as this node
    # knew it.
    artifact_type: str = ""
    # Events a client caused at their origin: that client's request (on the
    # wire too: see ``ClientRequest``).
    request: ClientRequest | None = None
    # ATTRIBUTES_SET: the register's whole value after the change (not the
    # fields the client named), so applying it anywhere is a plain
    # last-writer-wins write.
    attributes: ChangeableAttributes | None = None
    # MANIFEST_DELETE / TAG_DELETE: the origin's soft-delete policy was on, so
    # every region that applies the delete keeps what it ends in its recycle
    # bin (``recycle_bin``); decided once, at the origin. MANIFEST_DELETE: the
    # tags the manifest had there, which a restore brings back.
    recycled: bool = False
    recycled_tags: tuple[str, ...] = ()


class NodeIdentity(msgspec.Struct, frozen=True):
    region: str
    zone: str
    node_id: str


class BlobRecord(msgspec.Struct, frozen=True):
    size: int
    created_ns: int


class BlobLink(msgspec.Struct, frozen=True, omit_defaults=True):
    linked_ns: int
    hlc: int = 0
    origin_region: str = ""
    origin_zone: str = ""


class RepoRecord(msgspec.Struct, frozen=True):
    created_ns: int


class Descriptor(msgspec.Struct, frozen=True, omit_defaults=True):
    """An OCI descriptor as the referrers API lists it."""

    mediaType: str
    digest: str
    size: int
    artifactType: str | None = None
    annotations: dict[str, str] | None = None


class ManifestRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    media_type: str
    size: int
    sealed_body: bytes                 # AES-GCM sealed manifest bytes (see crypto)
    references: tuple[str, ...] = ()   # blobs then child manifests
    subject: str = ""
    artifact_type: str = ""
    annotations: dict[str, str] | None = None
    created_ns: int = 0                # when it arrived on this node
    hlc: int = 0                       # the register's stamp (bumped by later tag sets)
    origin_region: str = ""
    origin_zone: str = ""
    origin_acked_ns: int = 0           # when its origin acknowledged the push
    pushed_region: str = ""            # region of the first push (residency); never bumped

    @property
    def residency_region(self) -> str:
        """The region whose residency decides where this manifest may go: the
        region it was first pushed in (a record from before that was kept: its
        origin). Fingerprints sum it under this region and anti-entropy filters
        it by it, so every reader must take it from here for the sums to agree."""
        return self.pushed_region or self.origin_region


class TagRecord(msgspec.Struct, frozen=True):
    digest: str
    hlc: int
    origin_region: str = ""
    origin_zone: str = ""
    origin_acked_ns: int = 0
    arrived_ns: int = 0                # when the tag took this value on this node


class Tombstone(msgspec.Struct, frozen=True, omit_defaults=True):
    """A deleted register (tag, manifest or blob link): a late, older write
    stamped before it does not bring the deleted thing back."""

    hlc: int
    origin_region: str = ""
    origin_zone: str = ""
    digest: str = ""                   # tags: what the tag pointed at
    # Manifests: the delete was a soft one (``Event.recycled``), with the tags
    # and the origin's acknowledgement it carried. Kept here, not only in the
    # bin entry, which a node that never held the body cannot make: what
    # anti-entropy says of the delete must not depend on that (``recycle_bin``).
    recycled: bool = False
    recycled_tags: tuple[str, ...] = ()
    deleted_ns: int = 0
    # Manifests: the delete was retention's (``untagged``), which a replica
    # holding a lock on the manifest refuses: anti-entropy says so too.
    retention: bool = False


class RecycledManifest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A soft-deleted manifest in its repository's recycle bin (``recycle_bin``):
    the record as it was (sealed body included), the tags it had at the
    delete's origin, and the delete: its stamp and the origin's
    acknowledgement, from which its purge time is counted."""

    record: ManifestRecord
    tags: tuple[str, ...]
    deleted_ns: int
    hlc: int
    origin_region: str = ""
    origin_zone: str = ""


class RecycledTag(msgspec.Struct, frozen=True, omit_defaults=True):
    """A soft-deleted (untagged) tag: what it pointed at, and the delete."""

    digest: str
    deleted_ns: int
    hlc: int
    origin_region: str = ""
    origin_zone: str = ""


class ConfigRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """One registry configuration object, or its tombstone (``deleted``): a
    last-writer-wins register like a tag. ``value`` is the msgpack encoding of
    the kind's Struct (``configuration``), kept as bytes so a node stores and
    relays a kind it does not know yet exactly as it received it."""

    hlc: int
    origin_region: str = ""
    origin_zone: str = ""
    value: bytes = b""
    deleted: bool = False
    origin_acked_ns: int = 0


class AttributesRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """A repository's, tag's or manifest's changeable attributes: a
    last-writer-wins register of its own, apart from the tag or manifest it
    is about, so that no write of content ever carries (and reverts) them."""

    attributes: ChangeableAttributes
    hlc: int
    origin_region: str = ""
    origin_zone: str = ""
    updated_ns: int = 0                # when this value was set at its origin


class FingerprintSums(msgspec.Struct, frozen=True):
    """The hash-sums of one repository's registers (or of a bucket of
    repositories), by the region that decides their residency
    (``fingerprints``): 32-byte big-endian integers modulo 2**256. A region
    whose sum is zero is left out."""

    sums: dict[str, bytes]


class ContentCounts(msgspec.Struct, frozen=True):
    """What a node holds (``content_counts``), by the region that decides its
    residency: manifests, and the plaintext bytes of the distinct blobs they
    reference that are held. A region with neither is left out."""

    images: dict[str, int]
    bytes: dict[str, int]


class ReferringCounts(msgspec.Struct, frozen=True):
    """How many manifests of each residency region reference one digest
    (``content_counts``). A region with none is left out."""

    regions: dict[str, int]


class Cursor(msgspec.Struct, frozen=True):
    """How far this node has applied a peer's log, and which incarnation of
    that peer (its node id) the sequence belongs to."""

    node_id: str
    seq: int


class LogReader(msgspec.Struct, frozen=True, omit_defaults=True):
    """A node reading this node's log (``replicator.retention``): the cursor it
    last reported as persisted (of this log), which incarnation of it (its
    node id) reported it, and when it was last heard from."""

    seq: int = 0
    node_id: str = ""
    seen_ns: int = 0


class TombstoneCandidate(msgspec.Struct, frozen=True):
    """A tombstone as written (its exact value, so that a newer one at the same
    key is told apart) and when it was written here."""

    written_ns: int
    tombstone: bytes


class UntaggedNote(msgspec.Struct, frozen=True):
    """A manifest that may be untagged (``untagged``): when this node noted it
    (its wall clock: the note's age) and the stamp of the change that left the
    manifest (what retention's delete carries, so anything stamped after wins)."""

    since_ns: int
    hlc: int


class ReplicationFailure(msgspec.Struct, frozen=True):
    reason: str
    at_ns: int
    source: str = ""


class DeliveryAttempt(msgspec.Struct, frozen=True, omit_defaults=True):
    """One try at delivering a webhook event: when, how long, what came back
    (``status`` 0: no answer, ``error`` says why)."""

    at_ns: int
    duration_ms: float = 0.0
    status: int = 0
    error: str = ""


class WebhookEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One webhook event on this node (``webhook_outbox``): pending in the
    outbox until delivered or given up, then kept in the webhook's delivery
    log. ``body`` is the JSON payload, fixed when the event was made (a retry
    or a redelivery sends the very same bytes); the URI and custom headers are
    the webhook's at each attempt."""

    id: str                            # the event's id (stable: de-duplication)
    action: str
    body: bytes
    webhook_created: float             # which incarnation of the webhook it is for
    created_ns: int                    # when it was made here
    event_ns: int = 0                  # the event's own time (delivery latency counts from it)
    state: str = "pending"             # pending | delivered | failed | gave_up
    attempts: tuple[DeliveryAttempt, ...] = ()   # the last ones (``webhook_outbox.KEEP_ATTEMPTS``)
    attempt_count: int = 0
    uri: str = ""                      # where the last attempt went
    header_names: tuple[str, ...] = () # custom headers it carried (values are never kept)
    response_status: int = 0
    response_headers: dict[str, str] = {}
    response_body: str = ""            # the start of it
    reason: str = ""                   # why it failed or was given up


class CompletionQuestion(msgspec.Struct, frozen=True, omit_defaults=True):
    """An image that landed here, for which webhooks here wait to hear that it
    reached every replica (``replicated``) or that one gave up on it
    (``replication_failed``): asked of replication until it answers, across
    restarts (``webhook_delivery``)."""

    repository: str
    digest: str
    tag: str
    media_type: str
    size: int
    stamp_hlc: int
    origin_region: str
    origin_zone: str
    webhooks: dict[str, float]         # webhook name -> its ``created`` when asked
    asked_ns: int
    request: ClientRequest | None = None
    chart: bool = False


Stamp = tuple[int, str, str]
"""(hlc, origin region, origin zone): totally ordered, so every replica picks
the same winner between competing writes, ties included."""


def stamp_of(record: TagRecord | ManifestRecord | BlobLink | Tombstone | ConfigRecord
             | AttributesRecord | Event) -> Stamp:
    return (record.hlc, record.origin_region, record.origin_zone)


class UploadRecord(msgspec.Struct, frozen=True):
    repository: str
    started_ns: int


_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def _encode_other(value: object) -> object:
    if isinstance(value, str):  # str subclasses such as reference.Digest
        return str(value)
    raise NotImplementedError(f"cannot store {type(value).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_other)


def encode(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


def decode(data: bytes, kind: type[msgspec.Struct]):
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(data)
