"""The access decision for one request, and the token server's logins: credentials in,
a principal and its permissions out.

Credentials a node accepts:

* ``Basic`` — the admin user (registry name + password1/2, while admin is
  enabled), a token (its name + one of its passwords, while enabled and not
  expired), an identity (its id + a secret), or the null GUID with a refresh
  token as the password (what ``az acr login`` hands docker);
* ``Bearer`` — an access token minted by any node of the cluster;
* nothing — anonymous, which may pull while anonymous pull is enabled.

Every principal is re-read from the ``IdentitySource`` on each use, so a token
disabled or deleted, a password regenerated or expired, admin switched off or
a role removed takes effect on the next request, on every node that has
received the change. A bearer token's permissions are what it was granted
*and* what its principal still holds.

A client sends one bearer token for many requests, so an admission by bearer
token is remembered, per (``Authorization`` value, access needed), for as long
as it provably stands: the source's ``generation`` has not moved (any change
to any identity, scope map, role or setting moves it) and the clock is before
both the token's expiry (with its leeway) and the expiry of the credential it
was minted from. Past either, the request is decided afresh. Refusals and
``Basic`` credentials are never remembered (no password is kept).

Outcomes: ``Refusal.unauthenticated`` (401: no, malformed, wrong or outdated
credentials; anonymous lacking access) or ``Refusal.denied`` (403: a known
principal lacking access), each naming the access the request needed. The
decision reads nothing about repositories, so it reveals nothing about them.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import permissions as perms
from .identities import DISABLED, IdentitySource, Password, secret_matches
from .permissions import Holdings, Permissions
from .scopes import ANY, Scope, grant, missing
from .tokens import ACCESS, LEEWAY_S, REFRESH, InvalidToken, Minted, TokenAuthority

# The username that says "the password is a refresh token" (ACR, az acr login).
NULL_GUID = "00000000-0000-0000-0000-000000000000"
ADMIN, TOKEN, IDENTITY, ANONYMOUS = "admin", "token", "identity", "anonymous"
# Credentials longer than this are refused unread; aiohttp's parser already
# refuses any header line over 8190 bytes before a request gets this far.
MAX_CREDENTIAL_LENGTH = 8192
# Bearer admissions remembered (``Gate._recalled``): a client sends one token for
# many requests, and checking it again costs more than the request it guards.
ADMISSIONS_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str                   # ADMIN, TOKEN, IDENTITY or ANONYMOUS
    name: str                   # registry name, token name, identity id, "" for anonymous
    credential: str = ""        # the fingerprint of the password or secret used

    @property
    def subject(self) -> str:
        return "" if self.kind == ANONYMOUS else f"{self.kind}:{self.name}"

    @classmethod
    def from_subject(cls, subject: str, credential: str) -> Principal | None:
        if subject == "":
            return cls(ANONYMOUS, "")
        kind, sep, name = subject.partition(":")
        if not sep or kind not in (ADMIN, TOKEN, IDENTITY) or not name:
            return None
        return cls(kind, name, credential)


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS, "")


@dataclass(frozen=True, slots=True)
class Refusal(Exception):
    """Why a request may not proceed. ``status`` 401 or 403; ``needed`` is what the
    request needs (the challenge's scope); ``error`` the RFC 6750 error code."""

    status: int
    needed: tuple[Scope, ...]
    error: str | None = None
    reason: str = ""
    lacking: tuple[Scope, ...] = ()
    # A 403's principal: authenticated, refused by authorization (the request
    # chain throttles it in between, ``api.auth``).
    principal: Principal | None = None

    @classmethod
    def unauthenticated(cls, needed: Sequence[Scope], reason: str,
                        error: str | None = None) -> Refusal:
        return cls(401, tuple(needed), error, reason)

    @classmethod
    def denied(cls, needed: Sequence[Scope], lacking: Sequence[Scope],
               principal: Principal | None = None) -> Refusal:
        actions = ", ".join(s.format() for s in lacking)
        return cls(403, tuple(needed), "insufficient_scope", f"not allowed: {actions}",
                   tuple(lacking), principal)


@dataclass(frozen=True, slots=True)
class Admitted:
    principal: Principal
    permissions: Holdings


class Gate:
    """Authentication and authorization for one registry, against ``source``."""

    def __init__(self, source: IdentitySource, tokens: TokenAuthority,
                 now: Callable[[], float] = time.time) -> None:
        self.source = source
        self.tokens = tokens
        self.now = now
        # (Authorization header, needed) -> (Admitted, source generation, until)
        self._admissions: dict[tuple[str, tuple[Scope, ...]], tuple[Admitted, int, float]] = {}

    @property
    def service(self) -> str:
        return self.tokens.service

    # -- the request chain ---------------------------------------------------------

    def admit(self, authorization: str | None, needed: Sequence[Scope]) -> Admitted:
        """Let a request through that needs ``needed`` (empty: any valid principal),
        or raise ``Refusal``."""
        if authorization is None:
            settings = self.source.settings()
            if settings.anonymous_pull_enabled and needed:
                held = perms.ANONYMOUS_PULL
                if not missing(needed, held.actions_on):
                    return Admitted(ANONYMOUS_PRINCIPAL, held)
            raise Refusal.unauthenticated(needed, "no credentials")
        needed = tuple(needed)
        admitted = self._recalled(authorization, needed)
        if admitted is not None:
            return admitted
        generation = self.source.generation         # what the decision below is made on
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        if len(value) > MAX_CREDENTIAL_LENGTH:
            raise Refusal.unauthenticated(needed, "credentials too long",
                                          "invalid_token" if scheme == "bearer" else None)
        if scheme == "basic":
            principal = self.login_basic(value)
            if principal is None:
                raise Refusal.unauthenticated(needed, "wrong username or password")
            held = self.permissions(principal)
        elif scheme == "bearer":
            try:
                claims = self.tokens.verify(value, ACCESS)
            except InvalidToken as exc:
                raise Refusal.unauthenticated(needed, str(exc), "invalid_token") from None
            principal = Principal.from_subject(claims.subject, claims.credential)
            credential_until = None if principal is None else self.standing(principal)
            if credential_until is None:
                raise Refusal.unauthenticated(needed, "the token's principal cannot log in now",
                                              "invalid_token")
            held = _within(self.permissions(principal), claims.access)
            until = min(claims.expires + LEEWAY_S, credential_until)
        else:
            raise Refusal.unauthenticated(needed, "unsupported authorization scheme")
        lacking = missing(needed, held.actions_on)
        if lacking:
            if principal.kind == ANONYMOUS:
                raise Refusal.unauthenticated(needed, "anonymous access is not enough",
                                              "insufficient_scope" if scheme == "bearer" else None)
            raise Refusal.denied(needed, lacking, principal)
        admitted = Admitted(principal, held)
        if scheme == "bearer":
            self._remember(authorization, needed, admitted, generation, until)
        return admitted

    def _recalled(self, authorization: str, needed: tuple[Scope, ...]) -> Admitted | None:
        """The admission of this very bearer request made before, if it still stands:
        nothing the principal depends on has changed (the source's generation), and
        neither the token nor the credential it was minted from has expired since."""
        remembered = self._admissions.get((authorization, needed))
        if remembered is None:
            return None
        admitted, generation, until = remembered
        if generation != self.source.generation or self.now() >= until:
            del self._admissions[(authorization, needed)]
            return None
        return admitted

    def _remember(self, authorization: str, needed: tuple[Scope, ...], admitted: Admitted,
                  generation: int, until: float) -> None:
        if len(self._admissions) >= ADMISSIONS_LIMIT:
            del self._admissions[next(iter(self._admissions))]       # the oldest
        self._admissions[(authorization, needed)] = (admitted, generation, until)

    # -- logins (the token server's and Basic on registry routes) ---------------------

    def login_basic(self, encoded: str) -> Principal | None:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        return self.login(username, password) if sep else None

    def login(self, username: str, password: str) -> Principal | None:
        """The principal ``username``/``password`` names, or None."""
        if not username or not password:
            return None
        if username == NULL_GUID:
            return self.redeem(password)
        now = self.now()
        settings = self.source.settings()
        if username == settings.name:
            if settings.admin_enabled:
                used = _matching(settings.admin_passwords, password, now)
                if used is not None:
                    return Principal(ADMIN, username, used.fingerprint)
            return None
        token = self.source.token(username)
        if token is not None:
            if token.status == DISABLED:
                return None
            used = _matching(token.passwords, password, now)
            return None if used is None else Principal(TOKEN, username, used.fingerprint)
        identity = self.source.identity(username)
        if identity is not None:
            used = _matching(identity.secrets, password, now)
            return None if used is None else Principal(IDENTITY, username, used.fingerprint)
        return None

    def redeem(self, refresh_token: str) -> Principal | None:
        """The principal a refresh token stands for, if it may still log in."""
        try:
            claims = self.tokens.verify(refresh_token, REFRESH)
        except InvalidToken:
            return None
        principal = Principal.from_subject(claims.subject, claims.credential)
        if principal is None or principal.kind == ANONYMOUS or not self.current(principal):
            return None
        return principal

    def anonymous(self) -> Principal | None:
        return ANONYMOUS_PRINCIPAL if self.source.settings().anonymous_pull_enabled else None

    def current(self, principal: Principal) -> bool:
        """Whether ``principal``'s login still stands: it exists, is enabled, and the
        credential it used is still there and unexpired."""
        return self.standing(principal) is not None

    def standing(self, principal: Principal) -> float | None:
        """Until when ``principal``'s login stands as the source is now (``inf``: for
        as long as nothing changes), or None if it does not stand now."""
        now = self.now()
        if principal.kind == ANONYMOUS:
            return math.inf if self.source.settings().anonymous_pull_enabled else None
        if principal.kind == ADMIN:
            settings = self.source.settings()
            slots = settings.admin_passwords if settings.admin_enabled \
                and settings.name == principal.name else ()
        elif principal.kind == TOKEN:
            token = self.source.token(principal.name)
            slots = token.passwords if token is not None and token.status != DISABLED else ()
        else:
            identity = self.source.identity(principal.name)
            slots = identity.secrets if identity is not None else ()
        for slot in slots:
            if slot.fingerprint == principal.credential and slot.valid_at(now):
                return math.inf if slot.expiry is None else slot.expiry
        return None

    def permissions(self, principal: Principal) -> Permissions:
        """What ``principal`` may do now."""
        if principal.kind == ADMIN:
            return perms.ADMIN
        if principal.kind == ANONYMOUS:
            return perms.ANONYMOUS_PULL if self.source.settings().anonymous_pull_enabled \
                else perms.NOTHING
        if principal.kind == TOKEN:
            token = self.source.token(principal.name)
            if token is None:
                return perms.NOTHING
            actions = perms.SYSTEM_SCOPE_MAPS.get(token.scope_map)
            if actions is None:
                scope_map = self.source.scope_map(token.scope_map)
                actions = scope_map.actions if scope_map is not None else ()
            try:
                return perms.for_scope_map(actions)
            except perms.ScopeMapError:
                return perms.NOTHING       # the store validates; a bad record grants nothing
        held = perms.NOTHING
        for assignment in self.source.role_assignments(principal.name):
            held = held | perms.for_role(assignment.role, assignment.repository)
        return held

    def issue(self, principal: Principal, asked: Sequence[Scope]) -> tuple[Minted, list[Scope]]:
        """An access token for what of ``asked`` ``principal`` holds."""
        granted = grant(asked, self.permissions(principal).actions_on)
        return self.tokens.mint(principal.subject, principal.credential, ACCESS, granted), granted

    def issue_refresh(self, principal: Principal) -> Minted:
        return self.tokens.mint(principal.subject, principal.credential, REFRESH)


def _matching(slots: Sequence[Password], password: str, now: float) -> Password | None:
    for slot in slots:
        if slot.valid_at(now) and secret_matches(password, slot.hashed):
            return slot
    return None


def _within(held: Permissions, granted: Sequence[Scope]) -> _Narrowed:
    """``held`` narrowed to what a token granted."""
    return _Narrowed(held, {s.resource: s.actions for s in granted})


@dataclass(frozen=True, slots=True)
class _Narrowed:
    """Permissions narrowed to a token's grant: an action needs both."""

    held: Permissions
    granted: dict[tuple[str, str], frozenset[str]]

    def actions_on(self, kind: str, name: str) -> frozenset[str]:
        token = self.granted.get((kind, name), frozenset())
        held = self.held.actions_on(kind, name)
        if ANY in held:
            return token
        if ANY in token:
            return held
        return token & held
