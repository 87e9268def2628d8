"""The registry's identities as registry configuration: the kinds ``token``,
``scope-map``, ``identity`` and ``role-assignment`` (Structs and the checks a
value passes before the home region writes it), the admin user's password
hashes on the ``registry`` kind, and ``ConfigurationIdentities``, the
``IdentitySource`` the access gate reads on every node.

    token/<name>               Token: scope map, status, password1/password2 (hashes)
    scope-map/<name>           ScopeMap: description, actions repositories/<repo>/<acr action>
    identity/<id>              Identity: display name, its secrets (hashes)
    role-assignment/<id>       RoleAssignment: assignee, role, optional repository
    registry/default           RegistryProperties (``configuration``): name, switches,
                               admin password / password2 (hashes)

Only hashes travel (``auth.identities.hash_secret``): a value whose secret
is not in that form is refused, so a plaintext can never be replicated, and
every node can check a password without having seen it. Token and identity
secrets are shown once, by the command that creates or renews them, and are
then gone — as in ACR. The admin passwords are the exception, because ACR's
``credential show`` prints them whenever asked: their plaintexts stay with the
control plane that generated them (``<data dir>/auth/admin-passwords.json``,
mode 0600, read through the control plane's ``credential show``), never in a node, a log or a
replicated value; nodes hold only their hashes like every other secret. A
node needs no plaintext to check a password, and a replicated plaintext would
sit in every node's store, log and anti-entropy stream, in every region.

The five system scope maps (``_repositories_*``) are built in
(``auth.permissions.SYSTEM_SCOPE_MAPS``): no stored object may take a name
that starts with ``_``, so they can be neither created, changed nor deleted.

Invariants
    * ``ConfigurationIdentities`` answers from what this node holds (no I/O
      beyond the store's cached reads); its ``generation`` is the store's, so
      a change replicated here takes effect on the next request.
    * A value that passed ``check`` grants nothing it does not say; a stored
      value that is malformed anyway (written by another georeg) grants nothing
      (the gate's rule).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from .auth import permissions as perms
from .auth.identities import (
    DISABLED,
    ENABLED,
    IdentityRecord,
    Password,
    RegistrySettings,
    RoleAssignment,
    ScopeMapRecord,
    TokenRecord,
)

# ACR's limits that do not depend on the tier (per scope map).
MAX_SCOPE_MAP_ACTIONS = 500
MAX_SCOPE_MAP_REPOSITORIES = 500
MAX_DESCRIPTION = 256
# The slots each kind of principal has, as ACR names them.
ADMIN_SLOTS = ("password", "password2")
TOKEN_SLOTS = ("password1", "password2")
IDENTITY_SLOTS = ("secret",)
STATUSES = (ENABLED, DISABLED)
SYSTEM_PREFIX = "_"
# What ``auth.identities.hash_secret`` writes: scheme, 16-byte salt, SHA-256.
_HASHED = re.compile(r"sha256\$[0-9a-f]{32}\$[0-9a-f]{64}")

TOKEN, SCOPE_MAP, IDENTITY, ROLE_ASSIGNMENT = "token", "scope-map", "identity", "role-assignment"


class Secret(msgspec.Struct, frozen=True):
    """One password or secret slot: its name, hash, and when it was made and ends."""

    name: str = ""
    hash: str = ""
    created: float = 0.0                 # seconds since the epoch
    expiry: float | None = None          # None: never


class Token(msgspec.Struct, frozen=True):
    """A repository-scoped token (its object name is its username)."""

    scope_map: str = ""
    status: str = ENABLED
    passwords: tuple[Secret, ...] = ()
    created: float = 0.0


class ScopeMap(msgspec.Struct, frozen=True):
    description: str = ""
    actions: tuple[str, ...] = ()
    created: float = 0.0


class Identity(msgspec.Struct, frozen=True):
    """A stand-in for an Entra service principal; its object name is its id."""

    display_name: str = ""
    secrets: tuple[Secret, ...] = ()
    created: float = 0.0


class Assignment(msgspec.Struct, frozen=True):
    """A role given to an identity, on every repository or on one (``repository``)."""

    assignee: str = ""
    role: str = ""
    repository: str | None = None
    created: float = 0.0


class InvalidValue(ValueError):
    """A value the home region refuses; the message says what to change."""


def check_secrets(secrets: Sequence[Secret], slots: Sequence[str]) -> None:
    names = [s.name for s in secrets]
    if len(set(names)) != len(names):
        raise InvalidValue(f"each slot appears once; got {names}")
    for secret in secrets:
        if secret.name not in slots:
            raise InvalidValue(f"a slot is named {' or '.join(slots)}, not {secret.name!r}")
        if not _HASHED.fullmatch(secret.hash):
            raise InvalidValue(f"{secret.name}: only a hash made by hash_secret is stored, "
                               "never a password")
        if secret.expiry is not None and secret.expiry <= 0:
            raise InvalidValue(f"{secret.name}: expiry is seconds since the epoch")


def check_not_system(kind: str, name: str) -> None:
    if name.startswith(SYSTEM_PREFIX):
        raise InvalidValue(f"{name!r}: names starting with '_' belong to the system scope maps, "
                           f"which are built in and read-only; choose another {kind} name")


def check_token(name: str, token: Token) -> None:
    check_not_system(TOKEN, name)
    if token.status not in STATUSES:
        raise InvalidValue(f"status is enabled or disabled, not {token.status!r}")
    if not token.scope_map:
        raise InvalidValue("a token needs a scope map")
    check_secrets(token.passwords, TOKEN_SLOTS)


def check_scope_map(name: str, scope_map: ScopeMap) -> None:
    check_not_system(SCOPE_MAP, name)
    if len(scope_map.description) > MAX_DESCRIPTION:
        raise InvalidValue(f"a description is at most {MAX_DESCRIPTION} characters")
    if len(scope_map.actions) > MAX_SCOPE_MAP_ACTIONS:
        raise InvalidValue(f"a scope map has at most {MAX_SCOPE_MAP_ACTIONS} actions")
    try:
        rules = perms.scope_map_rules(scope_map.actions)
    except perms.ScopeMapError as exc:
        raise InvalidValue(f"{exc}; an action is repositories/<repository or prefix/*>/"
                           f"<{'|'.join(perms.ACR_ACTIONS)}>") from None
    if len(rules) > MAX_SCOPE_MAP_REPOSITORIES:
        raise InvalidValue(f"a scope map names at most {MAX_SCOPE_MAP_REPOSITORIES} repositories")


def check_identity(name: str, identity: Identity) -> None:
    check_secrets(identity.secrets, IDENTITY_SLOTS)


def check_assignment(name: str, assignment: Assignment) -> None:
    if assignment.role not in perms.ROLES:
        raise InvalidValue(f"role {assignment.role!r} is not one of {', '.join(perms.ROLES)}")
    if not assignment.assignee:
        raise InvalidValue("a role assignment needs an assignee (an identity's id)")
    if assignment.repository is not None:
        try:
            perms.validate_pattern(assignment.repository)
        except perms.ScopeMapError as exc:
            raise InvalidValue(str(exc)) from None


def check_admin_passwords(passwords: Sequence[Secret]) -> None:
    check_secrets(passwords, ADMIN_SLOTS)


# -- the IdentitySource over the configuration store ------------------------------------


class ConfigurationReader(Protocol):
    """What ``ConfigurationIdentities`` reads (``configuration.Configuration``)."""

    @property
    def generation(self) -> int: ...

    def get(self, kind: str, name: str) -> msgspec.Struct | None: ...

    def items(self, kind: str) -> list[tuple[str, msgspec.Struct]]: ...


def _passwords(secrets: Sequence[Secret]) -> tuple[Password, ...]:
    return tuple(Password(s.name, s.hash, s.expiry) for s in secrets)


class ConfigurationIdentities:
    """``IdentitySource`` over this node's registry configuration. Derived
    records are remembered until the store's generation moves."""

    def __init__(self, configuration: ConfigurationReader, registry_name: str = "") -> None:
        self.configuration = configuration
        self.registry_name = registry_name     # until the control plane has written its own
        self._memo: dict[tuple[str, str], object] = {}
        self._memo_generation = -1

    @property
    def generation(self) -> int:
        return self.configuration.generation

    def _remembered(self, key: tuple[str, str], derive: Callable[[], object]):
        generation = self.configuration.generation
        if generation != self._memo_generation:
            self._memo.clear()
            self._memo_generation = generation
        if key not in self._memo:
            self._memo[key] = derive()
        return self._memo[key]

    def settings(self) -> RegistrySettings:
        return self._remembered(("registry", ""), self._settings)

    def _settings(self) -> RegistrySettings:
        props = self.configuration.get("registry", "default")
        if props is None:
            return RegistrySettings(self.registry_name)
        return RegistrySettings(props.name or self.registry_name, props.admin_enabled,
                                _passwords(props.admin_passwords), props.anonymous_pull_enabled)

    def token(self, name: str) -> TokenRecord | None:
        def derive():
            token = self.configuration.get(TOKEN, name)
            return None if not isinstance(token, Token) else TokenRecord(
                name, token.scope_map, token.status, _passwords(token.passwords))
        return self._remembered((TOKEN, name), derive)

    def scope_map(self, name: str) -> ScopeMapRecord | None:
        def derive():
            scope_map = self.configuration.get(SCOPE_MAP, name)
            return None if not isinstance(scope_map, ScopeMap) \
                else ScopeMapRecord(name, tuple(scope_map.actions))
        return self._remembered((SCOPE_MAP, name), derive)

    def identity(self, identity_id: str) -> IdentityRecord | None:
        def derive():
            identity = self.configuration.get(IDENTITY, identity_id)
            return None if not isinstance(identity, Identity) \
                else IdentityRecord(identity_id, _passwords(identity.secrets))
        return self._remembered((IDENTITY, identity_id), derive)

    def role_assignments(self, assignee: str) -> Sequence[RoleAssignment]:
        index = self._remembered((ROLE_ASSIGNMENT, ""), self._assignments)
        return index.get(assignee, ())

    def _assignments(self) -> dict[str, tuple[RoleAssignment, ...]]:
        index: dict[str, list[RoleAssignment]] = {}
        for _, value in self.configuration.items(ROLE_ASSIGNMENT):
            if isinstance(value, Assignment):
                index.setdefault(value.assignee, []).append(
                    RoleAssignment(value.assignee, value.role, value.repository))
        return {k: tuple(v) for k, v in index.items()}
