"""The live web dashboard, served by the management server (``management``)
beside its API: the cluster on a world map, faults injected and healed at a
click, replication lag as an origin × destination heatmap, the endpoints'
traffic and an image's journey. Everything it loads comes from this package
(``dashboard_static/``): nothing from the internet.

    GET    /dashboard/                     the page (no secret in it: anyone may load it)
    GET    /dashboard/static/{file}        its script, style sheet and world outline
    POST   /dashboard/api/session          sign in: {"credential": owner credential} |
                                           {"identity": id, "secret": s} | {"loginToken": t}
                                           → {"session", "role", "expiresInS"}
    DELETE /dashboard/api/session          sign out (the session presented)
    GET    /dashboard/api/state            one snapshot (what the stream sends)
    GET    /dashboard/api/events           the snapshots as Server-Sent Events, at most one a second
                                           and only when something changed
    GET    /dashboard/api/images?repository=R&reference=T   an image's per-replica status
    POST   /dashboard/api/faults           inject (the management API's body); owner only
    DELETE /dashboard/api/faults[/{id}]    heal one, or all; owner only
    POST   /georeg/v1/dashboard/login-tokens   (management API, owner credential) a one-time
                                           token that signs a browser in: ``georeg dashboard``
    PUT    /georeg/v1/dashboard/chaos-run  (management API, owner credential) a running chaos
                                           scenario's timeline (``cluster.faults.timeline``)

Who may do what: the cluster owner (the owner credential, or a one-time token
minted with it) sees everything and injects and heals faults, through the
same fault controller and handlers as ``georeg fault``. An identity
(``georeg identity``) with a role that pulls the whole registry
(``may_watch``: the image search asks nodes with the cluster's internal
credential, so it must show nothing the viewer could not pull) signs in with
its id and secret as a *viewer*: it sees the dashboard, and every fault route
answers it 403. A cluster without auth has no sign-in, as its management API
has none. The management API itself never accepts a dashboard session; its
owner check stays in ``management``, which asks this module only whether a
request is a live session on the dashboard's API (``session_role``).

Invariants: a session is a random 256-bit bearer token held only in this
process's memory (lost at restart: sign in again) and in the page's
``sessionStorage``; every dashboard API call carries it in the
``Authorization`` header, never in a cookie or a URL, so another site cannot
make a signed-in browser act (no CSRF) and it is never in a log. A login token
works once, within ``LOGIN_TOKEN_TTL_S``. Sessions are bounded per role
(``MAX_SESSIONS``: the owner's oldest forgotten, a viewer refused with 429, so
viewers never sign the owner out); event streams per session and in all
(``MAX_STREAMS_EACH``, ``MAX_STREAMS``). A stream ends with its session: it
asks ``still_allowed`` before every frame (sign-out, expiry, and a viewer's
roles read again every ``VERIFY_EVERY_S``). The stream computes a snapshot
at most once a second whatever the number of pages, and at once when the
fault controller says a fault changed (``FaultController.watchers``: injected
or healed from anywhere, a flap's phase); node metrics (the lag heatmap) are
scraped at most every ``LAG_EVERY_S``. A snapshot carries nothing that moves
on an idle cluster (link rates, not byte counts: ``LinkRates``), so an idle
page is sent keepalives, not frames. Identities' sign-ins being checked are
bounded (``MAX_SIGN_INS_AT_ONCE``: each asks a node); the owner's are not
counted, so nobody can hold the owner off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import structlog
from aiohttp import web

from registry_node.auth.permissions import reads_whole_registry

from ..faults.timeline import decode_timeline
from .access import authorization
from .errors import ClusterError, Forbidden, TooManyRequests, Unauthorized
from .regions import REGIONS
from .request_body import bounded_body, json_object

if TYPE_CHECKING:
    from .cluster import Cluster

log = structlog.get_logger("georeg.dashboard")

STATIC_DIR = Path(__file__).with_name("dashboard_static")
PREFIX = "/dashboard"
API = f"{PREFIX}/api/"
OWNER, VIEWER = "owner", "viewer"
ROLE = web.RequestKey("role", str)    # who asks: set by management's access middleware
BY_SESSION = web.RequestKey("by_session", bool)   # ... through a dashboard session
SESSION_TTL_S = 12 * 3600
LOGIN_TOKEN_TTL_S = 120
MAX_SESSIONS = {OWNER: 64, VIEWER: 256}     # each role its own bound
MAX_STREAMS_EACH = 4           # open event streams of one signed-in browser
MAX_STREAMS = 64               # ... and in all
MAX_SIGN_INS_AT_ONCE = 4       # identities' sign-ins checked at once (each asks a node)
CHAOS_SHOWN_S = 600.0           # a scenario's timeline stays this long after its last report
MAX_CHAOS_BYTES = 256 * 1024    # the most a scenario's report may weigh
SILENT_AFTER_S = 5.0            # a run reports every second: silent this long, it is said
VERIFY_EVERY_S = 5.0           # a viewer's roles are read again this often while it watches
UPDATE_EVERY_S = 1.0            # the stream's tick: a snapshot a second at most, unless...
POKE_FLOOR_S = 0.25             # ... a fault changed: one at once, then at most one each 0.25 s
KEEPALIVE_S = 15.0
STREAM_MAX_S = 3600.0           # a stream ends after this; the page reconnects
LAG_EVERY_S = 5.0
LAG_WINDOW_S = 60.0             # p50/p99 over roughly the last minute
LAG_KIND = "manifest_put"        # the heatmap's lag: an image's manifest arriving (its blobs first)
HELD_KIB = 64                   # a link's queue shown from this size up
RATE_WINDOW_S = 3.0             # a link's bytes/s: the increase over about this long
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
                 ".json": "application/json"}
_STATIC_NAME = re.compile(r"[a-z][a-z0-9_-]*\.(js|css|json)")
_LAG_LINE = re.compile(r'^georeg_replication_lag_seconds_bucket\{([^}]*)\}\s+(\S+)')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(slots=True)
class Session:
    role: str
    expires: float
    identity: str | None = None     # a viewer's identity, whose roles are read again
    verified: float = 0.0           # when they were last read
    streams: int = 0                # its open event streams


class Sessions:
    """Signed-in browsers (token → ``Session``), unused one-time login tokens, and
    the open event streams. Each role has its own bound (``MAX_SESSIONS``): the
    owner's sessions make room by forgetting the owner's oldest, a viewer's
    sign-in is refused (429) when the viewers' table is full, so no number of
    viewer sign-ins signs the owner out."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._login_tokens: dict[str, float] = {}
        self._streams: dict[str, int] = {}       # who (a session, or the owner credential)

    def open(self, role: str, identity: str | None = None) -> dict:
        now = self.now()
        for token in [t for t, s in self._sessions.items() if s.expires < now]:
            del self._sessions[token]
        held = [t for t, s in self._sessions.items() if s.role == role]
        if len(held) >= MAX_SESSIONS[role]:
            if role != OWNER:
                raise TooManyRequests(
                    f"{len(held)} viewer sessions are open, the most this dashboard keeps: "
                    f"sign out elsewhere or wait until one expires (after {SESSION_TTL_S // 3600} h)")
            del self._sessions[held[0]]                # the owner's own oldest session
        token = secrets.token_urlsafe(32)
        self._sessions[token] = Session(role, now + SESSION_TTL_S, identity, now)
        return {"session": token, "role": role, "expiresInS": SESSION_TTL_S}

    def get(self, authorization: str) -> Session | None:
        """The live session an ``Authorization: Bearer`` header presents, if any."""
        token = authorization.removeprefix("Bearer ").strip()
        held = self._sessions.get(token) if token else None
        if held is None:
            return None
        if held.expires < self.now():
            del self._sessions[token]
            return None
        return held

    def role_of(self, authorization: str) -> str | None:
        held = self.get(authorization)
        return None if held is None else held.role

    def close(self, authorization: str) -> None:
        self._sessions.pop(authorization.removeprefix("Bearer ").strip(), None)

    @contextlib.contextmanager
    def stream(self, who: str):
        """One more open event stream for ``who``: 429 beyond ``MAX_STREAMS_EACH``
        for one signed-in browser or ``MAX_STREAMS`` in all."""
        if sum(self._streams.values()) >= MAX_STREAMS:
            raise TooManyRequests(f"{MAX_STREAMS} dashboard streams are open, the most this "
                                  "server keeps; close a page or try again later")
        if self._streams.get(who, 0) >= MAX_STREAMS_EACH:
            raise TooManyRequests(f"this sign-in has {MAX_STREAMS_EACH} dashboard pages "
                                  "streaming already; close one")
        self._streams[who] = self._streams.get(who, 0) + 1
        try:
            yield
        finally:
            self._streams[who] -= 1
            if not self._streams[who]:
                del self._streams[who]

    def mint_login_token(self) -> str:
        now = self.now()
        self._login_tokens = {t: at for t, at in self._login_tokens.items() if at > now}
        if len(self._login_tokens) >= MAX_SESSIONS[OWNER]:
            raise TooManyRequests(f"too many unused login tokens; use one or wait "
                                  f"{LOGIN_TOKEN_TTL_S} s")
        token = secrets.token_urlsafe(32)
        self._login_tokens[token] = now + LOGIN_TOKEN_TTL_S
        return token

    def redeem(self, token: str) -> bool:
        """True once for a live login token; never again."""
        expires = self._login_tokens.pop(token, None)
        return expires is not None and expires > self.now()


def may_watch(roles: list[str]) -> bool:
    """An identity holding one of ``roles`` on the whole registry may watch the
    dashboard: a role that pulls every repository (the image search shows them all)."""
    return any(reads_whole_registry(role) for role in roles)


def dashboard_url(management: str) -> str:
    """The page's address on a management server at ``management``."""
    return f"{management}{PREFIX}/"


# -- the snapshot ------------------------------------------------------------------------


def link_states(cluster: Cluster) -> list[dict]:
    """The WAN links between each two regions ``a`` < ``b``, both directions and
    every node pair together: ``cut`` if any is cut, ``degraded`` if any carries
    another fault, else ``ok``; the modelled one-way latency with what faults
    add, and the narrowest bandwidth (0: unlimited); bytes carried each way
    (``bytes``: [a → b, b → a], since the links started) and the KiB read and not
    delivered yet, when that is at least ``HELD_KIB`` (a stall, a slow link: the
    odd heartbeat in flight is not news, and would change every snapshot)."""
    region_of = {name: node.plan.region for name, node in cluster.supervisor.nodes.items()}
    pairs: dict[tuple[str, str], dict] = {}
    for (source, target), link in cluster.supervisor.links.items():
        a, b = region_of.get(source), region_of.get(target)
        if a is None or b is None or a == b:
            continue
        key = tuple(sorted((a, b)))
        f = link.faults
        state = "cut" if (f.cut_forward or f.cut_backward) else "degraded" if f.any else "ok"
        widths = [w for w in (link.model.bandwidth_mbps, f.bandwidth_mbps) if w]
        entry = pairs.setdefault(key, {"a": key[0], "b": key[1], "state": "ok",
                                       "latency_ms": 0.0, "bandwidth_mbps": 0.0,
                                       "bytes": [0, 0], "queued_kib": 0})
        order = ("ok", "degraded", "cut")
        entry["state"] = max(entry["state"], state, key=order.index)
        entry["latency_ms"] = max(entry["latency_ms"], link.model.latency_ms + f.extra_latency_ms)
        if widths:
            narrowest = min(widths)
            entry["bandwidth_mbps"] = min(entry["bandwidth_mbps"] or narrowest, narrowest)
        outward = link.bytes_forwarded - link.bytes_back      # from source to target
        first = 0 if a == key[0] else 1                       # entry["bytes"][first]: a → b
        entry["bytes"][first] += outward
        entry["bytes"][1 - first] += link.bytes_back
        entry["queued_kib"] += link.stats()["queued_bytes"] // 1024
    for entry in pairs.values():
        if entry["queued_kib"] < HELD_KIB:
            entry["queued_kib"] = 0
    return list(pairs.values())


class LinkRates:
    """Bytes per second each way on each link, from the cumulative counts of
    ``link_states`` as sampled (one sample per snapshot): the increase over the
    samples of the last ``window_s``. A shown rate changes only when the
    measured one moves by more than ``STEADY`` of it or ``STEADY_BPS``,
    whichever is more, so the small periodic exchanges of an idle cluster
    (heartbeats, anti-entropy rounds) read the same number frame after frame
    and an idle snapshot stands still (the stream then sends nothing); a
    transfer shows within a second or two. None: not two samples
    yet, or the counts went down (the link was made again)."""

    STEADY = 0.2
    STEADY_BPS = 1000.0

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: list[tuple[float, dict[tuple[str, str], list[int]]]] = []
        self._shown: dict[tuple[str, str, int], float] = {}

    def add(self, at: float, links: list[dict]) -> None:
        """Set each link's ``bytes_per_s`` ([a → b, b → a]) from this sample."""
        now = {(link["a"], link["b"]): list(link["bytes"]) for link in links}
        self._samples.append((at, now))
        while len(self._samples) > 1 and self._samples[1][0] <= at - self.window_s:
            self._samples.pop(0)
        if self._samples[0][0] < at - 2 * self.window_s:     # a gap: the old one tells nothing
            self._samples = self._samples[-1:]
        then, before = self._samples[0]
        for link in links:
            key = (link["a"], link["b"])
            rates: list[float | None] = [None, None]
            for way in (0, 1):
                was = before.get(key)
                if at - then < 0.5 or was is None or now[key][way] < was[way]:
                    self._shown.pop((*key, way), None)
                    continue
                rate = (now[key][way] - was[way]) / (at - then)
                shown = self._shown.get((*key, way))
                if shown is None or abs(rate - shown) > max(self.STEADY * shown, self.STEADY_BPS):
                    shown = self._shown[(*key, way)] = float(f"{rate:.2g}")
                rates[way] = shown
            link["bytes_per_s"] = rates
            del link["bytes"]          # counts since start would change every frame


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's estimate of quantile ``q`` from cumulative ``(le, count)``
    buckets (sorted, +Inf last): linear within the bucket it falls in."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def parse_lag(text: str, kind: str = LAG_KIND) -> dict[tuple[str, str], dict[float, float]]:
    """``georeg_replication_lag_seconds`` buckets of one node's ``/metrics`` for
    changes of ``kind`` (one count per image, not one per blob, manifest and
    tag): (origin, destination) → {le: cumulative count}."""
    out: dict[tuple[str, str], dict[float, float]] = {}
    for line in text.splitlines():
        match = _LAG_LINE.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match[1]))
        if labels.get("kind") != kind:
            continue
        key = (labels.get("origin_region", ""), labels.get("destination_region", ""))
        le = float(labels.get("le", "inf").replace("+Inf", "inf"))
        buckets = out.setdefault(key, {})
        buckets[le] = buckets.get(le, 0.0) + float(match[2])
    return out


Buckets = dict[tuple[str, str], dict[float, float]]   # (origin, destination) → {le: count}


class LagWindow:
    """Lag percentiles over a sliding window, from each node's cumulative
    buckets as scraped. Per node, what a scrape adds is its buckets minus the
    ones last seen from that node, or all of them when any bucket went down
    (the node restarted and its counters began again, as Prometheus's
    ``increase`` reads a reset); a node missing from a scrape adds nothing.
    The window sums the additions of the scrapes inside it. A node's first
    scrape adds its totals since it started: while that scrape is in the
    window the cell says so (``over: "start"``)."""

    def __init__(self, window_s: float = LAG_WINDOW_S) -> None:
        self.window_s = window_s
        self._last: dict[str, Buckets] = {}                     # node → as last scraped
        self._added: list[tuple[float, Buckets, set]] = []      # (at, added, keys from start)

    def add(self, at: float, nodes: dict[str, Buckets]) -> dict:
        added: Buckets = {}
        from_start: set[tuple[str, str]] = set()
        for node, now in nodes.items():
            seen = self._last.get(node)
            for key, buckets in now.items():
                before = (seen or {}).get(key, {})
                reset = any(count < before.get(le, 0.0) for le, count in buckets.items())
                if seen is None:
                    from_start.add(key)
                mine = added.setdefault(key, {})
                for le, count in buckets.items():
                    mine[le] = mine.get(le, 0.0) + count - (0.0 if reset else before.get(le, 0.0))
            self._last[node] = now
        self._added.append((at, added, from_start))
        while len(self._added) > 1 and self._added[0][0] <= at - self.window_s:
            self._added.pop(0)
        window: Buckets = {}
        since_start: set[tuple[str, str]] = set()
        for _, step, started in self._added:
            since_start |= started
            for key, buckets in step.items():
                mine = window.setdefault(key, {})
                for le, count in buckets.items():
                    mine[le] = mine.get(le, 0.0) + count
        heat: dict[str, dict[str, dict]] = {}
        for (origin, destination), buckets in window.items():
            cumulative = sorted(buckets.items())
            p50 = histogram_quantile(0.5, cumulative)
            p99 = histogram_quantile(0.99, cumulative)
            heat.setdefault(origin, {})[destination] = {
                "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "count": int(cumulative[-1][1]) if cumulative else 0,
                "over": "start" if (origin, destination) in since_start else "window"}
        return heat


class Dashboard:
    """The dashboard's routes, sessions and snapshots, for one management server."""

    def __init__(self, cluster: Cluster, *, faults: dict[str, Callable[[web.Request],
                                                                       Awaitable[web.Response]]]):
        self.cluster = cluster
        self.sessions = Sessions()
        self.verify_every_s = VERIFY_EVERY_S
        self.update_every_s = UPDATE_EVERY_S
        self._faults = faults           # the management API's own fault handlers
        self._lag = LagWindow()
        self._rates = LinkRates()
        self._chaos: tuple[float, dict] | None = None   # (when reported, the run's timeline)
        self._signing_in = 0             # identities' sign-ins being checked now (``_roles_of``)
        self._lag_heat: dict = {}
        self._lag_at = -math.inf
        self._lag_task: asyncio.Task | None = None
        self._snapshot: tuple[float, bytes] | None = None
        self._stale = False               # a fault changed since the snapshot (``_poke``)
        self._poke_later: asyncio.TimerHandle | None = None
        self._poke_owed = False           # ``_poke_due`` ran: the next look builds a snapshot
        self._closing = False             # every stream ends (the server is stopping)
        self._wake = asyncio.Event()      # set, then replaced: every stream looks again now

    @property
    def _owner(self) -> bytes | None:
        """The owner's ``Authorization`` header (None: a cluster without auth)."""
        secrets = self.cluster.secrets
        return (authorization(secrets.owner)["Authorization"].encode()
                if secrets is not None else None)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """The routes, on a (re)starting management server: streams may run again,
        and a fault changed from anywhere (the CLI, a scenario, a timer) wakes them."""
        self._closing = False
        if self._poke not in self.cluster.faults.watchers:
            self.cluster.faults.watchers.append(self._poke)
        router.add_get(PREFIX, self.redirect)
        router.add_get(f"{PREFIX}/", self.page)
        router.add_get(f"{PREFIX}/static/{{file}}", self.static)
        router.add_post(f"{API}session", self.sign_in)
        router.add_get(f"{API}session", self.whoami)
        router.add_delete(f"{API}session", self.sign_out)
        router.add_get(f"{API}state", self.state)
        router.add_get(f"{API}events", self.events)
        router.add_get(f"{API}images", self.image)
        router.add_post(f"{API}faults", self._change(self._faults["inject"]))
        router.add_delete(f"{API}faults", self._change(self._faults["heal_all"]))
        router.add_delete(f"{API}faults/{{id}}", self._change(self._faults["heal"]))
        router.add_post("/georeg/v1/dashboard/login-tokens", self.mint_login_token)
        router.add_put("/georeg/v1/dashboard/chaos-run", self.chaos_run)

    async def close(self) -> None:
        self._closing = True
        if self._poke_later is not None:
            self._poke_later.cancel()
        self._wake_streams()
        with contextlib.suppress(ValueError):
            self.cluster.faults.watchers.remove(self._poke)
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None

    # -- who is asking (management's access middleware calls these) ---------------------

    @staticmethod
    def is_public(request: web.Request) -> bool:
        """The page, its assets and sign-in: nothing secret, no credential needed."""
        path = request.path
        return (path in (PREFIX, f"{PREFIX}/") or path.startswith(f"{PREFIX}/static/")
                or (path == f"{API}session" and request.method == "POST"))

    def session_role(self, request: web.Request) -> str | None:
        """The role of a live session ``request`` presents on the dashboard's own API
        (None elsewhere: no other route takes a session). Management's access
        middleware asks this once the owner credential was not sent."""
        if not request.path.startswith(API):
            return None
        role = self.sessions.role_of(request.headers.get("Authorization", ""))
        if role is not None:
            request[BY_SESSION] = True
        return role

    async def still_allowed(self, request: web.Request) -> bool:
        """Whether what let ``request`` in still holds: the owner credential, or a
        session not signed out nor expired (a dictionary look-up) whose viewer
        still exists and holds a role that may watch (read again from the nodes
        every ``verify_every_s``; kept while they cannot be asked). A session
        that no longer holds is closed."""
        header = request.headers.get("Authorization", "")
        session = self.sessions.get(header)
        if session is None:                # the owner credential holds; a session ended
            return request.get(ROLE) == OWNER and not request.get(BY_SESSION, False)
        now = self.sessions.now()
        if (session.identity is None
                or now - session.verified < self.verify_every_s):
            return True
        try:
            roles = await self.cluster.access.registry_roles_now(session.identity)
        except ClusterError:             # the nodes cannot say now: ask again next time
            return True
        if not may_watch(roles):
            self.sessions.close(header)
            return False
        session.verified = now
        return True

    async def _require_allowed(self, request: web.Request) -> None:
        if not await self.still_allowed(request):
            raise Unauthorized("this dashboard session has ended (signed out, expired, or its "
                               "identity no longer holds a role that may watch): sign in again")

    def _poke(self) -> None:
        """A fault changed: every stream sends a fresh snapshot now, or, when the
        last one is younger than ``POKE_FLOOR_S``, once it is that old (a flap at
        its quickest changes ten times a second; the pages need not)."""
        self._stale = True
        age = time.monotonic() - self._snapshot[0] if self._snapshot else math.inf
        if age >= POKE_FLOOR_S:
            self._wake_streams()
        elif self._poke_later is None:
            self._poke_later = asyncio.get_running_loop().call_later(
                POKE_FLOOR_S - age, self._poke_due)

    def _poke_due(self) -> None:
        self._poke_later = None
        self._poke_owed = True      # the loop may run a timer a little early: due all the same
        self._wake_streams()

    def _wake_streams(self) -> None:
        """Every stream looks again now (a fresh snapshot if due, its session).
        A stream takes the event before it looks, so a wake while it writes or
        checks its session is not lost: the event it then waits on is already set."""
        self._wake.set()
        self._wake = asyncio.Event()

    @staticmethod
    def _change(handler):
        """``handler`` for the owner only (403 for a viewer). The pages see its
        effect at once: the fault controller tells its watchers (``_poke``)."""
        async def owner_only(request: web.Request) -> web.Response:
            if request.get(ROLE) != OWNER:
                raise Forbidden("this session may watch the cluster but not change it: "
                                "faults are injected and healed by the cluster owner "
                                "(sign in with the owner credential, or `georeg dashboard "
                                "--open` as the user who started the cluster)")
            return await handler(request)
        return owner_only

    # -- the page ------------------------------------------------------------------------

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{PREFIX}/")

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if not _STATIC_NAME.fullmatch(name):          # no path, no traversal
            raise web.HTTPNotFound()
        return self._file(name)

    @staticmethod
    def _file(name: str) -> web.Response:
        path = STATIC_DIR / name
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes(), content_type=_STATIC_TYPES[path.suffix],
                            charset="utf-8", headers={
                                "Cache-Control": "no-cache",
                                "X-Content-Type-Options": "nosniff",
                                "Content-Security-Policy":
                                    "default-src 'self'; base-uri 'none'; "
                                    "form-action 'none'; frame-ancestors 'none'"})

    # -- sessions --------------------------------------------------------------------------

    async def sign_in(self, request: web.Request) -> web.Response:
        role, identity = await self._signs_in(await json_object(request))
        if role is None:
            raise Unauthorized(
                "not signed in: the owner credential (kept in <data dir>/auth/owner.secret), "
                "an identity's id and secret with a role that pulls the whole registry "
                "(Owner, Contributor, Reader, AcrPush or AcrPull), or a fresh token from "
                f"`georeg dashboard` (each works once, for {LOGIN_TOKEN_TTL_S} s)")
        return web.json_response(self.sessions.open(role, identity))

    async def _signs_in(self, body: dict) -> tuple[str | None, str | None]:
        """The role (None: refused) and, for a viewer, its identity."""
        if self._owner is None:
            return OWNER, None
        credential, token = body.get("credential"), body.get("loginToken")
        identity, secret = body.get("identity"), body.get("secret")
        if isinstance(credential, str) and credential:
            sent = f"Bearer {credential.strip()}".encode(errors="replace")
            return (OWNER if hmac.compare_digest(sent, self._owner) else None), None
        if isinstance(token, str) and token:
            return (OWNER if self.sessions.redeem(token) else None), None
        if isinstance(identity, str) and isinstance(secret, str) and identity and secret:
            roles = await self._roles_of(identity, secret)
            return (VIEWER, identity) if may_watch(roles) else (None, None)
        raise ClusterError('give {"credential"}, {"identity", "secret"} or {"loginToken"}')

    async def _roles_of(self, identity: str, secret: str) -> list[str]:
        """An identity's roles on the registry, asked of a node: at most
        ``MAX_SIGN_INS_AT_ONCE`` asks at once (anyone may send identities, and an
        ask may wait seconds while a region is down). The owner credential and a
        login token ask nothing, so they are never held back by this bound."""
        if self._signing_in >= MAX_SIGN_INS_AT_ONCE:
            raise TooManyRequests(f"{MAX_SIGN_INS_AT_ONCE} identities' sign-ins are being "
                                  "checked now; try again in a moment")
        self._signing_in += 1
        try:
            return await self.cluster.access.registry_roles(identity, secret)
        finally:
            self._signing_in -= 1

    async def whoami(self, request: web.Request) -> web.Response:
        """The role of whoever asks (the page's first call: 401 shows the sign-in form)."""
        return web.json_response({"role": request[ROLE], "auth": self._owner is not None})

    async def sign_out(self, request: web.Request) -> web.Response:
        self.sessions.close(request.headers.get("Authorization", ""))
        self._wake_streams()           # its streams end now, not at the next tick
        return web.Response(status=204)

    async def mint_login_token(self, request: web.Request) -> web.Response:
        if request.get(ROLE) != OWNER:
            raise Forbidden("only the owner credential mints a login token")
        return web.json_response({"loginToken": self.sessions.mint_login_token(),
                                  "expiresInS": LOGIN_TOKEN_TTL_S}, status=201)

    # -- a running scenario ----------------------------------------------------------------

    async def chaos_run(self, request: web.Request) -> web.Response:
        """A chaos scenario's timeline as its run reports it (``cluster.faults.timeline``:
        about once a second while it runs, once when done); the owner's, as every fault
        it injects. The latest report is shown for ``CHAOS_SHOWN_S``."""
        if request.get(ROLE) != OWNER:
            raise Forbidden("only the owner credential reports a scenario's run")
        body = await bounded_body(request, MAX_CHAOS_BYTES, "a timeline")
        try:
            run = decode_timeline(body)
        except msgspec.DecodeError as exc:
            raise ClusterError(f"not a scenario's timeline: {exc}"[:300]) from None
        self._chaos = (time.monotonic(), msgspec.to_builtins(run))
        return web.Response(status=204)

    def _chaos_now(self) -> dict | None:
        """The scenario last reported, if recent, with the faults its steps injected:
        when each came and went (seconds into the run, from the fault controller: a
        fault that healed itself after its duration too) and whether it is in effect;
        ``silent_s``: how long a run not done has said nothing (None: it reports)."""
        if self._chaos is None or time.monotonic() - self._chaos[0] > CHAOS_SHOWN_S:
            return None
        reported, run = self._chaos
        faults = self.cluster.faults.faults
        shown = []
        for step in run["steps"]:
            fault = faults.get(step["fault"] or "")
            if fault is None:
                continue
            shown.append({"id": fault.id, "description": fault.description,
                          "from_s": round(fault.started_at - run["started_at"], 2),
                          "to_s": None if fault.healed_at is None
                          else round(fault.healed_at - run["started_at"], 2),
                          "in_effect": fault.in_effect})
        # A run that died (killed, or failing before it could say it was done) stops
        # reporting: how long ago it last did, in SILENT_AFTER_S steps so that the
        # snapshot of a quiet page changes that seldom.
        quiet = time.monotonic() - reported
        silent = (int(quiet // SILENT_AFTER_S * SILENT_AFTER_S)
                  if run["phase"] != "done" and quiet >= SILENT_AFTER_S else None)
        return {**run, "faults": shown, "silent_s": silent}

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> dict:
        cluster = self.cluster
        status = cluster.status()
        now = time.time()
        replicas = {r["name"]: r for r in status["replicas"]}
        regions = []
        for name, replica in replicas.items():
            where = REGIONS[name]
            nodes = [{k: n[k] for k in ("name", "zone", "health", "healthy", "reason", "routing",
                                        "writable", "images")}
                     | {"behind": n["replication"]["behind_events"],
                        "peers": f"{n['replication']['peers_connected']}/"
                                 f"{n['replication']['peers']}"}
                     for n in status["nodes"] if n["region"] == name]
            copies = [{k: c[k] for k in ("name", "region", "health", "healthy", "images")}
                      for c in status["paired_copies"] if c["keeps"] == name]
            regions.append({
                "name": name, "display": where.display, "lat": where.latitude,
                "lon": where.longitude, "pair": where.pair, "home": replica.get("home", False),
                "status": replica.get("status"),
                # What a replica none of whose nodes is up holds is not known (not 0).
                "sync": replica.get("sync") if any(n["healthy"] for n in nodes) else None,
                "routing": any(n["routing"] for n in nodes),
                "nodes": nodes, "copies": copies,
                "refused": status["throttling"].get(name, {}).get("refused", {})})
        for copy in status["paired_copies"]:     # where a paired copy lives, for the map
            where = REGIONS.get(copy["region"])
            if where is not None:
                copy.update(lat=where.latitude, lon=where.longitude)
        faults = [{"id": f.id, "kind": f.kind, "description": f.description,
                   "remaining_s": (None if not f.duration_s
                                   else max(0.0, round(f.started_at + f.duration_s - now, 1))),
                   "nodes": f.nodes}
                  for f in cluster.faults.faults.values() if f.active]
        links = link_states(cluster)
        self._rates.add(time.monotonic(), links)
        return {"registry": status["registry"], "tier": status["tier"],
                "home_region": status["home_region"],
                "regions": regions, "links": links, "faults": faults, "chaos": self._chaos_now(),
                "paired_copies": [{k: c.get(k) for k in ("name", "keeps", "region", "healthy",
                                                         "lat", "lon")}
                                  for c in status["paired_copies"]],
                "endpoints": status["endpoint_traffic"], "lag": self._lag_heat}

    def _encoded(self) -> bytes:
        """The current snapshot as JSON, shared by all viewers: computed once a
        second at most (``update_every_s``), or ``POKE_FLOOR_S`` after the last one
        when a fault changed. Strict JSON: a NaN or an infinity is never sent (the
        page could not parse it); the last good snapshot stays instead."""
        now = time.monotonic()
        age = now - self._snapshot[0] if self._snapshot else math.inf
        if age >= self.update_every_s or (self._stale and (age >= POKE_FLOOR_S or self._poke_owed)):
            self._stale = self._poke_owed = False
            try:
                encoded = json.dumps(self.snapshot(), allow_nan=False).encode()
            except ValueError as exc:
                log.warning("dashboard_snapshot_not_json", error=str(exc))
                encoded = self._snapshot[1] if self._snapshot else b"{}"
            self._snapshot = (now, encoded)
            if now - self._lag_at >= LAG_EVERY_S and (self._lag_task is None
                                                      or self._lag_task.done()):
                self._lag_at = now
                self._lag_task = asyncio.create_task(self._scrape_lag())
        return self._snapshot[1]

    async def state(self, request: web.Request) -> web.Response:
        await self._require_allowed(request)
        return web.Response(body=self._encoded(), content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The snapshots as ``text/event-stream``: one ``data:`` frame when the
        snapshot changed, at most one a second; a comment line every
        ``KEEPALIVE_S`` so proxies keep the stream; it ends after ``STREAM_MAX_S``, or
        as soon as what let it open no longer holds (``still_allowed``, asked before
        every frame). Bounded per signed-in browser and in all (``Sessions.stream``)."""
        await self._require_allowed(request)
        who = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        with self.sessions.stream(who):
            return await self._stream(request)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        sent, last_write = b"", time.monotonic()
        started = last_write
        while time.monotonic() - started < STREAM_MAX_S and not self._closing:
            wake = self._wake       # before looking: a wake from here on is seen
            if not await self.still_allowed(request):
                break
            body = self._encoded()
            try:
                if body != sent:
                    await response.write(b"data: " + body + b"\n\n")
                    sent, last_write = body, time.monotonic()
                elif time.monotonic() - last_write >= KEEPALIVE_S:
                    await response.write(b": keepalive\n\n")
                    last_write = time.monotonic()
            except ConnectionResetError:      # the page went away
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), self.update_every_s)
        return response

    async def _scrape_lag(self) -> None:
        """Every serving node's lag histogram (``/metrics``), summed per region
        pair, into the sliding window the heatmap shows."""
        nodes = [n for n in self.cluster.supervisor.nodes.values()
                 if not n.plan.copy_of and n.healthy]

        async def one(node) -> str:
            try:
                async with self.cluster.http().get(
                        f"{self.cluster.management_link_url(node.name)}/metrics",
                        timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return await r.text() if r.status == 200 else ""
            except (TimeoutError, aiohttp.ClientError):
                return ""
        texts = await asyncio.gather(*(one(n) for n in nodes))
        self._lag_heat = self._lag.add(time.monotonic(), {
            node.name: parse_lag(text) for node, text in zip(nodes, texts, strict=True) if text})

    # -- an image's journey ----------------------------------------------------------------

    async def image(self, request: web.Request) -> web.Response:
        """The per-image status (``replicator.status``) from a serving node of the home
        region, or of any region when the home one is down. The management server asks
        with the cluster's internal credential: a viewer gets an answer only while it
        holds a role that pulls every repository (``still_allowed``)."""
        await self._require_allowed(request)
        repository = request.query.get("repository", "")
        reference = request.query.get("reference", "")
        if not repository or not reference:
            raise ClusterError("give repository and reference (a tag or a digest)")
        nodes = sorted((n for n in self.cluster.supervisor.nodes.values()
                        if not n.plan.copy_of and n.healthy),
                       key=lambda n: n.plan.region != self.cluster.spec.home_region)
        for node in nodes[:3]:
            try:
                async with self.cluster.http().get(
                        f"{self.cluster.management_link_url(node.name)}"
                        "/georeg/v1/replication/status",
                        params={"repository": repository, "reference": reference},
                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                    return web.json_response(await r.json(content_type=None), status=r.status)
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
                continue
        raise ClusterError("no serving node answered; is every region down?")
