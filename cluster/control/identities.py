"""The registry's identities, as ``az acr`` manages them: the admin user's
credentials (``credential show|renew``), scope maps, repository-scoped tokens
and their passwords, identities and their role assignments. ``Cluster.access``
is one of these; the management API and the ``georeg`` CLI are layers over it.

Every object is registry configuration (``registry_node.identities``): each
change is checked here (the names it refers to exist, the tier's limits),
then written through a node of the home region, which validates the value
again, stamps it and logs it; replication takes it to every node. While the
home region cannot be reached every change fails with the control plane's
message (``ControlPlaneUnavailable``); reads answer from any node.

Secrets: every password and identity secret is generated here (256 random
bits, ``auth.identities.new_secret``) and only its hash is written. A token's
passwords and an identity's secret are returned once, by the call that made
them. The admin passwords can be shown again (``credential show``, as ACR
does), so their plaintexts are kept in the control plane's data dir, in
their one home ``<data dir>/auth/admin-passwords.json``
(``access.remember_admin_password``, mode 0600), which ``georeg up``'s
printout and ``georeg login`` read through ``credential show`` too — never in
a node, a log, or a replicated value. ``show`` returns the candidate whose hash the registry
holds, so a renewal cut short between the file and the home node never shows
a password that does not work.

Limits per tier (``registry_node.tiers``): tokens and scope maps 100 / 500 /
50,000 (Basic / Standard / Premium); one more is ``QuotaExceeded`` (409) in
the shape of ACR's answer for webhooks ("Quota exceeded for resource type
tokens for the registry SKU Basic": ACR documents none for these), then the
limit and the way out (``errors.quota_exceeded``).
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from registry_node import tiers
from registry_node.auth.identities import hash_secret, new_secret, secret_matches
from registry_node.auth.permissions import ACR_ACTIONS, ROLES, SYSTEM_SCOPE_MAPS
from registry_node.configuration import NAME
from registry_node.identities import (
    ADMIN_SLOTS,
    IDENTITY,
    ROLE_ASSIGNMENT,
    SCOPE_MAP,
    STATUSES,
    SYSTEM_PREFIX,
    TOKEN,
    TOKEN_SLOTS,
)

from .access import AdminLogin, admin_password_candidates, remember_admin_password
from .errors import ClusterError, Conflict, NodeRefusal, NotFound, quota_exceeded

# Tokens, and scope maps, a registry of each tier may have (each read from its
# own column of the tier table, though ACR's numbers are the same today).
TIER_LIMITS = {TOKEN: {tier: limits.tokens for tier, limits in tiers.LIMITS.items()},
               SCOPE_MAP: {tier: limits.scope_maps for tier, limits in tiers.LIMITS.items()}}
ACCESS_KINDS = (TOKEN, SCOPE_MAP, IDENTITY, ROLE_ASSIGNMENT)
DAY_S = 86400
_ASSIGNMENTS = uuid.UUID("5b0e0c3e-4c71-4f0e-9a55-6e6f6b7a2b10")   # uuid5 namespace

NodeCall = Callable[..., Awaitable[dict]]


def one_at_a_time(method):
    """A change is a read-modify-write at the home node (and a limit counted
    there): changes made through this control plane run one after another
    (under ``self.lock``; identities and webhooks alike)."""
    async def serialized(self, *args, **kwargs):
        async with self.lock:
            return await method(self, *args, **kwargs)
    serialized.__name__, serialized.__doc__ = method.__name__, method.__doc__
    return serialized


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _path(kind: str, name: str = "") -> str:
    return "/" + kind + ("/" + urllib.parse.quote(name, safe="") if name else "")


def repository_actions(repositories: Sequence[Sequence[str]]) -> list[str]:
    """``[[REPO, ACTION, ...], ...]`` (``--repository``) as scope-map actions."""
    actions = []
    for entry in repositories:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 \
                or not all(isinstance(x, str) for x in entry):
            raise ClusterError("each repository is [REPOSITORY, ACTION, ...] with at least one "
                               f"action of {', '.join(ACR_ACTIONS)}")
        repository, *verbs = entry
        for verb in verbs:
            if verb not in ACR_ACTIONS:
                raise ClusterError(f"{verb!r} is not an action; the actions are "
                                   f"{', '.join(ACR_ACTIONS)}")
            action = f"repositories/{repository}/{verb}"
            if action not in actions:
                actions.append(action)
    return actions


def _days(expiration_in_days: object) -> float | None:
    if expiration_in_days is None:
        return None
    if isinstance(expiration_in_days, bool) or not isinstance(expiration_in_days, int) \
            or expiration_in_days < 1:
        raise ClusterError("expiration in days is a whole number of days, at least 1")
    return float(expiration_in_days) * DAY_S


class RegistryAccess:
    """The identity commands of one registry. ``home`` returns the home node to
    write through (or raises ``ControlPlaneUnavailable``), ``reader`` a node to
    read from, ``call(node, method, path, body)`` one request to that node's
    configuration routes."""

    def __init__(self, *, registry: str, tier: Callable[[], str], data_dir: Path,
                 home: Callable[[], Awaitable[str]], reader: Callable[[], Awaitable[str]],
                 call: NodeCall, now: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.tier = tier
        self.data_dir = data_dir
        self._home = home
        self._reader = reader
        self._call = call
        self.now = now
        self.lock = asyncio.Lock()

    # -- reading and writing objects ---------------------------------------------------

    async def _get(self, node: str, kind: str, name: str) -> dict | None:
        try:
            return (await self._call(node, "GET", _path(kind, name)))["value"]
        except NodeRefusal as exc:
            if exc.status == 404:
                return None
            raise

    async def _list(self, node: str, kind: str) -> list[tuple[str, dict]]:
        answer = await self._call(node, "GET", _path(kind))
        return [(o["name"], o["value"]) for o in answer["objects"]
                if not o["deleted"] and o["value"] is not None]

    async def _put(self, node: str, kind: str, name: str, value: dict) -> dict:
        return (await self._call(node, "PUT", _path(kind, name), value))["value"]

    def _check_quota(self, kind: str, count: int) -> None:
        tier = self.tier()
        allowed = TIER_LIMITS[kind]
        if count >= allowed.get(tier, max(allowed.values())):
            if kind == TOKEN:
                raise quota_exceeded("tokens", "tokens", tier, allowed, count)
            raise quota_exceeded("scopeMaps", "scope maps", tier, allowed, count)

    @staticmethod
    def _check_name(kind: str, name: object) -> str:
        if not isinstance(name, str) or not name:
            raise ClusterError(f"give the {kind}'s name")
        if name.startswith(SYSTEM_PREFIX):
            raise ClusterError(f"{name!r}: names starting with '_' belong to the system scope "
                               "maps, which are built in and read-only")
        if not NAME.fullmatch(name):
            raise ClusterError(f"{name[:80]!r}: a {kind} name is 1 to 64 letters, digits, '_', "
                               "'.' or '-', and does not start with '.' or '-'")
        return name

    # -- the admin user ----------------------------------------------------------------

    async def admin_credentials(self) -> dict:
        """``az acr credential show``: the admin username and both passwords."""
        stored = await self._get(await self._reader(), "registry", "default") or {}
        self._require_admin(stored)
        candidates = admin_password_candidates(self.data_dir)
        passwords = []
        for secret in stored.get("admin_passwords", []):
            value = next((v for v in reversed(candidates.get(secret["name"], []))
                          if secret_matches(v, secret["hash"])), None)
            passwords.append({"name": secret["name"], "value": value})
        return {"username": self.registry, "passwords": passwords}

    async def admin_login(self) -> AdminLogin | None:
        """The admin credentials a client logs in with: the first password that
        works (None while the admin user is disabled or no plaintext here matches)."""
        stored = await self._get(await self._reader(), "registry", "default") or {}
        if not stored.get("admin_enabled"):
            return None
        shown = await self.admin_credentials()
        value = next((p["value"] for p in shown["passwords"] if p["value"]), None)
        return AdminLogin(shown["username"], value) if value else None

    @one_at_a_time
    async def enable_admin_at_first_start(self) -> bool:
        """An auth cluster's first start: the admin user enabled with two
        generated passwords, through the home node, so that a first-time user
        gets in with what ``georeg up`` prints. Only while the registry object
        holds no admin passwords: a restart, or a registry whose admin user was
        disabled since, keeps what it has (nothing rotates). True if written."""
        home = await self._home()
        current = await self._get(home, "registry", "default") or {}
        if current.get("admin_passwords"):
            return False
        await self._put(home, "registry", "default",
                        self.registry_value(current, admin_enabled=True))
        return True

    def _require_admin(self, stored: dict) -> None:
        if not stored.get("admin_enabled"):
            raise ClusterError("the admin user is disabled; run `georeg registry update "
                               "--admin-enabled true` to enable it first")

    def new_admin_password(self, slot: str) -> dict:
        """A fresh admin password for ``slot``: remembered here first, its hash returned
        to be written (see the module docstring)."""
        value = new_secret()
        remember_admin_password(self.data_dir, slot, value)
        return {"name": slot, "hash": hash_secret(value), "created": self.now()}

    def registry_value(self, current: dict, *, admin_enabled: bool | None = None,
                       anonymous_pull_enabled: bool | None = None) -> dict:
        """The registry object ``current`` with its switches changed; enabling the
        admin user for the first time generates its two passwords, as ACR does."""
        value = dict(current)
        value["name"] = self.registry
        if admin_enabled is not None:
            value["admin_enabled"] = admin_enabled
        if anonymous_pull_enabled is not None:
            value["anonymous_pull_enabled"] = anonymous_pull_enabled
        if value.get("admin_enabled") and not value.get("admin_passwords"):
            value["admin_passwords"] = [self.new_admin_password(s) for s in ADMIN_SLOTS]
        return value

    @one_at_a_time
    async def renew_admin_password(self, slot: str) -> dict:
        """``az acr credential renew --password-name password|password2``."""
        if slot not in ADMIN_SLOTS:
            raise ClusterError(f"the password name is {' or '.join(ADMIN_SLOTS)}, not {slot!r}")
        home = await self._home()
        current = await self._get(home, "registry", "default") or {}
        self._require_admin(current)
        renewed = self.new_admin_password(slot)
        passwords = [p for p in current.get("admin_passwords", []) if p["name"] != slot]
        passwords.append(renewed)
        passwords.sort(key=lambda p: ADMIN_SLOTS.index(p["name"]))
        await self._put(home, "registry", "default",
                        {**current, "name": self.registry, "admin_passwords": passwords})
        return await self.admin_credentials()

    # -- scope maps ----------------------------------------------------------------------

    def _scope_map_view(self, name: str, value: dict | None) -> dict:
        if value is None:
            return {"name": name, "scopeMapType": "SystemDefined",
                    "actions": list(SYSTEM_SCOPE_MAPS[name]),
                    "description": "built-in scope map, applies to all repositories",
                    "creationDate": None, "provisioningState": "Succeeded"}
        return {"name": name, "scopeMapType": "UserDefined", "actions": value["actions"],
                "description": value.get("description", ""),
                "creationDate": _iso(value.get("created")), "provisioningState": "Succeeded"}

    async def list_scope_maps(self) -> list[dict]:
        user = await self._list(await self._reader(), SCOPE_MAP)
        return [self._scope_map_view(n, None) for n in SYSTEM_SCOPE_MAPS] + \
            [self._scope_map_view(n, v) for n, v in user]

    async def show_scope_map(self, name: str) -> dict:
        if name in SYSTEM_SCOPE_MAPS:
            return self._scope_map_view(name, None)
        value = await self._get(await self._reader(), SCOPE_MAP, self._check_name("scope map",
                                                                                  name))
        if value is None:
            raise NotFound(f"no scope map {name!r}; `georeg scope-map list` shows them")
        return self._scope_map_view(name, value)

    @one_at_a_time
    async def create_scope_map(self, name: str, repositories: Sequence[Sequence[str]],
                               description: str = "") -> dict:
        self._read_only(name)
        name = self._check_name("scope map", name)
        actions = repository_actions(repositories)
        if not actions:
            raise ClusterError("a scope map needs at least one --repository REPOSITORY ACTION...")
        home = await self._home()
        await self._create_scope_map(home, name, actions, description)
        return await self.show_scope_map(name)

    async def _create_scope_map(self, home: str, name: str, actions: list[str],
                                description: str) -> None:
        existing = await self._list(home, SCOPE_MAP)
        if any(n == name for n, _ in existing):
            raise Conflict(f"scope map {name!r} exists already; change it with "
                           "`georeg scope-map update`")
        self._check_quota(SCOPE_MAP, len(existing))
        await self._put(home, SCOPE_MAP, name, {"description": description, "actions": actions,
                                                "created": self.now()})

    def _read_only(self, name: str) -> None:
        if name in SYSTEM_SCOPE_MAPS:
            raise ClusterError(f"{name} is a system scope map: built in and read-only")

    @one_at_a_time
    async def update_scope_map(self, name: str, *, add: Sequence[Sequence[str]] = (),
                               remove: Sequence[Sequence[str]] = (),
                               description: str | None = None) -> dict:
        self._read_only(name)
        name = self._check_name("scope map", name)
        adding, removing = repository_actions(add), repository_actions(remove)
        if not adding and not removing and description is None:
            raise ClusterError("nothing to update: give --add-repository, --remove-repository "
                               "or --description")
        home = await self._home()
        current = await self._get(home, SCOPE_MAP, name)
        if current is None:
            raise NotFound(f"no scope map {name!r}; `georeg scope-map list` shows them")
        actions = [a for a in current["actions"] if a not in removing]
        actions += [a for a in adding if a not in actions]
        if not actions:
            raise ClusterError("a scope map keeps at least one action; delete it instead")
        value = {**current, "actions": actions}
        if description is not None:
            value["description"] = description
        await self._put(home, SCOPE_MAP, name, value)
        return self._scope_map_view(name, value)

    @one_at_a_time
    async def delete_scope_map(self, name: str) -> None:
        self._read_only(name)
        name = self._check_name("scope map", name)
        home = await self._home()
        if await self._get(home, SCOPE_MAP, name) is None:
            raise NotFound(f"no scope map {name!r}; `georeg scope-map list` shows them")
        users = sorted(n for n, t in await self._list(home, TOKEN) if t["scope_map"] == name)
        if users:
            raise Conflict(f"scope map {name!r} is used by the tokens {', '.join(users)}; "
                           "delete them or give them another scope map first")
        await self._call(home, "DELETE", _path(SCOPE_MAP, name))

    # -- tokens ------------------------------------------------------------------------

    def _token_view(self, name: str, value: dict, shown: dict[str, str] | None = None) -> dict:
        shown = shown or {}
        passwords = []
        for p in value.get("passwords", []):
            entry = {"name": p["name"], "creationTime": _iso(p.get("created")),
                     "expiry": _iso(p.get("expiry"))}
            if p["name"] in shown:
                entry["value"] = shown[p["name"]]
            passwords.append(entry)
        return {"name": name, "status": value["status"], "scopeMap": value["scope_map"],
                "creationDate": _iso(value.get("created")), "provisioningState": "Succeeded",
                "credentials": {"username": name, "passwords": passwords}}

    async def _scope_map_exists(self, node: str, name: str) -> None:
        if name in SYSTEM_SCOPE_MAPS:
            return
        if name.startswith(SYSTEM_PREFIX) or await self._get(node, SCOPE_MAP, name) is None:
            raise NotFound(f"no scope map {name!r}; `georeg scope-map list` shows them")

    def _password(self, slot: str, expires_in: float | None) -> tuple[dict, str]:
        value = new_secret()
        now = self.now()
        return ({"name": slot, "hash": hash_secret(value), "created": now,
                 "expiry": now + expires_in if expires_in is not None else None}, value)

    @one_at_a_time
    async def create_token(self, name: str, *, scope_map: str | None = None,
                           repositories: Sequence[Sequence[str]] = (), status: str = "enabled",
                           expiration_in_days: int | None = None) -> dict:
        """``az acr token create``; the answer holds both passwords, shown this once."""
        name = self._check_name("token", name)
        if name == self.registry:
            raise ClusterError(f"{name!r} is the admin user's name; choose another token name")
        if status not in STATUSES:
            raise ClusterError(f"status is enabled or disabled, not {status!r}")
        if bool(scope_map) == bool(repositories):
            raise ClusterError("give either --scope-map NAME or --repository REPOSITORY "
                               "ACTION... (which creates the scope map <token>-scope-map)")
        expires_in = _days(expiration_in_days)
        actions = repository_actions(repositories) if repositories else []
        home = await self._home()
        tokens = await self._list(home, TOKEN)
        if any(n == name for n, _ in tokens):
            raise Conflict(f"token {name!r} exists already; change it with `georeg token update`")
        self._check_quota(TOKEN, len(tokens))
        if scope_map:
            await self._scope_map_exists(home, scope_map)
        else:
            scope_map = f"{name}-scope-map"
            await self._create_scope_map(home, scope_map, actions,
                                         f"created with token {name}")
        made = [self._password(slot, expires_in) for slot in TOKEN_SLOTS]
        value = {"scope_map": scope_map, "status": status, "created": self.now(),
                 "passwords": [m[0] for m in made]}
        await self._put(home, TOKEN, name, value)
        return self._token_view(name, value, {m[0]["name"]: m[1] for m in made})

    async def list_tokens(self) -> list[dict]:
        return [self._token_view(n, v) for n, v in await self._list(await self._reader(), TOKEN)]

    async def show_token(self, name: str) -> dict:
        name = self._check_name("token", name)
        value = await self._get(await self._reader(), TOKEN, name)
        if value is None:
            raise NotFound(f"no token {name!r}; `georeg token list` shows them")
        return self._token_view(name, value)

    async def _current_token(self, home: str, name: str) -> dict:
        value = await self._get(home, TOKEN, self._check_name("token", name))
        if value is None:
            raise NotFound(f"no token {name!r}; `georeg token list` shows them")
        return value

    @one_at_a_time
    async def update_token(self, name: str, *, scope_map: str | None = None,
                           status: str | None = None) -> dict:
        if scope_map is None and status is None:
            raise ClusterError("nothing to update: give --scope-map or --status")
        if status is not None and status not in STATUSES:
            raise ClusterError(f"status is enabled or disabled, not {status!r}")
        home = await self._home()
        value = await self._current_token(home, name)
        if scope_map is not None:
            await self._scope_map_exists(home, scope_map)
            value["scope_map"] = scope_map
        if status is not None:
            value["status"] = status
        await self._put(home, TOKEN, name, value)
        return self._token_view(name, value)

    @one_at_a_time
    async def delete_token(self, name: str) -> None:
        home = await self._home()
        await self._current_token(home, name)
        await self._call(home, "DELETE", _path(TOKEN, name))

    @one_at_a_time
    async def generate_token_password(self, name: str, slot: str,
                                      expiration_in_days: int | None = None) -> dict:
        """``az acr token credential generate --password1|--password2``: a new password
        in that slot (the old one stops working once the change reaches a node)."""
        if slot not in TOKEN_SLOTS:
            raise ClusterError(f"the password is {' or '.join(TOKEN_SLOTS)}, not {slot!r}")
        expires_in = _days(expiration_in_days)
        home = await self._home()
        value = await self._current_token(home, name)
        secret, plain = self._password(slot, expires_in)
        passwords = [p for p in value.get("passwords", []) if p["name"] != slot] + [secret]
        value["passwords"] = sorted(passwords, key=lambda p: TOKEN_SLOTS.index(p["name"]))
        await self._put(home, TOKEN, name, value)
        return self._token_view(name, value, {slot: plain})

    # -- identities and role assignments -----------------------------------------------

    @one_at_a_time
    async def create_identity(self, display_name: str) -> dict:
        """A new identity (an id and a secret, the secret shown this once)."""
        if not isinstance(display_name, str) or not display_name or len(display_name) > 128:
            raise ClusterError("give the identity a name (--name), at most 128 characters")
        home = await self._home()
        identity_id = str(uuid.uuid4())
        secret = new_secret()
        created = self.now()
        await self._put(home, IDENTITY, identity_id, {
            "display_name": display_name, "created": created,
            "secrets": [{"name": "secret", "hash": hash_secret(secret), "created": created}]})
        return {"id": identity_id, "displayName": display_name, "secret": secret,
                "creationDate": _iso(created)}

    async def list_identities(self) -> list[dict]:
        return [{"id": n, "displayName": v.get("display_name", ""),
                 "creationDate": _iso(v.get("created"))}
                for n, v in await self._list(await self._reader(), IDENTITY)]

    @one_at_a_time
    async def delete_identity(self, identity_id: str) -> None:
        """Delete an identity and the roles assigned to it."""
        identity_id = self._check_name("identity", identity_id)
        home = await self._home()
        if await self._get(home, IDENTITY, identity_id) is None:
            raise NotFound(f"no identity {identity_id!r}; `georeg identity list` shows them")
        for name, value in await self._list(home, ROLE_ASSIGNMENT):
            if value["assignee"] == identity_id:
                await self._call(home, "DELETE", _path(ROLE_ASSIGNMENT, name))
        await self._call(home, "DELETE", _path(IDENTITY, identity_id))

    async def registry_roles(self, identity_id: str, secret: str) -> list[str]:
        """The roles ``identity_id`` holds on the whole registry, if ``secret`` is
        one of its secrets (else none): who may watch the dashboard
        (``cluster.control.dashboard``). Read from any node, as nodes check it."""
        if not NAME.fullmatch(identity_id):
            return []
        reader = await self._reader()
        stored = await self._get(reader, IDENTITY, identity_id)
        if stored is None or not any(secret_matches(secret, s.get("hash", ""))
                                     for s in stored.get("secrets", [])):
            return []
        return await self._registry_roles(reader, identity_id)

    async def registry_roles_now(self, identity_id: str) -> list[str]:
        """The roles an identity that signed in still holds on the whole registry
        (none once it is deleted): the dashboard asks again while its viewer watches."""
        if not NAME.fullmatch(identity_id):
            return []
        reader = await self._reader()
        if await self._get(reader, IDENTITY, identity_id) is None:
            return []
        return await self._registry_roles(reader, identity_id)

    async def _registry_roles(self, reader: str, identity_id: str) -> list[str]:
        return sorted({v["role"] for _, v in await self._list(reader, ROLE_ASSIGNMENT)
                       if v.get("assignee") == identity_id and not v.get("repository")})

    @staticmethod
    def _repository_of(scope: str | None) -> str | None:
        if scope in (None, ""):
            return None
        prefix = "repository/"
        if not isinstance(scope, str) or not scope.startswith(prefix) or len(scope) == len(prefix):
            raise ClusterError(f"a scope is repository/NAME (or none: the whole registry), "
                               f"not {scope!r}")
        return scope[len(prefix):]

    def assignment_id(self, role: str, assignee: str, scope: str | None = None) -> str:
        """One id per (assignee, role, scope): a second create is a conflict,
        never a duplicate, and ``delete --assignee --role --scope`` finds it."""
        repository = self._repository_of(scope)
        return str(uuid.uuid5(_ASSIGNMENTS, f"{assignee}|{role}|{repository or ''}"))

    @staticmethod
    def _assignment_view(name: str, value: dict) -> dict:
        repository = value.get("repository")
        return {"id": name, "roleDefinitionName": value["role"], "principalId": value["assignee"],
                "scope": f"repository/{repository}" if repository else "registry"}

    @one_at_a_time
    async def create_role_assignment(self, role: str, assignee: str,
                                     scope: str | None = None) -> dict:
        if role not in ROLES:
            raise ClusterError(f"role {role!r} is not one of {', '.join(ROLES)}")
        assignee = self._check_name("identity", assignee)
        name = self.assignment_id(role, assignee, scope)
        repository = self._repository_of(scope)
        home = await self._home()
        if await self._get(home, IDENTITY, assignee) is None:
            raise NotFound(f"no identity {assignee!r}; `georeg identity list` shows them")
        if await self._get(home, ROLE_ASSIGNMENT, name) is not None:
            raise Conflict(f"{assignee} already has the role {role} on "
                           f"{scope or 'the registry'}")
        value = {"assignee": assignee, "role": role, "repository": repository,
                 "created": self.now()}
        await self._put(home, ROLE_ASSIGNMENT, name, value)
        return self._assignment_view(name, value)

    async def list_role_assignments(self, assignee: str | None = None) -> list[dict]:
        return [self._assignment_view(n, v)
                for n, v in await self._list(await self._reader(), ROLE_ASSIGNMENT)
                if assignee is None or v["assignee"] == assignee]

    @one_at_a_time
    async def delete_role_assignment(self, assignment_id: str) -> None:
        assignment_id = self._check_name("role assignment", assignment_id)
        home = await self._home()
        if await self._get(home, ROLE_ASSIGNMENT, assignment_id) is None:
            raise NotFound(f"no role assignment {assignment_id!r}; `georeg role assignment "
                           "list` shows them")
        await self._call(home, "DELETE", _path(ROLE_ASSIGNMENT, assignment_id))
