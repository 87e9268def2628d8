"""The registry's cache rules and credential sets, as ``az acr cache`` and
``az acr credential-set`` manage them: create, list, show, delete (and a
credential set's update). ``Cluster.cache`` is one of these; the management
API and ``georeg cache`` / ``georeg credential-set`` are layers over it.

Both are registry configuration (``registry_node.cache_rules``): each change
is checked here — the value as the node will check it, and in addition what
needs every rule at once: no overlap with an existing rule (ACR's wildcard
rule, with the rule it overlaps named), at most ``MAX_CACHE_RULES`` rules,
a credential set that exists and is for the rule's source host — then
written through a node of the home region, which checks it again, stamps it
and logs it; replication takes it to every node, and each node's
pull-through cache (``registry_node.pull_through``) reads what it holds.
While the home region cannot be reached every change fails with the control
plane's message; list and show answer from any node.

A credential set's password leaves this plane sealed with the cluster's
configuration key, bound to the set's name; no read shows it (``show`` and
``list`` give the login server and username only) and nothing here logs it.
A credential set a rule uses cannot be deleted (the rule would fail every
pull); delete or change the rule first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec

from registry_node.cache_rules import (
    CACHE_RULE,
    CREDENTIAL_SET,
    MAX_CACHE_RULES,
    RULE_NAME,
    CacheRule,
    CredentialSet,
    check_cache_rule,
    check_credential_set,
    overlaps,
    parse_source_repo,
    seal_password,
)
from registry_node.configuration_key import ConfigurationKey
from registry_node.identities import InvalidValue

from .errors import ClusterError, Conflict, NodeRefusal, NotFound
from .identities import one_at_a_time

NodeCall = Callable[..., Awaitable[dict]]


def _iso(seconds: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else None


class RegistryCache:
    """``home`` returns the home node to write through (or raises
    ``ControlPlaneUnavailable``), ``reader`` a node to read from,
    ``call(node, method, path, body)`` one request to that node's
    configuration routes, ``key()`` the cluster's configuration key."""

    def __init__(self, *, home: Callable[[], Awaitable[str]],
                 reader: Callable[[], Awaitable[str]], call: NodeCall,
                 key: Callable[[], ConfigurationKey],
                 now: Callable[[], float] = time.time) -> None:
        self._home = home
        self._reader = reader
        self._call = call
        self._key = key
        self.now = now
        self.lock = asyncio.Lock()

    # -- reading ------------------------------------------------------------------------

    async def _list(self, node: str, kind: str) -> list[tuple[str, dict]]:
        answer = await self._call(node, "GET", f"/{kind}")
        return [(o["name"], o["value"]) for o in answer["objects"]
                if not o["deleted"] and o["value"] is not None]

    async def _get(self, node: str, kind: str, name: str) -> dict | None:
        try:
            return (await self._call(node, "GET", f"/{kind}/{name}"))["value"]
        except NodeRefusal as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def _check_name(name: object, what: str) -> str:
        if not isinstance(name, str) or not name:
            raise ClusterError(f"give the {what}'s name (--name)")
        if not RULE_NAME.fullmatch(name):
            raise ClusterError(f"{name[:64]!r}: a {what}'s name is 1 to 50 letters, digits and "
                               "hyphens, starting with a letter or digit")
        return name

    @staticmethod
    def rule_view(name: str, value: dict) -> dict:
        """A rule as ACR's ``az acr cache show`` gives it."""
        return {"name": name, "sourceRepository": value.get("source_repo"),
                "targetRepository": value.get("target_repo"),
                "credentialSetName": value.get("credential_set") or None,
                "creationDate": _iso(value.get("created")), "provisioningState": "Succeeded"}

    @staticmethod
    def credential_set_view(name: str, value: dict) -> dict:
        """A credential set without its password."""
        return {"name": name, "loginServer": value.get("login_server"),
                "username": value.get("username"), "creationDate": _iso(value.get("created")),
                "provisioningState": "Succeeded"}

    # -- cache rules --------------------------------------------------------------------

    @one_at_a_time
    async def create_rule(self, name: str, *, source_repo: str, target_repo: str,
                          credential_set: str | None = None) -> dict:
        """``az acr cache create``: the rule's view."""
        name = self._check_name(name, "cache rule")
        value = {"source_repo": source_repo, "target_repo": target_repo,
                 "credential_set": credential_set or "", "created": self.now()}
        try:
            rule = msgspec.convert(value, CacheRule, strict=True)
            check_cache_rule(name, rule)
        except msgspec.ValidationError as exc:
            raise ClusterError(f"invalid cache rule: {exc}") from None
        except InvalidValue as exc:
            raise ClusterError(str(exc)) from None
        home = await self._home()
        existing = await self._list(home, CACHE_RULE)
        if any(n == name for n, _ in existing):
            raise Conflict(f"cache rule {name!r} exists already; `georeg cache delete --name "
                           f"{name}` removes it")
        for other, stored in existing:
            try:
                clash = overlaps(rule, msgspec.convert(stored, CacheRule))
            except (msgspec.ValidationError, InvalidValue):
                continue
            if clash:
                raise Conflict(
                    f"the target repository {target_repo!r} overlaps cache rule {other!r} "
                    f"({stored.get('source_repo')} => {stored.get('target_repo')}): wildcard "
                    "rules may not overlap one another, and two rules may not share a target; "
                    f"delete {other!r} first or choose another target")
        if len(existing) >= MAX_CACHE_RULES:
            raise Conflict(f"the registry has {len(existing)} cache rules, the most it may have "
                           f"({MAX_CACHE_RULES}, as ACR); delete unwanted rules first")
        if rule.credential_set:
            credentials = await self._get(home, CREDENTIAL_SET, rule.credential_set)
            if credentials is None:
                raise NotFound(f"no credential set {rule.credential_set!r}; `georeg "
                               "credential-set create` makes one, `georeg credential-set list` "
                               "shows them")
            host = parse_source_repo(rule.source_repo).host
            if credentials.get("login_server") != host:
                raise ClusterError(f"credential set {rule.credential_set!r} is for "
                                   f"{credentials.get('login_server')}, not {host}, the "
                                   "rule's source")
        await self._call(home, "PUT", f"/{CACHE_RULE}/{name}", msgspec.to_builtins(rule))
        return self.rule_view(name, msgspec.to_builtins(rule))

    @one_at_a_time
    async def delete_rule(self, name: str) -> None:
        """``az acr cache delete``: what was cached stays (ACR keeps it too)."""
        name = self._check_name(name, "cache rule")
        home = await self._home()
        if await self._get(home, CACHE_RULE, name) is None:
            raise NotFound(f"no cache rule {name!r}; `georeg cache list` shows them")
        await self._call(home, "DELETE", f"/{CACHE_RULE}/{name}")

    async def list_rules(self) -> list[dict]:
        return [self.rule_view(n, v) for n, v in
                await self._list(await self._reader(), CACHE_RULE)]

    async def show_rule(self, name: str) -> dict:
        name = self._check_name(name, "cache rule")
        value = await self._get(await self._reader(), CACHE_RULE, name)
        if value is None:
            raise NotFound(f"no cache rule {name!r}; `georeg cache list` shows them")
        return self.rule_view(name, value)

    # -- credential sets ------------------------------------------------------------------

    def _credential_set(self, name: str, login_server: str, username: str,
                        password: str, created: float) -> dict:
        try:
            sealed = seal_password(self._key(), name, password)
            credentials = msgspec.convert({"login_server": login_server, "username": username,
                                           "password": sealed, "created": created},
                                          CredentialSet, strict=True)
            check_credential_set(name, credentials)
        except msgspec.ValidationError as exc:
            raise ClusterError(f"invalid credential set: {exc}") from None
        except InvalidValue as exc:
            raise ClusterError(str(exc)) from None
        return msgspec.to_builtins(credentials)

    @one_at_a_time
    async def create_credential_set(self, name: str, *, login_server: str, username: str,
                                    password: str) -> dict:
        """``az acr credential-set create`` (the username and password given
        here, not as Key Vault secrets): the set's view, without its password."""
        name = self._check_name(name, "credential set")
        value = self._credential_set(name, login_server, username, password, self.now())
        home = await self._home()
        if await self._get(home, CREDENTIAL_SET, name) is not None:
            raise Conflict(f"credential set {name!r} exists already; `georeg credential-set "
                           "update` changes it")
        await self._call(home, "PUT", f"/{CREDENTIAL_SET}/{name}", value)
        return self.credential_set_view(name, value)

    @one_at_a_time
    async def update_credential_set(self, name: str, *, username: str | None = None,
                                    password: str | None = None) -> dict:
        """``az acr credential-set update``: a new username, password or both."""
        name = self._check_name(name, "credential set")
        if username is None and password is None:
            raise ClusterError("nothing to update: give --username, --password or both")
        home = await self._home()
        current = await self._get(home, CREDENTIAL_SET, name)
        if current is None:
            raise NotFound(f"no credential set {name!r}; `georeg credential-set list` shows them")
        if password is None:
            raise ClusterError("give the password with the username (it is sealed to the set "
                               "and not kept in plaintext anywhere to reuse)")
        value = self._credential_set(name, current["login_server"],
                                     username if username is not None else current["username"],
                                     password, current.get("created") or self.now())
        await self._call(home, "PUT", f"/{CREDENTIAL_SET}/{name}", value)
        return self.credential_set_view(name, value)

    @one_at_a_time
    async def delete_credential_set(self, name: str) -> None:
        name = self._check_name(name, "credential set")
        home = await self._home()
        if await self._get(home, CREDENTIAL_SET, name) is None:
            raise NotFound(f"no credential set {name!r}; `georeg credential-set list` shows them")
        users = sorted(n for n, v in await self._list(home, CACHE_RULE)
                       if v.get("credential_set") == name)
        if users:
            raise Conflict(f"credential set {name!r} is used by cache rule"
                           f"{'s' if len(users) > 1 else ''} {', '.join(users[:10])}; delete "
                           "those rules first")
        await self._call(home, "DELETE", f"/{CREDENTIAL_SET}/{name}")

    async def list_credential_sets(self) -> list[dict]:
        return [self.credential_set_view(n, v) for n, v in
                await self._list(await self._reader(), CREDENTIAL_SET)]

    async def show_credential_set(self, name: str) -> dict:
        name = self._check_name(name, "credential set")
        value = await self._get(await self._reader(), CREDENTIAL_SET, name)
        if value is None:
            raise NotFound(f"no credential set {name!r}; `georeg credential-set list` shows them")
        return self.credential_set_view(name, value)
