"""Registry configuration: the settings around the data (the registry's own
properties, and its identities: tokens, scope maps, identities, role
assignments — ``identities``; webhooks; cache rules and credential sets —
``cache_rules``; locks … as they come), held by every
node, written only through the home region.

An object is addressed by ``(kind, name)``; its value is a msgspec Struct of
its kind (``KINDS``). Each object is a last-writer-wins register stamped like
a tag — (HLC, origin region, origin zone) — and a delete leaves a tombstone
with its stamp, so every node that has seen the same writes, in any order,
holds the same objects. Writes and deletes are logged as ``config_set`` /
``config_delete`` events in the same batch as the object, and replication
carries them to every node: configuration is registry-wide, so residency never
holds it back (a confined region receives it like any other; it only never
*originates* there, because only the home region's management API writes).

The interface other code reads (an auth cache, the request chain)::

    config = app[CONFIGURATION]              # or Node.configuration
    config.get("registry", "default")       # -> RegistryProperties | None
    config.tier()                           # -> the registry's tier (``tiers``)
    config.items("token")                   # -> [(name, Token), ...] live objects, by name
    config.generation                       # -> int; grows whenever what this node holds changes

``get`` and ``items`` read what this node holds *now* (never another node):
enforcement goes on while the home region is down. ``generation`` starts at
0 in each process and grows by one with every change applied here — a write,
a delete, a replicated change, an anti-entropy repair — and never otherwise;
a cache that remembers the generation it was built at is stale exactly when
the number differs. Reads are cheap (a dict lookup once read); do not hold
the returned Structs across a generation change. A kind absent from a node
(never written) reads as ``None`` / ``[]``: callers apply the kind's defaults
(``RegistryProperties()``).

Adding a kind is a row in ``KINDS``: a name (lowercase, ``-`` allowed), a
Struct with defaults for every field (values written by an older georeg
decode with them), for a singleton the one name it may have, the check a
value must pass beyond its types, and for a kind that carries secrets (a
webhook's header values) how they are sealed before the value is stored
(``configuration_key``: a value is never stored with a secret in
plaintext). Values are validated when written (unknown fields, wrong types
and names refused with a 4xx, never a 500); a node stores and relays a kind
it does not know (a newer node's) as the bytes it received.

Writes (``put``, ``delete``) are for the node-internal route the management
API calls on a home node; they wait for zone quorum like a push. ``put``
seals a kind's secrets with this node's configuration key (the cluster's, or
a standalone node's own) and refuses a sealed secret that does not open here;
replication stores what it carries as it is.

Invariants
    * One batch holds an object's register and its event: a crash keeps both
      or neither; an acknowledged write survives ``kill -9``.
    * Applying anything twice, or older than what is held, is a no-op that
      writes and logs nothing (no echo between replicas).
    * ``generation`` changes iff a register here changed.

No HTTP here: refusals are ``RegistryError``s; the API layer sends them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from . import cache_rules, identities, keys, recycle_bin, tasks, tiers, untagged, webhooks
from .configuration_key import ConfigurationKey
from .errors import ErrorCode, RegistryError
from .metastore import Batch
from .records import CONFIG_KINDS, ConfigRecord, Event, EventKind, Stamp, decode, encode, stamp_of
from .registry import Registry


class RegistryProperties(msgspec.Struct, frozen=True):
    """The registry's own switches (ACR's ``adminUserEnabled``,
    ``anonymousPullEnabled``), its name (the admin user's username), the
    admin user's two password hashes (``identities``), its tier (ACR's
    ``sku.name``: ``tiers``; "" where a georeg before tiers were configuration
    wrote the object: the default tier), its retention policy for untagged
    manifests (``untagged``) and its soft delete policy (``recycle_bin``);
    singleton ``registry/default``."""

    admin_enabled: bool = False
    anonymous_pull_enabled: bool = False
    name: str = ""
    admin_passwords: tuple[identities.Secret, ...] = ()
    sku: str = ""
    # Retention of untagged manifests (ACR's policies.retentionPolicy; ``untagged``);
    # ``retention_enabled_ns``: when it was last enabled (the control plane's clock).
    retention_enabled: bool = False
    retention_days: int = untagged.DEFAULT_DAYS
    retention_enabled_ns: int = 0
    soft_delete: recycle_bin.SoftDeletePolicy = recycle_bin.SoftDeletePolicy()


def _check_registry(name: str, value: RegistryProperties) -> None:
    identities.check_admin_passwords(value.admin_passwords)
    if (problem := recycle_bin.policy_problem(value.soft_delete)) is not None:
        raise identities.InvalidValue(problem)
    if value.sku and value.sku not in tiers.TIERS:
        raise identities.InvalidValue(f"sku {value.sku[:32]!r} is not one of "
                                      f"{', '.join(tiers.TIERS)}")
    try:
        untagged.check_days(value.retention_days)
    except ValueError as exc:
        raise identities.InvalidValue(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    value: type[msgspec.Struct]
    singleton: str = ""            # the one name a singleton kind's object has
    # What a value must satisfy beyond its types; raises ``identities.InvalidValue``.
    check: Callable[[str, Any], None] | None = None
    # The value as stored, its secrets sealed (key, name, value); raises
    # ``identities.InvalidValue`` for a sealed secret that does not open here.
    seal: Callable[[ConfigurationKey, str, Any], Any] | None = None


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("registry", RegistryProperties, singleton="default", check=_check_registry),
    Kind(identities.TOKEN, identities.Token, check=identities.check_token),
    Kind(identities.SCOPE_MAP, identities.ScopeMap, check=identities.check_scope_map),
    Kind(identities.IDENTITY, identities.Identity, check=identities.check_identity),
    Kind(identities.ROLE_ASSIGNMENT, identities.Assignment, check=identities.check_assignment),
    Kind(webhooks.WEBHOOK, webhooks.Webhook, check=webhooks.check_webhook,
         seal=webhooks.sealed_webhook),
    Kind(cache_rules.CACHE_RULE, cache_rules.CacheRule, check=cache_rules.check_cache_rule),
    Kind(cache_rules.CREDENTIAL_SET, cache_rules.CredentialSet,
         check=cache_rules.check_credential_set, seal=cache_rules.sealed_credential_set),
    Kind(tasks.TASK, tasks.Task, check=tasks.check_task),
)}

# Object names: ACR's resource names (tokens, scope maps, webhooks) plus the
# leading underscore of its system scope maps; no "/", no NUL, no dot first
# (so never "." or ".."), at most 64 characters.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
KIND_NAME = re.compile(r"[a-z][a-z-]{0,31}")
MAX_VALUE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One register as this node holds it (objects and tombstones alike)."""

    kind: str
    name: str
    value: msgspec.Struct | None    # None for a tombstone, or a kind this node does not know
    deleted: bool
    stamp: Stamp
    origin_acked_ns: int = 0

    def as_dict(self) -> dict[str, Any]:
        hlc, region, zone = self.stamp
        return {"kind": self.kind, "name": self.name, "deleted": self.deleted,
                "value": msgspec.to_builtins(self.value) if self.value is not None else None,
                "stamp": {"hlc": hlc, "region": region, "zone": zone},
                "acked_ns": self.origin_acked_ns}


def kind_of(kind: str) -> Kind:
    found = KINDS.get(kind)
    if found is None:
        raise RegistryError(ErrorCode.UNSUPPORTED, f"no configuration kind {kind[:64]!r}; "
                            f"the kinds are {', '.join(sorted(KINDS))}",
                            message="unknown configuration kind", status=404)
    return found


def check_name(kind: Kind, name: str) -> str:
    if kind.singleton:
        if name != kind.singleton:
            raise RegistryError(ErrorCode.NAME_INVALID, f"{kind.name} is a singleton: its one "
                                f"object is named {kind.singleton!r}",
                                message="invalid configuration object name")
        return name
    if not NAME.fullmatch(name):
        raise RegistryError(ErrorCode.NAME_INVALID, "a name is 1 to 64 letters, digits, '_', "
                            "'.' or '-', and does not start with '.' or '-'",
                            message="invalid configuration object name")
    return name


def validate(kind: Kind, value: object, name: str = "") -> msgspec.Struct:
    """``value`` (decoded JSON) as the kind's Struct, checked, or a 400 saying what is wrong."""
    def invalid(reason: str) -> RegistryError:
        return RegistryError(ErrorCode.UNSUPPORTED, reason, message="invalid configuration value",
                             status=400)

    if not isinstance(value, dict):
        raise invalid(f"a {kind.name} is a JSON object")
    unknown = sorted(set(value) - set(kind.value.__struct_fields__))
    if unknown:
        raise invalid(f"unknown fields {unknown[:10]}; a {kind.name} has "
                      f"{list(kind.value.__struct_fields__)}")
    try:
        struct = msgspec.convert(value, kind.value, strict=True)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None
    if kind.check is not None:
        try:
            kind.check(name, struct)
        except identities.InvalidValue as exc:
            raise invalid(str(exc)) from None
    return struct


class Configuration:
    """This node's registry configuration (see the module docstring)."""

    def __init__(self, registry: Registry, key: ConfigurationKey) -> None:
        self.registry = registry
        self.key = key              # seals the secrets a value carries (``put``)
        self.meta = registry.meta
        self._generation = 0
        self._cache: dict[tuple[str, str], msgspec.Struct | None] = {}
        self._listeners: list[Callable[[int], None]] = []
        self._fingerprint: tuple[int, bytes] | None = None     # (generation, digest)

    # -- reads -------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, kind: str, name: str) -> msgspec.Struct | None:
        """The live object ``name`` of ``kind`` held here, or None."""
        cached = self._cache.get((kind, name), _MISSING)
        if cached is not _MISSING:
            return cached
        found = None
        if kind in KINDS and _well_formed(kind, name):
            record = self._record(kind, name)
            if record is not None and not record.deleted:
                found = _decode_value(KINDS[kind], record.value)
        self._cache[(kind, name)] = found
        return found

    def tier(self) -> str:
        """The registry's tier as this node holds it (the default tier until
        one is written)."""
        properties = self.get("registry", "default")
        sku = properties.sku if isinstance(properties, RegistryProperties) else ""
        return sku or tiers.DEFAULT_TIER

    def retention(self) -> untagged.RetentionPolicy:
        """The registry's retention policy for untagged manifests as this node
        holds it (disabled until one is written)."""
        properties = self.get("registry", "default")
        if not isinstance(properties, RegistryProperties):
            return untagged.RetentionPolicy()
        return untagged.RetentionPolicy(properties.retention_enabled, properties.retention_days,
                                        properties.retention_enabled_ns)

    def soft_delete(self) -> recycle_bin.SoftDeletePolicy:
        """The soft delete policy as this node holds it (off until one is written)."""
        properties = self.get("registry", "default")
        return properties.soft_delete if isinstance(properties, RegistryProperties) \
            else recycle_bin.SoftDeletePolicy()

    def items(self, kind: str) -> list[tuple[str, msgspec.Struct]]:
        """Every live object of ``kind`` held here, by name."""
        if kind not in KINDS:
            return []
        return [(obj.name, obj.value) for obj in self.registers(kind)
                if not obj.deleted and obj.value is not None]

    def registers(self, kind: str | None = None) -> list[StoredObject]:
        """Objects and tombstones held here, with their stamps (the read API)."""
        prefix = keys.configuration_prefix(kind) if kind is not None else keys.CONFIG
        out = []
        for key, raw in self.meta.scan(prefix):
            parsed = keys.parse(key, keys.ConfigKey)
            record = decode(raw, ConfigRecord)
            known = KINDS.get(parsed.kind)
            value = None if record.deleted or known is None else _decode_value(known, record.value)
            out.append(StoredObject(parsed.kind, parsed.name, value, record.deleted,
                                    stamp_of(record), record.origin_acked_ns))
        return out

    def register(self, kind: str, name: str) -> StoredObject | None:
        """One register held here (object or tombstone), with its stamp."""
        if not _well_formed(kind, name):
            return None
        record = self._record(kind, name)
        if record is None:
            return None
        known = KINDS.get(kind)
        value = None if record.deleted or known is None else _decode_value(known, record.value)
        return StoredObject(kind, name, value, record.deleted, stamp_of(record),
                            record.origin_acked_ns)

    def on_change(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(generation)`` after every change held here."""
        self._listeners.append(listener)

    # -- writes at the home region ----------------------------------------------------

    async def put(self, kind: str, name: str, value: object) -> StoredObject:
        """Validate and write an object; returns it as stored, once durable."""
        spec = kind_of(kind)
        check_name(spec, name)
        struct = validate(spec, value, name)
        if spec.seal is not None:
            try:
                struct = spec.seal(self.key, name, struct)
            except identities.InvalidValue as exc:
                raise RegistryError(ErrorCode.UNSUPPORTED, str(exc),
                                    message="invalid configuration value", status=400) from None
        raw = encode(struct)
        if len(raw) > MAX_VALUE_BYTES:
            raise RegistryError(ErrorCode.SIZE_INVALID, f"a configuration value is at most "
                                f"{MAX_VALUE_BYTES} bytes", message="configuration value too large",
                                status=413)
        return await self._write(EventKind.CONFIG_SET, kind, name, raw, struct)

    async def delete(self, kind: str, name: str) -> StoredObject:
        """Delete a live object (a tombstone replaces it); 404 if there is none."""
        spec = kind_of(kind)
        check_name(spec, name)
        record = self._record(kind, name)
        if record is None or record.deleted:
            raise RegistryError(ErrorCode.NAME_UNKNOWN, {"kind": kind, "name": name},
                                message="configuration object not found")
        return await self._write(EventKind.CONFIG_DELETE, kind, name, b"", None)

    async def _write(self, event_kind: EventKind, kind: str, name: str, raw: bytes,
                     struct: msgspec.Struct | None) -> StoredObject:
        registry = self.registry
        registry.check_writable()
        identity = registry.identity
        batch = Batch()
        # The same clock and the same persisted high-water mark as every other
        # write, and above the object it replaces.
        current = self._record(kind, name)
        stamp = registry.stamp_over(batch, current.hlc if current is not None else 0)
        acked = registry.wall_ns()
        deleted = event_kind is EventKind.CONFIG_DELETE
        batch.put(keys.configuration(kind, name), encode(ConfigRecord(
            stamp, identity.region, identity.zone, raw, deleted, acked)))
        batch.event(Event(kind=event_kind, repository="", origin_region=identity.region,
                          origin_zone=identity.zone, hlc=stamp, acked_ns=acked,
                          config_kind=kind, config_name=name, config_value=raw))
        events = self.meta.commit(batch)
        self._changed()
        await registry.durable(events[-1].seq)
        return StoredObject(kind, name, struct, deleted, (stamp, identity.region, identity.zone),
                            acked)

    # -- replication ------------------------------------------------------------------

    def apply(self, event: Event) -> Event | None:
        """Apply a replicated ``config_set`` / ``config_delete``: kept if newer
        than what is held (last writer wins), else a no-op. Returns the event
        as logged here, or None. ``ValueError`` for an event that cannot name
        an object (it is dropped by the caller, never stored)."""
        if event.kind not in CONFIG_KINDS:
            raise ValueError(f"{event.kind} is not a configuration event")
        if not _well_formed(event.config_kind, event.config_name):
            raise ValueError(f"no configuration object {event.config_kind!r}/{event.config_name!r}")
        stamp = stamp_of(event)
        current = self._record(event.config_kind, event.config_name)
        if current is not None and stamp_of(current) >= stamp:
            return None
        deleted = event.kind is EventKind.CONFIG_DELETE
        registry = self.registry
        registry.hlc.observe(event.hlc)
        batch = Batch()
        batch.put(keys.HLC, str(registry.hlc.last).encode())
        batch.put(keys.configuration(event.config_kind, event.config_name), encode(ConfigRecord(
            event.hlc, event.origin_region, event.origin_zone,
            b"" if deleted else event.config_value, deleted, event.acked_ns)))
        batch.event(msgspec.structs.replace(event, seq=0, repository=""))
        logged = self.meta.commit(batch)[-1]
        self._changed()
        return logged

    def fingerprint(self) -> bytes:
        """A digest of every register held here: equal fingerprints, equal
        configuration. Computed once per generation: anti-entropy asks every
        round, and an idle registry's configuration does not change."""
        if self._fingerprint is not None and self._fingerprint[0] == self._generation:
            return self._fingerprint[1]
        h = hashlib.sha256()
        for key, raw in self.meta.scan(keys.CONFIG):
            parsed = keys.parse(key, keys.ConfigKey)
            record = decode(raw, ConfigRecord)
            h.update(f"{parsed.kind}|{parsed.name}|{stamp_of(record)}|{int(record.deleted)}\n"
                     .encode())
        self._fingerprint = (self._generation, h.digest())
        return self._fingerprint[1]

    def register_events(self) -> list[Event]:
        """Every register held here as the event that applying it amounts to
        (what anti-entropy sends a peer)."""
        out = []
        for key, raw in self.meta.scan(keys.CONFIG):
            parsed = keys.parse(key, keys.ConfigKey)
            record = decode(raw, ConfigRecord)
            out.append(Event(
                kind=EventKind.CONFIG_DELETE if record.deleted else EventKind.CONFIG_SET,
                repository="", origin_region=record.origin_region, origin_zone=record.origin_zone,
                hlc=record.hlc, acked_ns=record.origin_acked_ns, config_kind=parsed.kind,
                config_name=parsed.name, config_value=record.value))
        return out

    # -- internals --------------------------------------------------------------------

    def _record(self, kind: str, name: str) -> ConfigRecord | None:
        raw = self.meta.get(keys.configuration(kind, name))
        return decode(raw, ConfigRecord) if raw is not None else None

    def _changed(self) -> None:
        self._cache.clear()
        self._generation += 1
        for listener in self._listeners:
            listener(self._generation)


_MISSING = object()


def _well_formed(kind: str, name: str) -> bool:
    """Whether ``(kind, name)`` can be a key at all (replicated events are
    checked here: a peer's kind may be unknown to this node, never malformed)."""
    return bool(KIND_NAME.fullmatch(kind)) and bool(NAME.fullmatch(name))


def _decode_value(kind: Kind, raw: bytes) -> msgspec.Struct | None:
    try:
        return decode(raw, kind.value)
    except msgspec.DecodeError:
        # Written by a georeg whose Struct for this kind is incompatible: held
        # and relayed as is, but not readable here.
        return None
