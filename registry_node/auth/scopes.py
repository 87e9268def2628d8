"""The Docker token scope grammar, and grants: what a client asks for, what it gets.

A scope is ``type:name:action[,action…]`` (``repository:team/app:pull,push``,
``registry:catalog:*``); a list of scopes is space separated, and clients send
either one ``scope`` parameter holding a list or the parameter repeated, so
``parse_scopes`` takes any number of values and splits each.

Invariants:

* The name may itself hold one colon (``host:5000/app``): the type is split off
  the front and the actions off the back, never by counting colons.
* ``parse_scope(format_scope(s)) == s`` for every scope the parser accepts, and
  ``parse_scopes`` merges scopes on the same resource (union of actions), so a
  list has one entry per resource.
* A malformed scope is ignored, not an error: the token server grants what it
  can (the spec's rule), and a registry route never depends on parsing a scope.
* ``grant`` never gives an action that was not asked for nor one that is not
  allowed; what remains may be nothing, which is a valid (empty) grant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

REPOSITORY = "repository"
REGISTRY = "registry"
CATALOG = "catalog"

PULL = "pull"
PUSH = "push"
DELETE = "delete"
METADATA_READ = "metadata_read"
METADATA_WRITE = "metadata_write"
ANY = "*"

# Everything a repository can grant, in the order scopes are written.
REPOSITORY_ACTIONS: tuple[str, ...] = (PULL, PUSH, DELETE, METADATA_READ, METADATA_WRITE)
_ORDER = {action: i for i, action in enumerate((*REPOSITORY_ACTIONS, ANY))}

# ``type`` is lowercase alphanumerics, optionally followed by a deprecated class in
# parentheses (``repository(plugin)``), which means the same as the bare type.
_TYPE = re.compile(r"([a-z0-9]+(?:[._-][a-z0-9]+)*)(?:\([a-z0-9]+\))?")
_ACTION = re.compile(r"[a-z0-9_-]+|\*")


class Scope(NamedTuple):
    """Actions on one resource (``repository``/``<name>``, ``registry``/``catalog``).
    A named tuple, not a dataclass: the access gate hashes and compares the scopes
    a request needs on every request, and a tuple does that in C."""

    type: str
    name: str
    actions: frozenset[str]

    @property
    def resource(self) -> tuple[str, str]:
        return self.type, self.name

    def format(self) -> str:
        return f"{self.type}:{self.name}:{','.join(ordered(self.actions))}"

    def record(self) -> list[dict[str, str]]:
        """The distribution spec's access records (an error's ``detail``), one per action."""
        return [{"Type": self.type, "Name": self.name, "Action": a} for a in ordered(self.actions)]


def ordered(actions: Iterable[str]) -> list[str]:
    return sorted(actions, key=lambda a: (_ORDER.get(a, len(_ORDER)), a))


def repository(name: str, *actions: str) -> Scope:
    return Scope(REPOSITORY, name, frozenset(actions))


def catalog() -> Scope:
    return Scope(REGISTRY, CATALOG, frozenset({ANY}))


def parse_scope(text: str) -> Scope | None:
    """One scope, or None when ``text`` is not one."""
    kind, sep, rest = text.partition(":")
    name, sep2, actions = rest.rpartition(":")
    match = _TYPE.fullmatch(kind)
    if not (sep and sep2 and match and name) or any(c.isspace() for c in name):
        return None
    parsed = [a for a in actions.split(",") if a]
    if not parsed or not all(_ACTION.fullmatch(a) for a in parsed):
        return None
    return Scope(match.group(1), name, frozenset(parsed))


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """Every scope in ``values`` (each a space-separated list), one per resource,
    in the order resources first appear; what does not parse is skipped."""
    merged: dict[tuple[str, str], frozenset[str]] = {}
    for value in values:
        for item in value.split():
            scope = parse_scope(item)
            if scope is not None:
                merged[scope.resource] = merged.get(scope.resource, frozenset()) | scope.actions
    return [Scope(kind, name, actions) for (kind, name), actions in merged.items()]


def format_scopes(scopes: Iterable[Scope]) -> str:
    """One space-separated list: what a ``WWW-Authenticate`` ``scope`` parameter
    and an OAuth2 answer's ``scope`` field hold."""
    return " ".join(scope.format() for scope in scopes if scope.actions)


def universe(kind: str, name: str) -> frozenset[str]:
    """What ``*`` stands for when asked on a resource."""
    if kind == REPOSITORY:
        return frozenset(REPOSITORY_ACTIONS)
    if (kind, name) == (REGISTRY, CATALOG):
        return frozenset({ANY})
    return frozenset()


def grant(asked: Iterable[Scope], allowed: Callable[[str, str], frozenset[str]]) -> list[Scope]:
    """The intersection of ``asked`` with ``allowed(type, name)``, per resource.

    ``*`` asked means every action of the resource's kind; ``*`` allowed means
    every action. Resources left with no action are dropped: the empty grant is
    a grant."""
    granted = []
    for scope in asked:
        wanted = set(scope.actions)
        if ANY in wanted:
            wanted = (wanted - {ANY}) | universe(scope.type, scope.name)
        holds = allowed(scope.type, scope.name)
        if ANY in holds:
            actions = frozenset(wanted)
        else:
            actions = frozenset(wanted) & holds
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


def covers(held: frozenset[str], action: str) -> bool:
    """Whether actions ``held`` on a resource include ``action`` (``*`` holds all)."""
    return action in held or ANY in held


def missing(needed: Iterable[Scope], holds: Callable[[str, str], frozenset[str]]) -> list[Scope]:
    """What of ``needed`` is not held, per resource (empty: everything is)."""
    out = []
    for scope in needed:
        have = holds(scope.type, scope.name)
        lacking = frozenset(a for a in scope.actions if not covers(have, a))
        if lacking:
            out.append(Scope(scope.type, scope.name, lacking))
    return out
