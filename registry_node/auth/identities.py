"""What a node looks up to authenticate and authorize: the ``IdentitySource``
Protocol, its records, and an in-memory implementation.

The registry's configuration (admin user, tokens, scope maps, identities and
their role assignments, anonymous pull) has one home and reaches every node
by replication; a node only reads it, through this Protocol, so the access
code does not care where it is kept. Nodes read ``ConfigurationIdentities``
(``registry_node.identities``), over the replicated registry configuration;
``InMemoryIdentities`` is a second implementation, held in dicts, for tests that
change identities under a running node.

Secrets are never held in clear: a password or identity secret is stored as
``hash_secret(secret)``, a salted SHA-256. That is enough because georeg
generates every secret with at least 128 random bits (so no dictionary
attack applies), and it keeps Basic credentials on every request cheap.

Invariants: every lookup is a dict read with no I/O; ``generation`` grows
with every change, so callers may cache what they derive from it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

ENABLED = "enabled"
DISABLED = "disabled"
_HASH = "sha256"


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """``sha256$<salt hex>$<digest hex>`` of ``secret``."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.sha256(salt + secret.encode()).hexdigest()
    return f"{_HASH}${salt.hex()}${digest}"


def secret_matches(secret: str, hashed: str) -> bool:
    scheme, _, rest = hashed.partition("$")
    salt_hex, _, digest = rest.partition("$")
    if scheme != _HASH:
        return False
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    candidate = hashlib.sha256(salt + secret.encode()).hexdigest()
    return hmac.compare_digest(candidate, digest)


def new_secret() -> str:
    """A generated password or identity secret: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Password:
    """One credential slot (``password1``/``password2`` for admin and tokens)."""

    name: str
    hashed: str
    expiry: float | None = None          # seconds since the epoch; None: never

    @property
    def fingerprint(self) -> str:
        """Names this credential (not the secret) in tokens minted from it, so a
        regenerated or deleted password ends the tokens it gave."""
        return hashlib.sha256(self.hashed.encode()).hexdigest()[:16]

    def valid_at(self, now: float) -> bool:
        return self.expiry is None or now < self.expiry


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """Registry-wide access settings. The admin user's name is the registry's."""

    name: str
    admin_enabled: bool = False
    admin_passwords: tuple[Password, ...] = ()
    anonymous_pull_enabled: bool = False


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A repository-scoped token: its name is its username."""

    name: str
    scope_map: str
    status: str = ENABLED
    passwords: tuple[Password, ...] = ()


@dataclass(frozen=True, slots=True)
class ScopeMapRecord:
    name: str
    actions: tuple[str, ...]             # ``repositories/<repo>/<acr action>``


@dataclass(frozen=True, slots=True)
class IdentityRecord:
    """A stand-in for an Entra service principal: an id and its secrets."""

    id: str
    secrets: tuple[Password, ...] = ()


@dataclass(frozen=True, slots=True)
class RoleAssignment:
    assignee: str                        # an identity's id
    role: str                            # AcrPull, AcrPush, …, Owner
    repository: str | None = None        # limited to one repository (pattern), or all


class IdentitySource(Protocol):
    """What the access code reads. Every method returns what the node holds now."""

    @property
    def generation(self) -> int:
        """Grows with every change to anything below."""
        ...

    def settings(self) -> RegistrySettings: ...

    def token(self, name: str) -> TokenRecord | None: ...

    def scope_map(self, name: str) -> ScopeMapRecord | None:
        """A user-defined scope map (the system ones are built in, ``permissions``)."""
        ...

    def identity(self, identity_id: str) -> IdentityRecord | None: ...

    def role_assignments(self, assignee: str) -> Sequence[RoleAssignment]: ...


@dataclass
class InMemoryIdentities:
    """An ``IdentitySource`` held in dicts; every change bumps ``generation``."""

    registry: RegistrySettings
    tokens: dict[str, TokenRecord] = field(default_factory=dict)
    scope_maps: dict[str, ScopeMapRecord] = field(default_factory=dict)
    identities: dict[str, IdentityRecord] = field(default_factory=dict)
    assignments: list[RoleAssignment] = field(default_factory=list)
    generation: int = 0

    # -- IdentitySource --------------------------------------------------------------

    def settings(self) -> RegistrySettings:
        return self.registry

    def token(self, name: str) -> TokenRecord | None:
        return self.tokens.get(name)

    def scope_map(self, name: str) -> ScopeMapRecord | None:
        return self.scope_maps.get(name)

    def identity(self, identity_id: str) -> IdentityRecord | None:
        return self.identities.get(identity_id)

    def role_assignments(self, assignee: str) -> Sequence[RoleAssignment]:
        return [a for a in self.assignments if a.assignee == assignee]

    # -- changes (what the replicated store's writes stand for) ----------------------

    def update_registry(self, **changes) -> None:
        self.registry = replace(self.registry, **changes)
        self.generation += 1

    def put_token(self, token: TokenRecord) -> None:
        self.tokens[token.name] = token
        self.generation += 1

    def delete_token(self, name: str) -> None:
        self.tokens.pop(name, None)
        self.generation += 1

    def put_scope_map(self, scope_map: ScopeMapRecord) -> None:
        self.scope_maps[scope_map.name] = scope_map
        self.generation += 1

    def put_identity(self, identity: IdentityRecord) -> None:
        self.identities[identity.id] = identity
        self.generation += 1

    def assign(self, assignment: RoleAssignment) -> None:
        self.assignments.append(assignment)
        self.generation += 1
