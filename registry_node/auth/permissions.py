"""ACR's permission model, turned into what a principal may do on each resource.

Three sources of permissions, as ACR has them:

* **scope maps** (for repository-scoped tokens): actions written
  ``repositories/<repo>/<acr action>``, where ``<acr action>`` is one of
  ``content/read``, ``content/write``, ``content/delete``, ``metadata/read``,
  ``metadata/write`` and maps to the Docker scope actions ``pull``, ``push``,
  ``delete``, ``metadata_read``, ``metadata_write``. ``<repo>`` is a name, a
  prefix wildcard ``team/*`` (every repository below ``team/``, not ``team``
  itself), or ``*`` (every repository). Rules are additive. The five system
  scope maps (``_repositories_*``) are built in and cannot be redefined.
* **roles** (for identities, ACR's Entra principals), optionally limited to one
  repository;
* the **admin user** (everything) and **anonymous pull** (reads only).

Invariants: a ``Permissions`` value answers ``actions_on(type, name)`` with no
I/O; a wildcard never matches across its own prefix (``team/*`` does not cover
``teammate/x``); tokens never list the catalog; a role limited to a repository
gives nothing outside it and no catalog.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .scopes import (
    ANY,
    CATALOG,
    DELETE,
    METADATA_READ,
    METADATA_WRITE,
    PULL,
    PUSH,
    REGISTRY,
    REPOSITORY,
    REPOSITORY_ACTIONS,
)

# ACR's scope-map actions and the token actions they stand for.
ACR_ACTIONS: dict[str, str] = {
    "content/read": PULL,
    "content/write": PUSH,
    "content/delete": DELETE,
    "metadata/read": METADATA_READ,
    "metadata/write": METADATA_WRITE,
}


def _all_repositories(*acr_actions: str) -> tuple[str, ...]:
    return tuple(f"repositories/*/{a}" for a in acr_actions)


SYSTEM_SCOPE_MAPS: dict[str, tuple[str, ...]] = {
    "_repositories_pull": _all_repositories("content/read"),
    "_repositories_pull_metadata_read": _all_repositories("content/read", "metadata/read"),
    "_repositories_push": _all_repositories("content/read", "content/write"),
    "_repositories_push_metadata_write": _all_repositories(
        "content/read", "content/write", "metadata/read", "metadata/write"),
    "_repositories_admin": _all_repositories(
        "content/read", "content/write", "content/delete", "metadata/read", "metadata/write"),
}


@dataclass(frozen=True, slots=True)
class Role:
    actions: frozenset[str]     # on repositories
    catalog: bool               # may list the registry's repositories


# ACR's built-in roles on the data plane (classic RBAC table). Where ACR's docs
# speak of "viewing tags" the role gets metadata_read; locks (metadata_write)
# need a role that may change the registry (Owner, Contributor). AcrImageSigner
# only signs (Docker Content Trust, which georeg does not serve): nothing here.
ROLES: dict[str, Role] = {
    "Owner": Role(frozenset(REPOSITORY_ACTIONS), catalog=True),
    "Contributor": Role(frozenset(REPOSITORY_ACTIONS), catalog=True),
    "Reader": Role(frozenset({PULL, METADATA_READ}), catalog=True),
    "AcrPush": Role(frozenset({PULL, PUSH, METADATA_READ}), catalog=True),
    "AcrPull": Role(frozenset({PULL, METADATA_READ}), catalog=True),
    "AcrDelete": Role(frozenset({DELETE, METADATA_READ}), catalog=False),
    "AcrImageSigner": Role(frozenset(), catalog=False),
}


def reads_whole_registry(role: str) -> bool:
    """``role`` may pull every repository and list them: what the cluster's
    dashboard (``cluster.control.dashboard``) asks of a viewer, since it shows
    every repository's replicas. AcrDelete and AcrImageSigner may not."""
    known = ROLES.get(role)
    return known is not None and PULL in known.actions and known.catalog


class Holdings(Protocol):
    """Anything that says which actions are held on a resource."""

    def actions_on(self, kind: str, name: str) -> frozenset[str]: ...


class ScopeMapError(ValueError):
    """A scope-map action that is not ACR's grammar; the message says why."""


@dataclass(frozen=True, slots=True)
class RepositoryRule:
    """``actions`` on the repositories ``pattern`` names: a name, ``prefix/*`` or ``*``."""

    pattern: str
    actions: frozenset[str]

    def matches(self, name: str) -> bool:
        if self.pattern == "*":
            return True
        if self.pattern.endswith("/*"):
            return name.startswith(self.pattern[:-1])
        return name == self.pattern


def parse_scope_map_action(text: str) -> tuple[str, str]:
    """``repositories/<repo>/<acr action>`` → (repository pattern, token action)."""
    head, _, rest = text.partition("/")
    if head != "repositories" or not rest:
        raise ScopeMapError(f"{text!r}: a scope-map action starts with 'repositories/'")
    pattern, _, kind = rest.rpartition("/")
    pattern, _, verb = pattern.rpartition("/")
    acr_action = f"{verb}/{kind}"
    if acr_action not in ACR_ACTIONS:
        raise ScopeMapError(f"{text!r}: the action must be one of {', '.join(ACR_ACTIONS)}")
    validate_pattern(pattern)
    return pattern, ACR_ACTIONS[acr_action]


def validate_pattern(pattern: str) -> str:
    """ACR's wildcard rule: at most one ``*``, only as the whole pattern or as its
    last component after a ``/``."""
    if not pattern:
        raise ScopeMapError("a repository pattern cannot be empty")
    stars = pattern.count("*")
    if stars and not (pattern == "*" or (stars == 1 and pattern.endswith("/*") and len(pattern) > 2)):
        raise ScopeMapError(f"{pattern!r}: a wildcard must be '*' or end a name as '/*'")
    return pattern


def scope_map_rules(actions: Iterable[str]) -> tuple[RepositoryRule, ...]:
    by_pattern: dict[str, set[str]] = {}
    for text in actions:
        pattern, action = parse_scope_map_action(text)
        by_pattern.setdefault(pattern, set()).add(action)
    return tuple(RepositoryRule(p, frozenset(a)) for p, a in by_pattern.items())


@dataclass(frozen=True, slots=True)
class Permissions:
    """Everything one principal may do, at one moment."""

    rules: tuple[RepositoryRule, ...] = ()
    catalog: bool = False

    def actions_on(self, kind: str, name: str) -> frozenset[str]:
        if kind == REPOSITORY:
            held: frozenset[str] = frozenset()
            for rule in self.rules:
                if rule.matches(name):
                    held |= rule.actions
            return held
        if (kind, name) == (REGISTRY, CATALOG) and self.catalog:
            return frozenset({ANY})
        return frozenset()

    def __or__(self, other: Permissions) -> Permissions:
        return Permissions(self.rules + other.rules, self.catalog or other.catalog)


NOTHING = Permissions()
ADMIN = Permissions((RepositoryRule("*", frozenset({ANY})),), catalog=True)
ANONYMOUS_PULL = Permissions((RepositoryRule("*", frozenset({PULL, METADATA_READ})),))


def for_scope_map(actions: Iterable[str]) -> Permissions:
    """A token's permissions: its scope map's rules, never the catalog."""
    return Permissions(scope_map_rules(actions))


def for_role(role: str, repository: str | None = None) -> Permissions:
    """An identity's permissions from one role assignment (unknown role: none)."""
    known = ROLES.get(role)
    if known is None or not known.actions and not known.catalog:
        return NOTHING
    if repository is not None:
        return Permissions((RepositoryRule(repository, known.actions),))
    return Permissions((RepositoryRule("*", known.actions),), catalog=known.catalog)
