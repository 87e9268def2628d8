"""The token server every node runs (``/oauth2/…``), as ACR answers it.

* ``GET /oauth2/token?service=&scope=…`` with Basic credentials (or none, for
  anonymous pull): ``{"token", "access_token", "expires_in", "issued_at"}``, plus
  ``refresh_token`` when ``offline_token=true``. ``scope`` may repeat or hold a
  space-separated list.
* ``POST /oauth2/token`` (form): ``grant_type=password`` (``username``,
  ``password``; none for anonymous) or ``grant_type=refresh_token``
  (``refresh_token``), with ``service`` and ``scope`` (repeated or a list):
  ``{"access_token", "token_type", "expires_in", "issued_at", "scope"}``, plus
  ``refresh_token`` for ``access_type=offline`` or a refresh grant.
* ``POST /oauth2/exchange``: an identity's credential (form ``grant_type=password``
  with ``username`` = its id and ``password`` = its secret, or Basic) for
  ``{"refresh_token"}`` — what ``az acr login`` does with an Entra token; docker
  then logs in as ``00000000-0000-0000-0000-000000000000`` with it.

The grant is the intersection of what was asked and what the principal holds;
an empty grant is a token. Wrong credentials: ``401 UNAUTHORIZED``; a token for
another service: ``400``; an unknown ``grant_type``: ``400 UNSUPPORTED``.
Unlike ACR, answers carry ``expires_in`` (4500 s), so clients do not fetch a
new token every 60 s.
"""

from __future__ import annotations

import structlog
from aiohttp import web

from ..auth.gate import IDENTITY, Principal
from ..auth.scopes import format_scopes, parse_scopes
from ..errors import ErrorCode, RegistryError
from .auth import GATE
from .common import json_response

log = structlog.get_logger("georeg.auth")
# A form is a few hundred bytes; a refresh token under 2 KiB.
MAX_FORM_BYTES = 64 * 1024


def _unauthorized(request: web.Request, reason: str) -> RegistryError:
    log.info("login_refused", path=request.path, reason=reason)
    return RegistryError(ErrorCode.UNAUTHORIZED, reason, message="authentication required",
                         headers={"WWW-Authenticate": f'Basic realm="{request.app[GATE].service}"'})


def _check_service(request: web.Request, service: str | None) -> None:
    gate = request.app[GATE]
    if service and service != gate.service:
        raise RegistryError(ErrorCode.UNSUPPORTED,
                            f"this token server issues tokens for service {gate.service!r}",
                            message="unknown service", status=400)


async def _form(request: web.Request):
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise RegistryError(ErrorCode.SIZE_INVALID, "the form is too large", status=413)
    try:
        return await request.post()
    except (UnicodeDecodeError, ValueError):
        raise RegistryError(ErrorCode.UNSUPPORTED, "the body is not a URL-encoded form",
                            message="invalid form", status=400) from None


def _basic(request: web.Request) -> tuple[bool, Principal | None]:
    """(whether Basic credentials were sent, the principal they name)."""
    header = request.headers.get("Authorization")
    if header is None:
        return False, None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return True, None
    return True, request.app[GATE].login_basic(value.strip())


async def get_token(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    _check_service(request, request.query.get("service"))
    sent, principal = _basic(request)
    if sent and principal is None:
        raise _unauthorized(request, "wrong username or password")
    principal = principal or gate.anonymous()
    if principal is None:
        raise _unauthorized(request, "credentials required (anonymous pull is disabled)")
    minted, _ = gate.issue(principal, parse_scopes(request.query.getall("scope", [])))
    answer = {"token": minted.token, "access_token": minted.token,
              "expires_in": minted.expires_in, "issued_at": minted.issued_at_text}
    if request.query.get("offline_token") == "true" and principal.subject:
        answer["refresh_token"] = gate.issue_refresh(principal).token
    return json_response(answer)


async def post_token(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    form = await _form(request)
    _check_service(request, form.get("service"))
    grant_type = form.get("grant_type")
    refresh = None
    if grant_type == "password":
        username, password = form.get("username", ""), form.get("password", "")
        if username or password:
            principal = gate.login(str(username), str(password))
            if principal is None:
                raise _unauthorized(request, "wrong username or password")
        else:
            principal = gate.anonymous()
            if principal is None:
                raise _unauthorized(request, "credentials required (anonymous pull is disabled)")
        if form.get("access_type") == "offline" and principal.subject:
            refresh = gate.issue_refresh(principal).token
    elif grant_type == "refresh_token":
        refresh = str(form.get("refresh_token", ""))
        principal = gate.redeem(refresh) if refresh else None
        if principal is None:
            raise _unauthorized(request, "the refresh token is not valid")
    else:
        raise RegistryError(ErrorCode.UNSUPPORTED, "grant_type must be password or refresh_token",
                            message="unsupported grant type", status=400)
    minted, granted = gate.issue(principal, parse_scopes(form.getall("scope", [])))
    answer = {"access_token": minted.token, "token_type": "Bearer",
              "expires_in": minted.expires_in, "issued_at": minted.issued_at_text,
              "scope": format_scopes(granted)}
    if refresh:
        answer["refresh_token"] = refresh
    return json_response(answer)


async def exchange(request: web.Request) -> web.Response:
    gate = request.app[GATE]
    form = await _form(request)
    _check_service(request, form.get("service"))
    sent, principal = _basic(request)
    if not sent:
        if form.get("grant_type") != "password":
            raise RegistryError(ErrorCode.UNSUPPORTED, "grant_type must be password",
                                message="unsupported grant type", status=400)
        principal = gate.login(str(form.get("username", "")), str(form.get("password", "")))
    if principal is None or principal.kind != IDENTITY:
        raise _unauthorized(request, "an identity's id and secret are required")
    return json_response({"refresh_token": gate.issue_refresh(principal).token})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/oauth2/token", get_token, allow_head=False)
    router.add_post("/oauth2/token", post_token)
    router.add_post("/oauth2/exchange", exchange)
