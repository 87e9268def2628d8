"""``georeg registry check-health``: the registry's side of ``az acr
check-health --name``, for a cluster on one machine.

ACR's command checks the client's environment (Docker, Helm, the CLI) and
then the registry: a DNS lookup of the login server, its challenge endpoint
(``GET /v2/`` must answer ``401`` with a challenge), a refresh token, an
access token. Each failure has a code (``CONNECTIVITY_DNS_ERROR``,
``CONNECTIVITY_CHALLENGE_ERROR``, ``CONNECTIVITY_FORBIDDEN_ERROR``,
``CONNECTIVITY_REFRESH_TOKEN_ERROR``, ``CONNECTIVITY_ACCESS_TOKEN_ERROR``,
``CONNECTIVITY_SSL_ERROR``, ``CONNECTIVITY_TOOMANYREQUESTS_ERROR``; ACR's
health check error reference). A local cluster has no DNS and no client
environment to judge; what it can check, it does, in this order:

* the control plane: a node of the home region answers over its management
  link (``CONTROL_PLANE_UNAVAILABLE`` otherwise: configuration changes fail);
* every endpoint clients use — each client location's global endpoint and
  each replica's regional endpoint — is reachable on its port and issues a
  challenge on ``/v2/`` (an open cluster: answers ``200``), with ACR's codes
  for what goes wrong;
* with auth, on each of those endpoints, the admin user (when enabled) gets
  a refresh token and with it an access token, from the token endpoint the
  challenge names (skipped, and said so, without an admin user);
* every serving node of every replica answers over the network
  (``REPLICA_UNAVAILABLE`` otherwise, naming the node, its zone and what the
  supervisor knows: crashed, stopped).

The answer: ``{"healthy", "checks": [{"check", "target", "region", "status":
OK|ERROR|SKIPPED, "code", "message"}], "broken": [what is broken, by
region or plane]}``. A crashed region fails its regional endpoint and its
nodes' checks, and is named in ``broken``; the global endpoints still pass
(they fail over), as a client sees it. Checks run concurrently; each has
its own timeout.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import aiohttp

from registry_node import broken_build

from .access import AdminLogin
from .errors import ClusterError

if TYPE_CHECKING:                      # a Cluster is handed in; it never imports this module
    from .cluster import Cluster

TIMEOUT_S = 5.0
OK, ERROR, SKIPPED = "OK", "ERROR", "SKIPPED"
SCOPE = "registry:catalog:*"


@dataclass(frozen=True, slots=True)
class Check:
    check: str           # what was checked, as az words it
    target: str          # which part: "global endpoint (eastus)", "node westeurope", …
    region: str
    status: str
    code: str = ""
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


async def check_health(cluster: Cluster) -> dict:
    """Every check of the module docstring, on ``cluster``."""
    tls = cluster.tls.client if cluster.tls is not None else None
    login = None
    notes: list[Check] = []
    if cluster.spec.auth_enabled:
        try:
            login = await cluster.access.admin_login()
        except ClusterError as exc:
            notes.append(Check("Admin credentials", "control plane", cluster.spec.home_region,
                               SKIPPED, message=f"cannot be read: {exc}"))
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls or True, force_close=True),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http:
        endpoint_checks = [
            _endpoint(http, cluster, f"{e.kind} endpoint ({e.region})", e.region, e.url, login)
            for e in cluster.endpoints()]
        node_checks = [_node(cluster, n.name, n.region, n.zone) for n in cluster.plan.nodes]
        found = await asyncio.gather(_control_plane(cluster), *endpoint_checks, *node_checks)
    checks: list[Check] = [found[0], *notes]
    for group in found[1:]:
        checks += group if isinstance(group, list) else [group]
    broken = _broken(cluster, checks)
    return {"healthy": not broken, "checks": [c.as_dict() for c in checks], "broken": broken}


async def _control_plane(cluster: Cluster) -> Check:
    home = cluster.spec.home_region
    nodes = [n.name for n in cluster.plan.nodes_in(home)]
    answers = await asyncio.gather(*(cluster.answers(n) for n in nodes))
    if any(answers):
        return Check("Control plane", f"home region {home}", home, OK)
    return Check("Control plane", f"home region {home}", home, ERROR, "CONTROL_PLANE_UNAVAILABLE",
                 f"no node of the home region answers ({', '.join(nodes)}): configuration "
                 f"changes fail until it returns; pushes and pulls go on through the other "
                 f"replicas")


async def _node(cluster: Cluster, name: str, region: str, zone: str) -> Check:
    target = f"node {name}" + (f" (zone {zone})" if zone else "")
    runtime = cluster.nodes().get(name)
    if await cluster.answers(name):
        if runtime is not None and runtime.info.get("unchecked_replication"):
            # TEST ONLY (registry_node.broken_build): never healthy.
            return Check("Replica node answers", target, region, ERROR, broken_build.LOG_EVENT,
                         f"{name} runs a test-only broken build: it stores replicated bytes "
                         f"unchecked")
        return Check("Replica node answers", target, region, OK)
    state = f"{runtime.state}{': ' + runtime.reason if runtime.reason else ''}" \
        if runtime is not None else "unknown"
    return Check("Replica node answers", target, region, ERROR, "REPLICA_UNAVAILABLE",
                 f"{name} does not answer over the network (supervisor: {state})")


async def _endpoint(http: aiohttp.ClientSession, cluster: Cluster, target: str, region: str,
                    url: str, login: AdminLogin | None) -> list[Check]:
    challenge_url = f"{url}/v2/"
    check = f"Challenge endpoint {challenge_url}"
    try:
        async with http.get(challenge_url) as r:
            status, header = r.status, r.headers.get("WWW-Authenticate", "")
            await r.read()
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        return [Check(check, target, region, ERROR, "CONNECTIVITY_SSL_ERROR", _text(exc))]
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return [Check(check, target, region, ERROR, "CONNECTIVITY_CHALLENGE_ERROR",
                      f"not reachable: {_text(exc)}")]
    auth = cluster.spec.auth_enabled
    if status == 403:
        return [Check(check, target, region, ERROR, "CONNECTIVITY_FORBIDDEN_ERROR",
                      "the challenge endpoint answered 403 Forbidden")]
    if status == 429:
        return [Check(check, target, region, ERROR, "CONNECTIVITY_TOOMANYREQUESTS_ERROR",
                      "the challenge endpoint answered 429 Too Many Requests")]
    if auth and not (status == 401 and header.lower().startswith("bearer ")):
        return [Check(check, target, region, ERROR, "CONNECTIVITY_CHALLENGE_ERROR",
                      f"answered {status} without a Bearer challenge")]
    if not auth and status != 200:
        return [Check(check, target, region, ERROR, "CONNECTIVITY_CHALLENGE_ERROR",
                      f"answered {status} (an open registry answers 200)")]
    checks = [Check(check, target, region, OK)]
    if not auth:
        return checks
    realm = _param(header, "realm") or f"{url}/oauth2/token"
    service = _param(header, "service") or cluster.spec.login_server
    if login is None:
        return checks + [Check(f"Fetch refresh token for registry '{service}'", target, region,
                               SKIPPED, message="the admin user is disabled: no credential to "
                                                "log in with")]
    return checks + await _tokens(http, target, region, realm, service, login)


async def _tokens(http: aiohttp.ClientSession, target: str, region: str, realm: str,
                  service: str, login: AdminLogin) -> list[Check]:
    refresh_check = f"Fetch refresh token for registry '{service}'"
    access_check = f"Fetch access token for registry '{service}'"
    form = {"grant_type": "password", "username": login.username, "password": login.password,
            "service": service, "scope": SCOPE, "access_type": "offline"}
    refresh, problem = await _token(http, realm, form, "refresh_token")
    if refresh is None:
        return [Check(refresh_check, target, region, ERROR, "CONNECTIVITY_REFRESH_TOKEN_ERROR",
                      problem)]
    access, problem = await _token(http, realm, {
        "grant_type": "refresh_token", "refresh_token": refresh, "service": service,
        "scope": SCOPE}, "access_token")
    if access is None:
        return [Check(refresh_check, target, region, OK),
                Check(access_check, target, region, ERROR, "CONNECTIVITY_ACCESS_TOKEN_ERROR",
                      problem)]
    return [Check(refresh_check, target, region, OK), Check(access_check, target, region, OK)]


async def _token(http: aiohttp.ClientSession, realm: str, form: dict,
                 field: str) -> tuple[str | None, str]:
    try:
        async with http.post(realm, data=form) as r:
            body = await r.json(content_type=None) if r.status == 200 else None
            if isinstance(body, dict) and isinstance(body.get(field), str):
                return body[field], ""
            return None, f"the token endpoint {realm} answered {r.status}"
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        return None, f"the token endpoint {realm} did not answer: {_text(exc)}"


def _param(header: str, name: str) -> str:
    """A parameter of a ``WWW-Authenticate: Bearer`` challenge (values are quoted)."""
    for part in header.partition(" ")[2].split(","):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip('"')
    return ""


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _broken(cluster: Cluster, checks: list[Check]) -> list[str]:
    """What failed, one line per plane or region, naming the failing parts."""
    failed: dict[str, list[str]] = {}
    for c in checks:
        if c.status != ERROR:
            continue
        where = "control plane" if c.code == "CONTROL_PLANE_UNAVAILABLE" else c.region
        failed.setdefault(where, []).append(f"{c.target}: {c.code}")
    order = ["control plane", *(r.region for r in cluster.spec.all_replicas)]
    return [f"{where}: {'; '.join(failed[where])}"
            for where in sorted(failed, key=lambda w: order.index(w) if w in order else len(order))]
