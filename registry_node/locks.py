"""Changeable attributes — ACR's locks — of repositories, tags and manifests:
what is stored, how a change is made and merged, and which operations they
refuse.

Each repository, each tag and each manifest has ``writeEnabled``,
``deleteEnabled``, ``readEnabled`` and ``listEnabled`` (all true until
changed). Each set of four is a last-writer-wins register of its own
(``keys.*_attributes``), ordered by the ``Stamp`` of the change, apart from
the tag or manifest it is about. That separation is the point: a push never
writes attributes, so a lock set in one region while the same tag is pushed
in another is never reverted, in any region, whatever order the two arrive
in (the race of Azure/acr #592). A change is logged as one
``ATTRIBUTES_SET`` event carrying the register's whole new value, so
applying it anywhere is a plain comparison of stamps.

Rules (ACR's, where ACR states one; ``docs/locks.md`` says where each comes from):

* **write** disabled on a repository refuses every push into it (uploads,
  mounts, manifests) and every delete in it; on a tag, moving that tag
  (a push of another manifest by that tag) and deleting it; on a manifest,
  deleting it. ``writeEnabled: false`` therefore protects from deletion too
  (Azure/acr #561: "write-enabled: block both update and delete").
* **delete** disabled refuses deleting the repository, tag or manifest. A
  manifest delete (by digest, or ACR's delete by tag) also deletes the tags
  on it, so any of them being locked refuses it too.
* **read** disabled refuses pulling the manifest (by tag or digest): on a
  repository, every manifest of it. Blob reads are not gated, on a manifest
  or on a repository: whoever knows a blob's digest still gets its bytes.
* **list** disabled leaves the tag out of ``tags/list`` and ``_tags``, the
  manifest out of ``_manifests`` and the repository out of ``_catalog``;
  each stays readable by name.
* A tag's or manifest's attributes cannot be changed while its repository
  is write-disabled (ACR: "run Update-AzContainerRegistryRepository
  -WriteEnabled $true first").
* A tag keeps its attributes when it moves to another manifest: they are the
  tag's, not the manifest's. A manifest pushed for the first time has the
  defaults. Attributes outlive a delete of what they are about (a re-created
  tag is as locked as the old one was) — ACR documents nothing here; georeg
  takes the answer under which no lock ever disappears silently.

Every refusal is ``405 REGISTRY_DISALLOWED_OPERATION`` with ACR's message,
before anything changes. No HTTP here.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import keys
from .errors import ErrorCode, RegistryError
from .metastore import Batch, MetadataStore
from .records import (
    AttributesRecord,
    ChangeableAttributes,
    EventKind,
    Stamp,
    TagRecord,
    decode,
    encode,
    stamp_of,
)

REPOSITORY, TAG, MANIFEST = "repository", "tag", "manifest"
DEFAULT = ChangeableAttributes()

# The JSON names of ACR's ``changeableAttributes`` and the fields they set.
ACR_FIELDS = {"deleteEnabled": "delete_enabled", "writeEnabled": "write_enabled",
              "readEnabled": "read_enabled", "listEnabled": "list_enabled"}


@dataclass(frozen=True, slots=True)
class Target:
    """What a set of attributes is about: a repository, or one of its tags
    (``name`` the tag) or manifests (``name`` the digest)."""

    kind: str
    repository: str
    name: str = ""

    def key(self) -> bytes:
        if self.kind == TAG:
            return keys.tag_attributes(self.repository, self.name)
        if self.kind == MANIFEST:
            return keys.manifest_attributes(self.repository, self.name)
        return keys.repository_attributes(self.repository)

    def describe(self) -> str:
        if self.kind == TAG:
            return f"tag {self.repository}:{self.name}"
        if self.kind == MANIFEST:
            return f"manifest {self.repository}@{self.name}"
        return f"repository {self.repository}"


def repository(name: str) -> Target:
    return Target(REPOSITORY, name)


def tag(name: str, tag_name: str) -> Target:
    return Target(TAG, name, tag_name)


def manifest(name: str, digest: str) -> Target:
    return Target(MANIFEST, name, digest)


def changed(current: ChangeableAttributes, update: dict[str, bool]) -> ChangeableAttributes:
    """``current`` with the fields ACR's JSON names in ``update`` set."""
    values = {field: getattr(current, field) for field in ACR_FIELDS.values()}
    for name, value in update.items():
        values[ACR_FIELDS[name]] = value
    return ChangeableAttributes(**values)


def parse_update(body: object) -> dict[str, bool]:
    """A PATCH body: a JSON object of some of ACR's four booleans. Raises a
    400 that says what is wrong (nothing else is accepted, so a typo never
    passes for a change that did not happen)."""
    if not isinstance(body, dict):
        raise _bad_request("the body must be a JSON object, e.g. {\"writeEnabled\": false}")
    unknown = sorted(set(body) - set(ACR_FIELDS))
    if unknown:
        raise _bad_request(f"unknown attribute(s) {', '.join(unknown)}; the changeable "
                           f"attributes are {', '.join(ACR_FIELDS)}")
    wrong = sorted(name for name, value in body.items() if not isinstance(value, bool))
    if wrong:
        raise _bad_request(f"{', '.join(wrong)} must be true or false")
    return body


def _bad_request(reason: str) -> RegistryError:
    return RegistryError(ErrorCode.UNSUPPORTED, reason, message="invalid attributes", status=400)


def disallowed(reason: str) -> RegistryError:
    """ACR's refusal of an operation that changeable attributes forbid."""
    return RegistryError(ErrorCode.REGISTRY_DISALLOWED_OPERATION, {"reason": reason})


class Locks:
    """The attributes registers of one node's store, and the checks on them.
    Reads only the store: every check is a few point lookups, and an
    operation on content without attributes pays one miss per register."""

    def __init__(self, meta: MetadataStore) -> None:
        self.meta = meta

    # -- registers -------------------------------------------------------------

    def record(self, target: Target) -> AttributesRecord | None:
        raw = self.meta.get(target.key())
        return decode(raw, AttributesRecord) if raw is not None else None

    def of(self, target: Target) -> ChangeableAttributes:
        record = self.record(target)
        return record.attributes if record is not None else DEFAULT

    def stage(self, batch: Batch, target: Target, attributes: ChangeableAttributes,
              stamp: Stamp, updated_ns: int) -> None:
        hlc, region, zone = stamp
        batch.put(target.key(), encode(AttributesRecord(attributes, hlc, region, zone,
                                                        updated_ns)))

    def wins(self, target: Target, stamp: Stamp) -> bool:
        """Whether a change stamped ``stamp`` is newer than the register's value."""
        record = self.record(target)
        return record is None or stamp_of(record) < stamp

    def of_tags(self, name: str) -> dict[str, ChangeableAttributes]:
        """The attributes set on tags of ``name`` (tags never changed are absent)."""
        return {keys.parse(k, keys.TagAttributesKey).tag: decode(v, AttributesRecord).attributes
                for k, v in self.meta.scan(keys.tag_attributes_prefix(name))}

    def of_manifests(self, name: str) -> dict[str, ChangeableAttributes]:
        return {keys.parse(k, keys.ManifestAttributesKey).digest:
                decode(v, AttributesRecord).attributes
                for k, v in self.meta.scan(keys.manifest_attributes_prefix(name))}

    # -- checks ------------------------------------------------------------------

    def check_change(self, target: Target) -> None:
        """A tag's or manifest's attributes change only while its repository
        may be written (ACR's rule)."""
        if target.kind != REPOSITORY and not self.of(repository(target.repository)).write_enabled:
            raise disallowed(f"repository {target.repository} is write-disabled; enable "
                             f"writes on it before changing the attributes of its "
                             f"{target.kind}s")

    def check_upload(self, name: str) -> None:
        """A blob upload or mount into ``name``."""
        if not self.of(repository(name)).write_enabled:
            raise disallowed(f"repository {name} is write-disabled")

    def check_push(self, name: str, tag_name: str | None, tag_moves: bool) -> None:
        """A manifest push into ``name``, by ``tag_name`` when given; ``tag_moves``:
        the tag would be created or point elsewhere (a push of what it already
        names changes nothing, and is answered as the no-op it is)."""
        self.check_upload(name)
        if tag_name is not None and tag_moves and not self.of(tag(name, tag_name)).write_enabled:
            raise disallowed(f"tag {name}:{tag_name} is write-disabled")

    def check_delete_blob(self, name: str) -> None:
        """A blob delete (``DELETE /v2/<name>/blobs/<digest>``): a delete in
        the repository, refused as every other one is."""
        self._check_deletable(repository(name))

    def check_untag(self, name: str, tag_name: str) -> None:
        self._check_deletable(repository(name))
        self._check_deletable(tag(name, tag_name))

    def check_delete_manifest(self, name: str, digest: str) -> None:
        """A manifest delete, which takes the tags on it along: any of them
        locked refuses it too."""
        self._check_deletable(repository(name))
        self._check_deletable(manifest(name, digest))
        for tag_name, attributes in self.of_tags(name).items():
            if attributes.delete_enabled and attributes.write_enabled:
                continue
            raw = self.meta.get(keys.tag(name, tag_name))
            if raw is not None and decode(raw, TagRecord).digest == digest:
                self._check_deletable(tag(name, tag_name))

    def check_delete_repository(self, name: str) -> None:
        """A repository delete: refused whole, before any of its deletes, when
        anything in it may not be deleted at its start. A lock that lands
        midway (replicated, or set here between two of its commits) stops it
        there, and its answer is indefinite and says what was done
        (``Registry.delete_repository``)."""
        self._check_deletable(repository(name))
        for tag_name, attributes in self.of_tags(name).items():
            if not (attributes.delete_enabled and attributes.write_enabled) \
                    and self.meta.get(keys.tag(name, tag_name)) is not None:
                self._check_deletable(tag(name, tag_name))
        for digest, attributes in self.of_manifests(name).items():
            if not (attributes.delete_enabled and attributes.write_enabled) \
                    and self.meta.get(keys.manifest(name, digest)) is not None:
                self._check_deletable(manifest(name, digest))

    def _check_deletable(self, target: Target) -> None:
        attributes = self.of(target)
        if not attributes.write_enabled:
            raise disallowed(f"{target.describe()} is write-disabled, which protects it "
                             f"from deletion too")
        if not attributes.delete_enabled:
            raise disallowed(f"{target.describe()} is delete-disabled")

    def check_read(self, name: str, tag_name: str | None, digest: str) -> None:
        """A manifest pull, by ``tag_name`` (None: by digest) resolving to ``digest``."""
        self.check_read_repository(name)
        if tag_name is not None and not self.of(tag(name, tag_name)).read_enabled:
            raise disallowed(f"tag {name}:{tag_name} is read-disabled")
        if not self.of(manifest(name, digest)).read_enabled:
            raise disallowed(f"manifest {name}@{digest} is read-disabled")

    def check_read_repository(self, name: str) -> None:
        if not self.of(repository(name)).read_enabled:
            raise disallowed(f"repository {name} is read-disabled")

    def overridden_by(self, kind: EventKind, name: str, tag_name: str,
                      digest: str) -> str | None:
        """Why a write of ``kind`` would be refused here, were it made here now
        (None: it would not be). A replicated write is applied all the same (a
        lock protects from when it reaches a region: ``docs/locks.md``); the
        replicator asks this before applying one, to say that it landed on a
        lock."""
        try:
            if kind is EventKind.TAG_SET:
                raw = self.meta.get(keys.tag(name, tag_name))
                self.check_push(name, tag_name, raw is None
                                or decode(raw, TagRecord).digest != digest)
            elif kind is EventKind.TAG_DELETE:
                if self.meta.get(keys.tag(name, tag_name)) is not None:
                    self.check_untag(name, tag_name)
            elif kind is EventKind.MANIFEST_DELETE:
                if self.meta.get(keys.manifest(name, digest)) is not None:
                    self.check_delete_manifest(name, digest)
            elif kind is EventKind.BLOB_DELETE:
                self.check_delete_blob(name)
        except RegistryError as exc:
            return str((exc.detail or {}).get("reason", exc.message))
        return None

    def unlisted_tags(self, name: str) -> set[str]:
        return {t for t, a in self.of_tags(name).items() if not a.list_enabled}

    def unlisted_manifests(self, name: str) -> set[str]:
        return {d for d, a in self.of_manifests(name).items() if not a.list_enabled}

    def listed(self, name: str) -> bool:
        return self.of(repository(name)).list_enabled
