"""Chaos scenarios: a workload, timed faults, assertions — and a report a person
can act on.

A scenario is a TOML file::

    name = "home-region-crash"
    description = "East US (home) crashes under a steady push load"
    seed = 7
    duration_s = 60                      # how long the workload runs

    [workload]
    push_rate = 2.0                      # pushes per second, all clients together
    pull_rate = 4.0                      # pulls of already acknowledged images per second
    clients = ["eastus", "westeurope"]   # client locations (their global endpoints)
    layers = 2
    layer_size = 65536                   # bytes (or [min, max])
    repositories = 4

    [[steps]]
    at_s = 10                            # or [min, max]: drawn with the seed
    fault = "region-outage"              # any kind of cluster.faults.controller, with its arguments
    region = "eastus"                    # or a list: one drawn with the seed
    mode = "crash"
    duration_s = 20                      # heals by itself after this long

    [[steps]]
    at_s = 45
    heal = "all"

    [assertions]
    max_lost_acknowledged = 0
    max_convergence_s = 60
    verify = true

On a cluster with auth (``auth = "token"``) the runner is the cluster's owner:
it calls the management API with the owner credential (``ChaosRun(owner=)``,
read from the data dir, or the ``Cluster``'s own), and, since faults are
injected through that API, the management plane carries the internal
credential to nodes itself. Its clients push and pull with the admin user's
credentials, which it asks the management API for (``GET
/georeg/v1/registry/credentials``), as Basic credentials on every request, as
``curl -u`` does; so do its own reads of nodes (per-image status, whether an
acknowledged tag is served). A run on a cluster whose admin user is disabled
stops before it starts, saying so.

The seed drives every random choice (schedule ranges, workload), so the same
seed gives the same fault schedule and the same pushes; a cluster the run
starts itself is seeded with it too, so its WAN links draw the same jitter and
resets. The runner talks to the cluster only through its management API and
endpoints, so it runs against a cluster started by ``georeg up`` (whose own
seed the report gives as ``cluster_seed``) or one it starts itself.

The report counts every push by what became of it: *acknowledged* (201),
*lost* (acknowledged, yet no replica serves its tag once the cluster has
converged), *refused* (it did not happen: an answer whose outcome is definite,
a 4xx, or any failure before its manifest was sent) and *indefinite* (its
manifest PUT failed in a way that may have taken effect: a 5xx whose outcome
is indefinite — stored by a replica, not confirmed by a second zone — or a
connection lost after the request was sent). An indefinite push is looked
for once the cluster has converged and reported as landed or never appeared;
neither is a loss, since neither was acknowledged. Outcomes are read from the
error body (``detail.outcome``, the contract in ``registry_node.errors``).

Client-visible errors are counted by code and client location, with their
time windows and the first message of each window; a 5xx (or a connection
error) is split by outcome, ``UNAVAILABLE (definite)`` apart from
``UNAVAILABLE (indefinite)``. The report also has failovers (a client
location's requests moving to another region), the time to converge after the
last heal, and the worst replication lag seen. A pull of an image that
residency keeps in another region (pushed through Brazil South, pulled from
East US) is counted as ``MANIFEST_UNKNOWN (confined by residency)``, apart
from misses that lag or a fault explains.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import ssl
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec

from registry_node.errors import Outcome
from replicator.residency import ResidencyPolicy

from ..control.access import AdminLogin
from ..network.links import link_seed
from .controller import KINDS, SEEDED_KINDS

SCENARIOS = Path(__file__).parent / "scenarios"    # the scenarios that ship with georeg
MAX_WORKERS = 16


class ScenarioError(ValueError):
    pass


# -- the scenario file ---------------------------------------------------------------


class Workload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    push_rate: float = 1.0
    pull_rate: float = 2.0
    clients: tuple[str, ...] = ()
    layers: int = 2
    layer_size: int | tuple[int, int] = 65536
    repositories: int = 4


class Assertions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_lost_acknowledged: int = 0
    max_convergence_s: float = 120.0
    verify: bool = True
    min_acknowledged: int = 1


class Scenario(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    description: str = ""
    seed: int = 1
    duration_s: float = 60.0
    workload: Workload = Workload()
    steps: tuple[dict, ...] = ()
    assertions: Assertions = Assertions()


@dataclass
class Step:
    at_s: float
    action: str                       # "fault" | "heal"
    kind: str = ""
    arguments: dict = field(default_factory=dict)
    heal: str = ""

    def describe(self) -> str:
        if self.action == "heal":
            return f"t+{self.at_s:.1f}s heal {self.heal}"
        args = ", ".join(f"{k}={v}" for k, v in self.arguments.items())
        return f"t+{self.at_s:.1f}s {self.kind}({args})"


def load(path: Path) -> Scenario:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


def schedule(scenario: Scenario, rng: random.Random, scale: float = 1.0) -> list[Step]:
    """Resolve ranges and choices with the seed; times are scaled by ``scale``."""
    steps = []
    for i, raw in enumerate(scenario.steps):
        raw = dict(raw)
        at = raw.pop("at_s", None)
        if at is None:
            raise ScenarioError(f"steps[{i}] needs at_s")
        at_s = rng.uniform(*at) if isinstance(at, list) else float(at)
        resolved = {k: rng.choice(v) if isinstance(v, list) else v for k, v in raw.items()}
        if "heal" in resolved:
            steps.append(Step(at_s * scale, "heal", heal=str(resolved["heal"])))
            continue
        kind = resolved.pop("fault", None)
        if kind not in KINDS:
            raise ScenarioError(f"steps[{i}]: fault must be one of {', '.join(KINDS)}, not {kind!r}")
        if "duration_s" in resolved:
            resolved["duration_s"] = float(resolved["duration_s"]) * scale
        steps.append(Step(at_s * scale, "fault", kind, resolved))
    return sorted(steps, key=lambda s: s.at_s)


# -- observations ----------------------------------------------------------------------


@dataclass
class Push:
    repository: str
    tag: str
    digest: str
    client: str
    answered_at: float                # seconds since the run started (201, or the failure)
    region: str = ""                  # where it was pushed (the replica that acknowledged it)


@dataclass(frozen=True)
class ChaosImage:
    repository: str
    tag: str
    blobs: list[bytes]                # config first
    manifest: bytes


@dataclass
class Observations:
    started: float = field(default_factory=time.monotonic)
    pushes_attempted: int = 0
    pushes_refused: int = 0           # did not happen (definitely)
    pulls_attempted: int = 0
    acknowledged: list[Push] = field(default_factory=list)
    indefinite: list[Push] = field(default_factory=list)   # may have happened; never acknowledged
    # t, client, op, code (split by outcome where the answer had one, see ``error_label``)
    errors: list[tuple[float, str, str, str]] = field(default_factory=list)
    # (t, message) of every error that said why, up to _MAX_EXAMPLES per client and code
    examples: dict[tuple[str, str], list[tuple[float, str]]] = field(default_factory=dict)
    served_by: dict[str, list[tuple[float, str]]] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.started

    def error(self, client: str, op: str, code: str, detail: str = "",
              outcome: Outcome | None = None) -> None:
        code = error_label(code, outcome)
        now = self.now()
        self.errors.append((now, client, op, code))
        examples = self.examples.setdefault((client, code), [])
        if detail and len(examples) < _MAX_EXAMPLES:
            examples.append((now, f"t+{now:.1f}s {op}: {detail}"[:300]))

    def first_examples(self, client: str, code: str,
                       windows: list[tuple[float, float]]) -> list[str]:
        """The first message of each error window (windows without one skipped)."""
        examples = self.examples.get((client, code), [])
        out = []
        for start, end in windows:
            inside = [text for t, text in examples if start - 0.01 <= t <= end + 0.01]
            if inside:
                out.append(inside[0])
        return out

    def served(self, client: str, replica: str) -> None:
        history = self.served_by.setdefault(client, [])
        region = region_of(replica)
        if not history or history[-1][1] != region:
            history.append((self.now(), region))


def error_label(code: str, outcome: Outcome | None) -> str:
    """How an error is counted: its code, split by outcome where the answer had one."""
    return f"{code} ({outcome.value})" if outcome is not None else code


def answer_outcome(status: int, error: dict) -> Outcome | None:
    """The outcome an error answer states (``detail.outcome`` of a 5xx); a 4xx
    refused the request as sent: definite. None when a 5xx says nothing."""
    if status < 500:
        return Outcome.DEFINITE
    detail = error.get("detail")
    try:
        return Outcome(detail.get("outcome")) if isinstance(detail, dict) else None
    except ValueError:
        return None


def connection_outcome(exc: BaseException, write: bool) -> Outcome:
    """A request that never connected did not happen; one whose connection
    failed later may have, unless it was a read."""
    if isinstance(exc, aiohttp.ClientConnectorError) or not write:
        return Outcome.DEFINITE
    return Outcome.INDEFINITE


def region_of(replica: str) -> str:
    """``eastus-2`` → ``eastus``; a region without zones is its own node name."""
    return replica.rsplit("-", 1)[0] if replica[-1:].isdigit() else replica


# A pull refused because the image may not leave the region it was pushed in:
# the registry doing its job, counted apart from misses that replication lag or
# a fault explains.
RESIDENCY_MISS = "MANIFEST_UNKNOWN (confined by residency)"
INDEFINITE_LABEL = error_label("", Outcome.INDEFINITE)    # how an indefinite error's label ends
_MAX_EXAMPLES = 10_000
CONVERGE_CONCURRENCY = 32       # image statuses asked at once while waiting for convergence


def _windows(times: list[float], gap: float = 2.0) -> list[tuple[float, float]]:
    """Group error times into windows (errors closer than ``gap`` s apart)."""
    windows: list[list[float]] = []
    for t in sorted(times):
        if windows and t - windows[-1][1] <= gap:
            windows[-1][1] = t
        else:
            windows.append([t, t])
    return [(round(a, 2), round(b, 2)) for a, b in windows]


# -- the workload ------------------------------------------------------------------------


class ChaosWorkload:
    """Pushes and pulls at the scenario's rates through the clients' global endpoints."""

    def __init__(self, scenario: Scenario, endpoints: dict[str, str], rng: random.Random,
                 obs: Observations, residency: ResidencyPolicy | None = None,
                 credentials: dict[str, str] | None = None) -> None:
        self.scenario = scenario
        self.credentials = credentials or {}    # a registry client's (Authorization)
        self.residency = residency or ResidencyPolicy()
        self.workload = scenario.workload
        self.clients = list(self.workload.clients or endpoints)
        missing = [c for c in self.clients if c not in endpoints]
        if missing:
            raise ScenarioError(f"no global endpoint for client locations {missing}; "
                                f"the cluster has {sorted(endpoints)}")
        self.endpoints = endpoints
        self.rng = rng
        self.obs = obs
        self._counter = 0

    def _layer(self) -> bytes:
        size = self.workload.layer_size
        n = self.rng.randint(*size) if isinstance(size, (list, tuple)) else size
        return self.rng.randbytes(n)

    async def run(self, session: aiohttp.ClientSession, until: float) -> None:
        tasks: set[asyncio.Task] = set()
        next_push = next_pull = 0.0
        loop_start = self.obs.now()
        while self.obs.now() < until:
            now = self.obs.now() - loop_start
            if self.workload.push_rate and now >= next_push:
                next_push += self.rng.expovariate(self.workload.push_rate)
                if len(tasks) < MAX_WORKERS:
                    tasks.add(asyncio.create_task(self._push(session)))
            if self.workload.pull_rate and now >= next_pull and self.obs.acknowledged:
                next_pull += self.rng.expovariate(self.workload.pull_rate)
                if len(tasks) < MAX_WORKERS:
                    tasks.add(asyncio.create_task(self._pull(session)))
            elif self.workload.pull_rate and not self.obs.acknowledged:
                next_pull = now
            done = {t for t in tasks if t.done()}
            tasks -= done
            await asyncio.sleep(min(0.01, max(0.0, min(next_push, next_pull) - now)) or 0.001)
        if tasks:
            await asyncio.wait(tasks, timeout=30)

    async def _push(self, session: aiohttp.ClientSession) -> None:
        self._counter += 1
        client = self.rng.choice(self.clients)
        await self.push(session, client, self.image())

    def image(self) -> ChaosImage:
        """The next image to push, drawn with the seed."""
        repo = f"chaos/{self.scenario.name}/r{self.rng.randrange(self.workload.repositories)}"
        layers = [self._layer() for _ in range(self.workload.layers)]
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": self._counter}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": "sha256:" + hashlib.sha256(x).hexdigest(), "size": len(x)}
                       for x in layers]}).encode()
        return ChaosImage(repo, f"p{self._counter}", [config, *layers], manifest)

    async def push(self, session: aiohttp.ClientSession, client: str, image: ChaosImage) -> None:
        """Push ``image`` as a client in ``client`` does, and record what became of it."""
        base = self.endpoints[client]
        repo, tag = image.repository, image.tag
        self.obs.pushes_attempted += 1
        push: Push | None = None          # once its manifest is on its way
        try:
            for blob in image.blobs:
                digest = "sha256:" + hashlib.sha256(blob).hexdigest()
                async with session.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest},
                                        data=blob, headers=self.credentials) as r:
                    await self._check(r, client, "push", 201)
            push = Push(repo, tag, "sha256:" + hashlib.sha256(image.manifest).hexdigest(), client,
                        0.0)
            async with session.put(f"{base}/v2/{repo}/manifests/{tag}", data=image.manifest,
                                   headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json",
                                            **self.credentials}) as r:
                await self._check(r, client, "push", 201)
                push.digest = r.headers["Docker-Content-Digest"]
                push.answered_at = self.obs.now()
                push.region = region_of(r.headers.get("X-Georeg-Replica", ""))
                self.obs.acknowledged.append(push)
                return
        except _Refused as refused:
            outcome = refused.outcome
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            outcome = connection_outcome(exc, write=True)
            self.obs.error(client, "push", f"connection:{type(exc).__name__}", outcome=outcome)
        # A push that stopped before its manifest was sent did not happen, whatever
        # became of its blobs: no tag can name them.
        if push is not None and outcome is not Outcome.DEFINITE:
            push.answered_at = self.obs.now()
            self.obs.indefinite.append(push)
        else:
            self.obs.pushes_refused += 1

    async def _pull(self, session: aiohttp.ClientSession) -> None:
        client = self.rng.choice(self.clients)
        push = self.rng.choice(self.obs.acknowledged)
        self.obs.pulls_attempted += 1
        try:
            async with session.get(f"{self.endpoints[client]}/v2/{push.repository}/manifests/{push.tag}",
                                   headers=self.credentials) as r:
                await self._check(r, client, "pull", 200, push)
        except _Refused:
            pass
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            self.obs.error(client, "pull", f"connection:{type(exc).__name__}",
                           outcome=connection_outcome(exc, write=False))

    async def _check(self, r: aiohttp.ClientResponse, client: str, op: str, want: int,
                     pulled: Push | None = None) -> None:
        replica = r.headers.get("X-Georeg-Replica")
        if replica:
            self.obs.served(client, replica)
        if r.status == want:
            await r.read()
            return
        code, detail, error = f"HTTP {r.status}", "", {}
        try:
            error = (await r.json())["errors"][0]
            code = error["code"]
            detail = f"{error.get('message', '')}: {_reason(error.get('detail'))}".strip(": ")
        except (ValueError, KeyError, IndexError, TypeError, aiohttp.ContentTypeError):
            pass
        outcome = answer_outcome(r.status, error if isinstance(error, dict) else {})
        detail += f" [via {replica or '?'}]"
        if (code == "MANIFEST_UNKNOWN" and pulled is not None and pulled.region and replica
                and not self.residency.allows(pulled.region, pulled.repository,
                                              region_of(replica))):
            code = RESIDENCY_MISS
            detail += f" (pushed in {pulled.region}, which keeps it)"
        # A 4xx is counted by its code alone: the code says what was refused.
        self.obs.error(client, op, code, detail, outcome if r.status >= 500 else None)
        raise _Refused(outcome)


def _reason(detail: object) -> str:
    """What an error's detail says to a person: its reason, else the rest of it."""
    if isinstance(detail, dict):
        if "reason" in detail:
            return str(detail["reason"])
        rest = {k: v for k, v in detail.items() if k != "outcome"}
        return json.dumps(rest) if rest else ""
    return "" if detail is None else str(detail)


class _Refused(Exception):
    def __init__(self, outcome: Outcome | None) -> None:
        super().__init__(outcome)
        # None: a 5xx that did not say; for a write, the safe reading is that it may have happened.
        self.outcome = outcome if outcome is not None else Outcome.INDEFINITE


# -- the run -----------------------------------------------------------------------------


def run_seed(scenario: Scenario, override: int | None = None) -> int:
    """The seed of a run: ``override`` (``--seed``) if given, else the scenario's."""
    return scenario.seed if override is None else override


class ChaosRun:
    def __init__(self, scenario: Scenario, management: str, *, seed: int | None = None,
                 scale: float = 1.0, owner: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.scenario = scenario
        self.tls = tls          # trusts the cluster CA: a TLS cluster's endpoints are HTTPS
        self.management = management.rstrip("/")
        # The cluster owner's credential (a cluster with auth): the management API's.
        self._owner = {"Authorization": f"Bearer {owner}"} if owner else {}
        self.credentials: dict[str, str] = {}    # the registry's admin user's, once known
        self.seed = run_seed(scenario, seed)
        self.cluster_seed: int | None = None
        self.scale = scale
        self.rng = random.Random(self.seed)
        self.steps = schedule(scenario, self.rng, scale)
        self.obs = Observations()
        self.applied: list[dict] = []

    async def _api(self, session, method: str, path: str, body: dict | None = None):
        async with session.request(method, self.management + path, json=body,
                                   headers=self._owner) as r:
            data = await r.json(content_type=None) if r.content_length != 0 else None
            if r.status >= 400:
                message = (data or {}).get("error", {}).get("message", r.reason)
                raise ScenarioError(f"{method} {path}: {message}")
            return data

    async def run(self, progress=None) -> dict:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(ssl=self.tls or True)) as session:
            status = await self._api(session, "GET", "/georeg/v1/cluster")
            self.cluster_seed = status.get("seed")
            endpoints = status["global_endpoints"]
            residency = msgspec.convert(status["residency"], ResidencyPolicy) \
                if "residency" in status else None
            if status.get("admin_username"):       # a cluster with auth
                self.credentials = await self._admin_credentials(session)
            workload = ChaosWorkload(self.scenario, endpoints, self.rng, self.obs, residency,
                                     self.credentials)
            duration = self.scenario.duration_s * self.scale
            self.obs.started = time.monotonic()
            runner = asyncio.create_task(workload.run(session, duration))
            faults = asyncio.create_task(self._faults(session))
            while not runner.done():
                if progress:
                    progress(min(self.obs.now(), duration), duration)
                await asyncio.sleep(0.25)
            await runner
            await faults
            await self._api(session, "DELETE", "/georeg/v1/faults")
            last_heal = self.obs.now()
            converged_after = await self._converge(session)
            lost = await self._lost(session)
            landed = await self._landed(session)
            verify = await self._verify(session) if self.scenario.assertions.verify else None
            max_lag = await self._max_lag(session, status)
        return self._report(last_heal, converged_after, lost, verify, max_lag, landed)

    async def _admin_credentials(self, session) -> dict[str, str]:
        """The admin user's Basic credentials, as the management API shows them."""
        try:
            shown = await self._api(session, "GET", "/georeg/v1/registry/credentials")
        except ScenarioError as exc:
            raise ScenarioError(f"the scenario's clients log in as the admin user: {exc}") from None
        login = AdminLogin.from_shown(shown)
        if login is None:
            raise ScenarioError("the scenario's clients log in as the admin user, and no admin "
                                "password works; enable it with `georeg registry update "
                                "--admin-enabled true`")
        return login.headers()

    async def _faults(self, session) -> None:
        for index, step in enumerate(self.steps):
            delay = step.at_s - self.obs.now()
            if delay > 0:
                await asyncio.sleep(delay)
            entry = {"at_s": round(self.obs.now(), 2), "step": step.describe()}
            try:
                if step.action == "heal":
                    path = "/georeg/v1/faults" if step.heal == "all" else f"/georeg/v1/faults/{step.heal}"
                    await self._api(session, "DELETE", path)
                else:
                    body = {"kind": step.kind, **step.arguments}
                    if step.kind in SEEDED_KINDS:   # their draws replay with the run's seed
                        body.setdefault("seed", link_seed(self.seed, step.kind, str(index)))
                    fault = await self._api(session, "POST", "/georeg/v1/faults", body)
                    entry["fault"] = fault["id"]
                    entry["description"] = fault["description"]
            except ScenarioError as exc:
                entry["error"] = str(exc)
            self.applied.append(entry)

    async def _converge(self, session, limit_s: float | None = None) -> float | None:
        """Seconds from the last heal until every acknowledged image is everywhere
        residency allows (None if that did not happen within the limit)."""
        limit = limit_s or max(self.scenario.assertions.max_convergence_s * 2, 30)
        started = time.monotonic()
        status = await self._api(session, "GET", "/georeg/v1/cluster")
        node = next((n["http"] for n in status["nodes"] if n["healthy"]), None)
        pending = {(p.repository, p.tag) for p in self.obs.acknowledged}
        # Each status asks every replica, across the modelled WAN (a few hundred
        # ms): asked one image at a time, a pass over ~100 images took longer
        # than the convergence it was measuring.
        slots = asyncio.Semaphore(CONVERGE_CONCURRENCY)

        async def complete(repo: str, tag: str) -> bool:
            async with slots, session.get(f"{node}/georeg/v1/replication/status",
                                          params={"repository": repo, "reference": tag},
                                          headers=self.credentials) as r:
                return r.status == 200 and (await r.json())["complete"]

        while time.monotonic() - started < limit and node is not None:
            asked = list(pending)
            for image, done in zip(asked, await asyncio.gather(*(complete(*i) for i in asked)),
                                   strict=True):
                if done:
                    pending.discard(image)
            if not pending:
                return round(time.monotonic() - started, 2)
            await asyncio.sleep(0.25)
        return None

    async def _served(self, session, pushes: list[Push]) -> list[bool]:
        """Whether any replica serves each push's tag with its digest."""
        status = await self._api(session, "GET", "/georeg/v1/cluster")
        nodes = [n["http"] for n in status["nodes"] if n["healthy"]]
        found = []
        for push in pushes:
            for node in nodes:
                async with session.head(f"{node}/v2/{push.repository}/manifests/{push.tag}",
                                        headers=self.credentials) as r:
                    if r.status == 200 and r.headers.get("Docker-Content-Digest") == push.digest:
                        found.append(True)
                        break
            else:
                found.append(False)
        return found

    async def _lost(self, session) -> list[dict]:
        """Acknowledged pushes no replica serves (after convergence)."""
        pushes = self.obs.acknowledged
        return [{"repository": push.repository, "tag": push.tag, "digest": push.digest,
                 "client": push.client, "acked_at_s": round(push.answered_at, 2)}
                for push, served in zip(pushes, await self._served(session, pushes), strict=True)
                if not served]

    async def _landed(self, session) -> list[bool]:
        """For each indefinite push, whether it took effect after all (after
        convergence: what landed anywhere has had time to be served)."""
        return await self._served(session, self.obs.indefinite)

    async def _verify(self, session) -> dict | None:
        try:
            return await self._api(session, "GET", "/georeg/v1/verify")
        except ScenarioError as exc:
            return {"clean": False, "error": str(exc)}

    async def _max_lag(self, session, status: dict, sample: int = 60) -> float | None:
        """The worst lag (ms) any replica recorded for the acknowledged images
        (a seeded sample of them, read from per-image status)."""
        node = next((n["http"] for n in status["nodes"] if n["healthy"]), None)
        pushes = list(self.obs.acknowledged)
        if node is None or not pushes:
            return None
        chosen = random.Random(self.seed).sample(pushes, min(sample, len(pushes)))
        worst = None
        for push in chosen:
            async with session.get(f"{node}/georeg/v1/replication/status",
                                   params={"repository": push.repository, "reference": push.tag},
                                   headers=self.credentials) as r:
                if r.status != 200:
                    continue
                for replica in (await r.json())["replicas"]:
                    if replica.get("lag_ms") is not None:
                        worst = max(worst or 0.0, replica["lag_ms"])
        return worst

    def _report(self, last_heal: float, converged_after: float | None, lost: list[dict],
                verify: dict | None, max_lag: float | None, landed: list[bool]) -> dict:
        obs = self.obs
        errors: dict[str, dict[str, int]] = {}
        windows: dict[str, dict[str, list]] = {}
        for _t, client, _op, code in obs.errors:
            errors.setdefault(client, {}).setdefault(code, 0)
            errors[client][code] += 1
        for client in errors:
            for code in errors[client]:
                times = [t for t, c, _, k in obs.errors if c == client and k == code]
                windows.setdefault(client, {})[code] = _windows(times)
        failovers = {client: [{"at_s": round(t, 2), "to": region} for t, region in history[1:]]
                     for client, history in obs.served_by.items()}
        a = self.scenario.assertions
        checks = {
            "lost_acknowledged": len(lost) <= a.max_lost_acknowledged,
            "converged": converged_after is not None and converged_after <= a.max_convergence_s,
            "acknowledged_enough": len(obs.acknowledged) >= a.min_acknowledged,
        }
        if a.verify:
            checks["verify_clean"] = bool(verify and verify.get("ok"))
        return {
            "scenario": self.scenario.name,
            "description": self.scenario.description,
            "seed": self.seed,
            "cluster_seed": self.cluster_seed,
            "scale": self.scale,
            "schedule": [s.describe() for s in self.steps],
            "applied": self.applied,
            "pushes": {"attempted": obs.pushes_attempted, "acknowledged": len(obs.acknowledged),
                       "lost": len(lost), "refused": obs.pushes_refused,
                       "indefinite": len(obs.indefinite),
                       "indefinite_landed": sum(landed),
                       "indefinite_absent": len(landed) - sum(landed)},
            "pulls": {"attempted": obs.pulls_attempted},
            "lost": lost,
            "indefinite": [{"repository": push.repository, "tag": push.tag, "digest": push.digest,
                            "client": push.client, "answered_at_s": round(push.answered_at, 2),
                            "landed": was_landed}
                           for push, was_landed in zip(obs.indefinite, landed, strict=True)],
            "errors_by_client": errors,
            "error_windows_s": windows,
            "error_examples": {f"{client} {code}": obs.first_examples(client, code, spans)
                               for client, codes in windows.items()
                               for code, spans in codes.items()},
            "failovers": failovers,
            # When each client's pushes were acknowledged (seconds into the run),
            # to set errors against: did a client see errors after it was served?
            "acknowledged_at_s": {client: sorted(round(p.answered_at, 2) for p in obs.acknowledged
                                                 if p.client == client)
                                  for client in sorted({p.client for p in obs.acknowledged})},
            "last_heal_at_s": round(last_heal, 2),
            "convergence_s": converged_after,
            "max_lag_ms": max_lag,
            "verify": verify,
            "checks": checks,
            "passed": all(checks.values()),
        }


def summary(report: dict) -> str:
    # The cluster's own seed only where it is not the run's (a cluster started apart).
    cluster_seed = report.get("cluster_seed")
    other = f"; cluster seed {cluster_seed}" if cluster_seed not in (None, report["seed"]) else ""
    lines = [f"scenario {report['scenario']} (seed {report['seed']}, scale {report['scale']:g}"
             f"{other}): {'PASSED' if report['passed'] else 'FAILED'}"]
    if report["description"]:
        lines.append(f"  {report['description']}")
    lines.append("  schedule: " + "; ".join(report["schedule"]))
    p = report["pushes"]
    unacknowledged = "".join([   # said only when there were some
        f", {p['refused']} refused (did not happen)" if p.get("refused") else "",
        f", {p['indefinite']} indefinite ({p['indefinite_landed']} landed, "
        f"{p['indefinite_absent']} never appeared)" if p.get("indefinite") else ""])
    lines.append(f"  pushes: {p['attempted']} attempted, {p['acknowledged']} acknowledged, "
                 f"{p['lost']} acknowledged then lost{unacknowledged}; "
                 f"pulls: {report['pulls']['attempted']}")
    for client, codes in report["errors_by_client"].items():
        for code, count in codes.items():
            spans = ", ".join(f"{a:g}–{b:g}s" for a, b in report["error_windows_s"][client][code])
            lines.append(f"  errors seen by clients in {client}: {count} × {code} ({spans})")
            for example in report["error_examples"].get(f"{client} {code}", []):
                lines.append(f"    first of a window: {example}")
    if p.get("indefinite") or any(code.endswith(INDEFINITE_LABEL)
                              for codes in report["errors_by_client"].values() for code in codes):
        lines.append("  indefinite: the write may have landed — a replica stored it but no second "
                     "zone confirmed it, or the connection was lost after the request was sent; "
                     "retrying is safe, pushes are idempotent by digest. An indefinite push is "
                     "not a lost one: it was never acknowledged")
    for client, moves in report["failovers"].items():
        for move in moves:
            lines.append(f"  failover: clients in {client} moved to {move['to']} at {move['at_s']:g}s")
    conv = report["convergence_s"]
    healed = (f"the last heal (t+{report['last_heal_at_s']:g}s: workload over, "
              "every fault healed)")
    lines.append(f"  converged {conv:g}s after {healed}" if conv is not None
                 else f"  did NOT converge after {healed}")
    if report["max_lag_ms"] is not None:
        lines.append(f"  worst replication lag of an acknowledged image: {report['max_lag_ms']:.0f} ms")
    if report["verify"] is not None:
        verdict = report["verify"]
        lines.append(f"  georeg verify: {'clean' if verdict.get('ok') else 'DIVERGENT'}"
                     + (f" ({len(verdict.get('divergences') or [])} divergences)"
                        if not verdict.get("ok") else ""))
    failed = [k for k, ok in report["checks"].items() if not ok]
    if failed:
        lines.append(f"  failed checks: {', '.join(failed)}")
    return "\n".join(lines)
