"""Applying what other replicas did, and describing this replica's state to them.

Each tag, manifest and blob link is a last-writer-wins register whose writes
are ordered by their ``Stamp`` (HLC, origin region, origin zone): every replica
that sees the same writes, in any order, keeps the same winner. Deletes are
tombstones, so a late, older write does not bring deleted things back.

Three rules couple the registers, the same here as for local writes:

* a tag set renews its manifest's register, so a concurrent, older delete of
  that manifest loses to it everywhere; a delete of a manifest ends the tag
  values pointing at it that are older than the delete, each with a tombstone
  stamped like the value it ends (and winning a tie with it), so a re-tag
  stamped after that value survives the delete everywhere, as it would had
  the writes happened one after the other; and a tag set older than its
  manifest's tombstone is such a tombstone at once;
* a manifest that a present index of the repository needs is never removed:
  a delete of it loses, and an index arriving brings it back;
* a blob a manifest needs stays visible in its repository whatever happens to
  its link (``Registry.blob_visible``).

Invariants
    * Content before references: ``apply_manifest`` refuses (``MissingContent``)
      a manifest whose blobs or child manifests are not here yet; the caller
      (replicator.transfer) fetches them first. So no replica ever serves an
      incomplete image, not even for an instant.
    * Applying anything twice is a no-op that writes and logs nothing; that is
      also what stops an event from echoing between replicas forever.
    * A change applied here is logged with its original origin, origin
      sequence, HLC and acknowledgement time, so replicas that hear of it only
      through this one (transitive propagation) see the very same event.

No gRPC here: the replicator converts wire messages to ``Event``s and content
streams to async iterators of bytes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import msgspec

from . import fingerprints, keys, locks
from . import manifest as manifests
from .blobstore import UploadFile
from .configuration import Configuration
from .errors import RegistryError
from .metastore import Batch
from .records import (
    RETENTION_REQUEST,
    AttributesRecord,
    BlobLink,
    BlobRecord,
    Event,
    EventKind,
    ManifestRecord,
    ReplicationFailure,
    Stamp,
    TagRecord,
    Tombstone,
    decode,
    encode,
    stamp_of,
)
from .reference import Digest
from .registry import Registry, manifest_ad


class MissingContent(Exception):
    """A manifest cannot be stored yet: these digests must arrive first."""

    def __init__(self, blobs: list[str], manifests: list[str]) -> None:
        super().__init__(f"missing blobs {blobs} and manifests {manifests}")
        self.blobs = blobs
        self.manifests = manifests


class ContentRejected(Exception):
    """Content that can never be stored (digest mismatch, invalid manifest)."""


class DigestMismatch(ContentRejected):
    """Bytes that do not hash to the digest they came for: damaged on the way
    (or at the source). Those bytes can never be stored; another copy of the
    same content may well be, so a transfer asks again."""


@dataclass(frozen=True, slots=True)
class RegisterState:
    """One register as anti-entropy exchanges it (see ``Replica.repository_state``)."""

    key: str
    digest: str
    deleted: bool
    stamp: Stamp
    media_type: str = ""
    size: int = 0
    references: tuple[str, ...] = ()
    origin_acked_ns: int = 0
    content_region: str = ""      # manifests: region of the first push (residency)
    # Deleted registers: the delete was a soft one, with these tags (a
    # manifest's); ``origin_acked_ns`` is then the delete's (``recycle_bin``).
    recycled: bool = False
    recycled_tags: tuple[str, ...] = ()
    # Deleted manifests: the delete was retention's (``Tombstone.retention``).
    retention: bool = False


@dataclass(frozen=True, slots=True)
class ImageState:
    present: bool
    arrived_ns: int = 0
    origin_acked_ns: int = 0
    origin_region: str = ""
    failure: str = ""
    blobs_present: int = 0
    blobs_total: int = 0
    media_type: str = ""


def _stamp_of_event(event: Event) -> Stamp:
    return (event.hlc, event.origin_region, event.origin_zone)


def _tombstone(stamp: Stamp, digest: str = "") -> bytes:
    return encode(Tombstone(stamp[0], stamp[1], stamp[2], digest))


class Replica:
    """The merge side of one node's registry."""

    def __init__(self, registry: Registry, configuration: Configuration, *,
                 unchecked: bool = False) -> None:
        self.registry = registry
        # TEST ONLY (registry_node.broken_build): replicated blobs stored unchecked.
        self.unchecked = unchecked
        # Registry configuration travels with content: the node's one store
        # (``Node.configuration``), whose generation its readers watch.
        self.configuration = configuration
        self.meta = registry.meta
        self.blobs = registry.blobs

    # -- commit ----------------------------------------------------------------

    def _commit(self, batch: Batch, event: Event) -> Event:
        """Commit a merge and log ``event`` as it came from its origin."""
        self.registry.hlc.observe(event.hlc)
        batch.put(keys.HLC, str(self.registry.hlc.last).encode())
        batch.event(msgspec.structs.replace(event, seq=0))
        if event.digest:  # it arrived: an earlier failure to replicate it is history
            batch.delete(keys.failure(event.repository, event.digest))
        return self.meta.commit(batch)[-1]

    # -- blobs -----------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        return self.meta.get(keys.blob(digest)) is not None

    def blob_in_place(self, digest: str) -> bool:
        """The blob's record and its file are here (a file quarantined for bit
        rot, ``blob_repair``, is not: its bytes must be fetched again)."""
        return self.has_blob(digest) and self.blobs.exists(digest)

    def blob_repositories(self, digest: str) -> list[str]:
        """Repositories that hold ``digest``: linked there, or needed by one of
        their manifests."""
        repos = {keys.parse(k, keys.BlobUserKey).repository
                 for k, _ in self.meta.scan(keys.blob_users_prefix(digest))}
        repos |= {keys.parse(k, keys.RefKey).repository
                  for k, _ in self.meta.scan(keys.ref_prefix(digest))}
        return sorted(repos)

    def content_regions(self, repository: str, digest: str) -> set[str]:
        """Regions whose pushes put ``digest`` in ``repository`` (for residency)."""
        regions: set[str] = set()
        raw = self.meta.get(keys.blob_link(repository, digest))
        if raw is not None:
            regions.add(decode(raw, BlobLink).origin_region)
        for key, _ in self.meta.scan(keys.ref_repo_prefix(digest, repository)):
            record = self.manifest_record(repository, keys.parse(key, keys.RefKey).manifest)
            if record is not None:
                regions.add(record.residency_region)
        return regions

    def inbound_blob(self, digest: str) -> UploadFile:
        """The file an incoming blob is written to; resumes a transfer that was
        cut (or a node that was killed) where it stopped. Blocking."""
        raw = self.meta.get(keys.transfer(digest))
        if raw is not None:
            try:
                return self.blobs.resume_upload(raw.decode())
            except (FileNotFoundError, ValueError, OSError):
                pass
        upload_id = str(uuid.uuid4())
        file = self.blobs.create_upload(upload_id, Digest(digest).algorithm)
        batch = Batch()
        batch.put(keys.transfer(digest), upload_id.encode())
        self.meta.commit(batch)
        return file

    async def receive_blob(self, file: UploadFile, chunks: AsyncIterator[bytes]) -> None:
        """Append transferred bytes; durable on return (a later attempt resumes here)."""
        try:
            await self.registry.receive(file, chunks, None)
        finally:
            await self.registry.run_blocking(file.flush)

    async def commit_blob(self, file: UploadFile, digest: str) -> None:
        """Verify and store a fully transferred blob. On a digest mismatch the
        partial transfer is discarded (the next attempt starts over) and
        ``ContentRejected`` is raised."""
        done = Batch()
        done.delete(keys.transfer(digest))
        await self._seal(file, digest, done)

    async def store_sent_blob(self, digest: str, body: bytes) -> None:
        """Store a whole blob whose bytes came with its event, independently of
        any transfer of it in progress (which finds it stored when it ends).
        ``ContentRejected`` if the bytes are not the blob; nothing is kept then.
        A crash midway leaves only an upload file, which upload expiry removes."""
        def write() -> UploadFile:
            file = self.blobs.create_upload(str(uuid.uuid4()), Digest(digest).algorithm)
            try:
                file.write(body)
                file.flush()
            except BaseException:
                self.blobs.discard_upload(file)
                raise
            return file

        await self._seal(await self.registry.run_blocking(write), digest, Batch())

    async def _seal(self, file: UploadFile, digest: str, batch: Batch) -> None:
        """Move a complete upload into place as ``digest`` and record it (with
        ``batch``), or discard it and raise ``ContentRejected`` if its bytes
        hash to something else (``batch`` is still committed)."""
        registry = self.registry
        touched = registry.touched.get(digest)
        registry.touch(digest)          # before it is in place: GC spares it until linked

        def check_and_place() -> str:     # one trip to a worker thread, not two
            actual = file.digest(Digest(digest).algorithm)
            if self.unchecked:     # TEST ONLY: a deliberately broken build
                actual = digest
            if actual != digest:
                self.blobs.discard_upload(file)
            else:
                # The directory is fsynced with the next group sync, before the
                # WAL holding the record: the copy is pullable one fsync sooner,
                # and an acknowledgement (which awaits that sync) still promises
                # it durable.
                self.blobs.commit_upload(file, digest, sync_dir=False)
            return actual

        size = file.size
        actual = await registry.run_blocking(check_and_place)
        if actual == digest:
            self.meta.sync_directory(self.blobs.path(digest).parent)
        else:
            if touched is None:
                registry.touched.pop(digest, None)
            if batch:
                self.meta.commit(batch)
            raise DigestMismatch(f"transferred bytes hash to {actual}, not {digest}")
        if self.meta.get(keys.blob(digest)) is None:
            batch.put(keys.blob(digest), encode(BlobRecord(size, registry.wall_ns())))
        if batch:
            self.meta.commit(batch)

    def discard_inbound(self, digest: str) -> None:
        raw = self.meta.get(keys.transfer(digest))
        if raw is not None:
            self.blobs.discard_upload_file(raw.decode())
            batch = Batch()
            batch.delete(keys.transfer(digest))
            self.meta.commit(batch)

    def apply_blob_link(self, event: Event) -> Event | None:
        """BLOB_PUT / BLOB_MOUNT: link a blob this node holds into the repository."""
        if not self.has_blob(event.digest):
            raise MissingContent([event.digest], [])
        stamp = _stamp_of_event(event)
        repo, digest = event.repository, event.digest
        raw = self.meta.get(keys.blob_link(repo, digest))
        if raw is not None and stamp_of(decode(raw, BlobLink)) >= stamp:
            return None
        tomb = self.meta.get(keys.blob_tomb(repo, digest))
        if tomb is not None and stamp_of(decode(tomb, Tombstone)) >= stamp:
            return None
        batch = Batch()
        self.registry.link(batch, repo, digest, *stamp)
        return self._commit(batch, event)

    def apply_blob_unlink(self, event: Event) -> Event | None:
        stamp = _stamp_of_event(event)
        repo, digest = event.repository, event.digest
        raw = self.meta.get(keys.blob_link(repo, digest))
        tomb = self.meta.get(keys.blob_tomb(repo, digest))
        if raw is not None and stamp_of(decode(raw, BlobLink)) >= stamp:
            return None
        if tomb is not None and stamp_of(decode(tomb, Tombstone)) >= stamp:
            return None
        batch = Batch()
        batch.delete(keys.blob_link(repo, digest))
        batch.delete(keys.blob_user(digest, repo))
        batch.put(keys.blob_tomb(repo, digest), _tombstone(stamp))
        self.registry.drop_repo_if_emptied(batch, repo)
        return self._commit(batch, event)

    # -- manifests -------------------------------------------------------------

    def manifest_record(self, repo: str, digest: str) -> ManifestRecord | None:
        raw = self.meta.get(keys.manifest(repo, digest))
        return decode(raw, ManifestRecord) if raw is not None else None

    def manifest_body(self, repo: str, digest: str) -> tuple[ManifestRecord, bytes] | None:
        record = self.manifest_record(repo, digest)
        if record is None:
            return None
        return record, self.registry.sealer.open(record.sealed_body, manifest_ad(digest))

    def wants_manifest(self, event: Event, needed_by_index: bool = False) -> bool:
        """Whether a MANIFEST_PUT would change anything here (so its content is worth fetching)."""
        stamp = _stamp_of_event(event)
        record = self.manifest_record(event.repository, event.digest)
        if record is not None:
            return stamp_of(record) < stamp
        if needed_by_index:
            return True
        tomb = self.meta.get(keys.manifest_tomb(event.repository, event.digest))
        return tomb is None or stamp_of(decode(tomb, Tombstone)) < stamp

    def parse_manifest(self, digest: str, body: bytes, media_type: str) -> manifests.ParsedManifest:
        algorithm = Digest(digest).algorithm
        if f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}" != digest:
            raise DigestMismatch(f"manifest bytes do not hash to {digest}")
        try:
            return manifests.parse(body, media_type)
        except RegistryError as exc:
            raise ContentRejected(f"manifest {digest} is invalid: {exc}") from None

    def apply_manifest(self, event: Event, body: bytes, *, needed_by_index: bool = False,
                       origin_acked_ns: int = 0) -> Event | None:
        """MANIFEST_PUT with its bytes. ``needed_by_index``: stored even over a
        newer tombstone, because a present index needs it."""
        repo, digest = event.repository, event.digest
        stamp = _stamp_of_event(event)
        record = self.manifest_record(repo, digest)
        if record is not None:
            if stamp_of(record) >= stamp:
                return None
            batch = Batch()  # a newer push of the same bytes renews the register
            batch.put(keys.manifest(repo, digest), encode(msgspec.structs.replace(
                record, hlc=stamp[0], origin_region=stamp[1], origin_zone=stamp[2])))
            return self._commit(batch, msgspec.structs.replace(
                event, artifact_type=record.artifact_type))
        if not self.wants_manifest(event, needed_by_index):
            return None
        parsed = self.parse_manifest(digest, body, event.media_type)
        # Blobs need only be here: the manifest's references make them visible in
        # the repository (they may arrive by a fetch, without a link of their own).
        missing_blobs = [d for d in parsed.blobs if not self.has_blob(d)]
        missing_children = [d for d in parsed.children
                            if self.meta.get(keys.manifest(repo, d)) is None]
        if missing_blobs or missing_children:
            raise MissingContent(missing_blobs, missing_children)
        batch = Batch()
        self.registry.stage_manifest(batch, repo, digest, body, parsed, stamp,
                                     origin_acked_ns or event.acked_ns)
        # What webhooks need of it once it may be gone (``Event.artifact_type``).
        return self._commit(batch, msgspec.structs.replace(
            event, artifact_type=parsed.artifact_type or ""))

    def apply_manifest_delete(self, event: Event) -> Event | None:
        repo, digest = event.repository, event.digest
        stamp = _stamp_of_event(event)
        record = self.manifest_record(repo, digest)
        tomb = self.meta.get(keys.manifest_tomb(repo, digest))
        if tomb is not None and stamp_of(decode(tomb, Tombstone)) >= stamp:
            return None
        batch = Batch()
        if record is not None:
            if stamp_of(record) >= stamp or self.meta.has_prefix(keys.ref_repo_prefix(digest, repo)):
                return None  # renewed since, or an index here needs it: the delete loses
            if event.request == RETENTION_REQUEST and self._kept_from_retention(repo, digest):
                return None
            self.registry.stage_manifest_removal(batch, repo, digest, record, stamp[0])
            # Webhooks tell a chart's delete apart by what the manifest was.
            event = msgspec.structs.replace(event, artifact_type=record.artifact_type)
        self.registry.stage_tags_removal(batch, repo, digest, stamp)
        self.registry.stage_manifest_tombstone(batch, event, record)
        self.registry.drop_repo_if_emptied(batch, repo)
        return self._commit(batch, event)

    def _kept_from_retention(self, repo: str, digest: str) -> bool:
        """Retention never deletes what a lock protects or a tag names (ACR). Its
        deciding region saw the manifest untagged and unlocked, but may never
        see a lock or tag set here (a confined region's stay in it), whatever
        their stamps: one older than the untag would lose by stamp alone. A
        tag here whose untag has not arrived yet keeps it too, until
        anti-entropy brings the delete again once it has."""
        if self.registry.locks.overridden_by(EventKind.MANIFEST_DELETE, repo, "", digest):
            return True
        return any(decode(raw, TagRecord).digest == digest
                   for _, raw in self.meta.scan(keys.tag_prefix(repo)))

    # -- tags ------------------------------------------------------------------

    def _tag_stamp(self, repo: str, tag: str) -> Stamp | None:
        raw = self.meta.get(keys.tag(repo, tag))
        if raw is not None:
            return stamp_of(decode(raw, TagRecord))
        tomb = self.meta.get(keys.tag_tomb(repo, tag))
        return stamp_of(decode(tomb, Tombstone)) if tomb is not None else None

    def wants_tag(self, event: Event) -> bool:
        current = self._tag_stamp(event.repository, event.tag)
        return current is None or current < _stamp_of_event(event)

    def apply_tag(self, event: Event, origin_acked_ns: int = 0) -> Event | None:
        """TAG_SET: needs its manifest here, unless a newer delete of that
        manifest makes this tag set a delete."""
        repo, tag, digest = event.repository, event.tag, event.digest
        stamp = _stamp_of_event(event)
        if not self.wants_tag(event):
            return None
        batch = Batch()
        if self.meta.get(keys.manifest(repo, digest)) is None:
            tomb = self.meta.get(keys.manifest_tomb(repo, digest))
            if tomb is None or stamp_of(decode(tomb, Tombstone)) < stamp:
                raise MissingContent([], [digest])
            # The delete already ended this value: a tombstone with its own
            # stamp, as the cascade of that delete leaves on every replica.
            self.registry.stage_tag_tombstone(batch, repo, tag, stamp, digest)
            self.registry.drop_repo_if_emptied(batch, repo)
            return self._commit(batch, event)
        self.registry.stage_tag(batch, repo, tag, digest, stamp, origin_acked_ns or event.acked_ns)
        return self._commit(batch, event)

    def apply_tag_delete(self, event: Event) -> Event | None:
        repo, tag = event.repository, event.tag
        stamp = _stamp_of_event(event)
        raw = self.meta.get(keys.tag(repo, tag))
        if raw is not None:
            # A tie is the value itself, ended elsewhere by a delete of its
            # manifest (an index kept it here): the tombstone wins.
            if stamp_of(decode(raw, TagRecord)) > stamp:
                return None
        else:
            tomb = self.meta.get(keys.tag_tomb(repo, tag))
            if tomb is not None and stamp_of(decode(tomb, Tombstone)) >= stamp:
                return None
        batch = Batch()
        self.registry.stage_tag_delete(batch, event)
        self.registry.drop_repo_if_emptied(batch, repo)
        return self._commit(batch, event)

    # -- changeable attributes ---------------------------------------------------

    def apply_attributes(self, event: Event) -> Event | None:
        """ATTRIBUTES_SET: a register of its own, last writer wins by stamp. It
        needs nothing else here (attributes of a tag not yet arrived wait for
        it), and nothing else ever writes it: a push racing a lock cannot
        revert the lock, wherever the two meet."""
        if event.attributes is None:
            return None
        repo = event.repository
        if event.tag:
            target = locks.tag(repo, event.tag)
        elif event.digest:
            target = locks.manifest(repo, event.digest)
        else:
            target = locks.repository(repo)
        stamp = _stamp_of_event(event)
        if not self.registry.locks.wins(target, stamp):
            return None
        batch = Batch()
        self.registry.locks.stage(batch, target, event.attributes, stamp, event.acked_ns)
        return self._commit(batch, event)

    # -- what replication asks of this node ------------------------------------

    def record_failure(self, repo: str, digest: str, reason: str, source: str = "") -> None:
        batch = Batch()
        batch.put(keys.failure(repo, digest),
                  encode(ReplicationFailure(reason, self.registry.wall_ns(), source)))
        self.meta.commit(batch)

    def failure(self, repo: str, digest: str) -> ReplicationFailure | None:
        raw = self.meta.get(keys.failure(repo, digest))
        return decode(raw, ReplicationFailure) if raw is not None else None

    def repositories(self, buckets: Iterable[int] | None = None) -> list[str]:
        """Every repository holding a tag or manifest register, live or deleted
        (what anti-entropy compares; one key each, not a scan of their content);
        with ``buckets``, those of these fingerprint buckets only."""
        return self.meta.fingerprinted_repositories(buckets)

    def bucket_fingerprint(self, bucket: int, visible: Callable[[str], bool]) -> bytes:
        """The ``SUMMED`` fingerprint of every repository of ``bucket`` together,
        over the registers whose region passes ``visible`` (which must not
        depend on the repository)."""
        return fingerprints.visible_fingerprint(self.meta.bucket_sums(bucket), visible)

    def repository_state(self, repo: str, visible: Callable[[str], bool]) -> dict[str, list[RegisterState]]:
        """Tags and manifests (live and deleted) of ``repo`` whose origin region
        passes ``visible``. Blob links are left out: a blob that matters is
        carried by the manifests that need it. Attributes registers are
        ``attributes_state``'s."""
        tags: list[RegisterState] = []
        for key, raw in self.meta.scan(keys.tag_prefix(repo)):
            rec = decode(raw, TagRecord)
            if visible(rec.origin_region):
                tags.append(RegisterState(keys.parse(key, keys.TagKey).tag, rec.digest,
                                          False, stamp_of(rec), origin_acked_ns=rec.origin_acked_ns))
        manifests_out: list[RegisterState] = []
        for key, raw in self.meta.scan(keys.manifest_prefix(repo)):
            rec = decode(raw, ManifestRecord)
            if visible(rec.residency_region):
                digest = keys.parse(key, keys.ManifestKey).digest
                manifests_out.append(RegisterState(
                    digest, digest, False, stamp_of(rec), rec.media_type, rec.size,
                    rec.references, rec.origin_acked_ns, rec.residency_region))
        for key, raw in self.meta.scan(keys.tomb_prefix(repo)):
            tomb = decode(raw, Tombstone)
            if not visible(tomb.origin_region):
                continue
            match keys.parse(key):
                case keys.TagTombKey(tag=tag):
                    kept = self.registry.bin.tag(repo, tag)
                    recycled = kept is not None and stamp_of(kept) == stamp_of(tomb)
                    tags.append(RegisterState(
                        tag, tomb.digest, True, stamp_of(tomb), recycled=recycled,
                        origin_acked_ns=kept.deleted_ns if recycled and kept else 0))
                case keys.ManifestTombKey(digest=digest):
                    # From the tombstone, not the bin: a node that never held
                    # the body keeps no entry, yet its register must not turn
                    # a soft delete into a hard one where it repairs others.
                    manifests_out.append(RegisterState(
                        digest, digest, True, stamp_of(tomb), recycled=tomb.recycled,
                        recycled_tags=tomb.recycled_tags, origin_acked_ns=tomb.deleted_ns,
                        retention=tomb.retention))
        return {"tags": tags, "manifests": manifests_out}

    def attributes_state(self, repo: str, visible: Callable[[str], bool]) -> list[Event]:
        """Every attributes register of ``repo`` (the repository's, its tags',
        its manifests') whose origin region passes ``visible``, each as the
        ``ATTRIBUTES_SET`` event applying it amounts to: anti-entropy repairs
        them as the log would have (last writer wins by stamp), so a node that
        missed the event (a log truncated behind it, a node rebuilt from its
        peers) still ends up with every lock."""
        out = []
        for key, raw in self.meta.scan(keys.attributes_prefix(repo)):
            record = decode(raw, AttributesRecord)
            if not visible(record.origin_region):
                continue
            target = keys.parse(key, keys.AttributesKey)
            out.append(Event(
                kind=EventKind.ATTRIBUTES_SET, repository=repo,
                tag=target.tag if isinstance(target, keys.TagAttributesKey) else "",
                digest=target.digest if isinstance(target, keys.ManifestAttributesKey) else "",
                origin_region=record.origin_region, origin_zone=record.origin_zone,
                hlc=record.hlc, acked_ns=record.updated_ns, attributes=record.attributes))
        return out

    def holds_register(self, repo: str, kind: EventKind, key: str) -> bool:
        """Whether this node holds anything — a value or a tombstone — of the tag
        (``key``, for tag kinds) or manifest (``key``: its digest) register."""
        if kind in (EventKind.TAG_SET, EventKind.TAG_DELETE):
            return (self.meta.get(keys.tag(repo, key)) is not None
                    or self.meta.get(keys.tag_tomb(repo, key)) is not None)
        return (self.meta.get(keys.manifest(repo, key)) is not None
                or self.meta.get(keys.manifest_tomb(repo, key)) is not None)

    def fingerprint(self, repo: str, visible: Callable[[str], bool],
                    scheme: int = fingerprints.SUMMED) -> bytes:
        """A digest of ``repository_state``: equal fingerprints, equal state.
        ``SUMMED`` is read from the sums maintained on write (``fingerprints``):
        O(regions), whatever the repository holds. ``RECOMPUTED`` is what
        georeg sent before them, for peers that still compare in it: a scan of
        the repository. Manifests count by presence only, since their
        registers' stamps are renewed by tag sets that residency may keep
        from some replicas."""
        if scheme == fingerprints.SUMMED:
            return fingerprints.visible_fingerprint(self.meta.fingerprint_sums(repo), visible)
        if scheme != fingerprints.RECOMPUTED:
            raise ValueError(f"unknown fingerprint scheme {scheme}")
        state = self.repository_state(repo, visible)
        h = hashlib.sha256()
        for reg in sorted(state["tags"], key=lambda r: r.key):
            h.update(f"t|{reg.key}|{reg.digest}|{int(reg.deleted)}|{reg.stamp}\n".encode())
        for reg in sorted(state["manifests"], key=lambda r: r.key):
            h.update(f"m|{reg.key}|{int(reg.deleted)}|{reg.stamp if reg.deleted else ''}\n".encode())
        return h.digest()

    def content_summary(self) -> dict[str, dict[str, int]]:
        """Images and distinct blob bytes held here, by the region they were first
        pushed in (what a new replica's sync progress is measured against).
        Maintained on write (``content_counts``): health checks ask every
        second, and an answer costs one read at any size."""
        return self.meta.content_summary()

    def stored_bytes(self) -> int:
        """Plaintext bytes of every blob this node holds."""
        return sum(decode(raw, BlobRecord).size for _, raw in self.meta.scan(keys.BLOB))

    def tag_record(self, repo: str, tag: str) -> TagRecord | None:
        raw = self.meta.get(keys.tag(repo, tag))
        return decode(raw, TagRecord) if raw is not None else None

    def resolve_tag(self, repo: str, tag: str) -> str | None:
        record = self.tag_record(repo, tag)
        return record.digest if record is not None else None

    def image_state(self, repo: str, digest: str) -> ImageState:
        record = self.manifest_record(repo, digest)
        failure = self.failure(repo, digest)
        reason = failure.reason if failure else ""
        if record is None:
            return ImageState(False, failure=reason)
        blobs = [d for d in record.references if self.has_blob(d)
                 or self.meta.get(keys.manifest(repo, d)) is not None]
        return ImageState(True, record.created_ns, record.origin_acked_ns,
                          record.residency_region, reason,
                          len(blobs), len(record.references), record.media_type)


def register_event(repo: str, kind: EventKind, reg: RegisterState) -> Event:
    """The event that applying a register received through anti-entropy amounts
    to (a retention delete's as retention's request, which a lock refuses)."""
    hlc, region, zone = reg.stamp
    return Event(kind=kind, repository=repo, digest=reg.digest, tag=reg.key if kind in (
        EventKind.TAG_SET, EventKind.TAG_DELETE) else "", media_type=reg.media_type,
        size=reg.size, references=reg.references, origin_region=region, origin_zone=zone,
        hlc=hlc, acked_ns=reg.origin_acked_ns, recycled=reg.recycled,
        recycled_tags=reg.recycled_tags,
        request=RETENTION_REQUEST if reg.retention else None)
