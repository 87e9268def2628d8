"""Chaos scenarios: a workload, timed faults, assertions — and a report a person
can act on.

A scenario is a TOML file::

    name = "home-region-crash"
    description = "East US (home) crashes under a steady push load"
    seed = 7
    duration_s = 60                      # how long the workload runs (at least: see below)

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
    # flap = "3/5"                       # comes and goes (cluster.faults.flap); its
    # flap_jitter = 0.2                  # flap_seed is drawn with the scenario's seed

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

The workload runs for ``duration_s``, and on past it while a fault the
schedule gave a ``duration_s`` has not healed or a node it took down is not
healthy again, then for as long as the schedule left after that heal (at
least 2 s), so the report shows clients coming back (at most
``max_convergence_s`` more): ``scale`` shortens waits, not restarts.

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

With ``retag_rate`` and ``delete_rate`` the workload also tags acknowledged
images again (``t0``..``t2`` of their repository) and deletes images never
retagged, by digest, each from a client location residency lets see the
image. A run with ``[assertions] invariants = true`` (every ``georeg chaos
random`` run, ``cluster.faults.nemesis``) checks, once converged, the
invariants of ``INVARIANTS`` too: every acknowledged push not deleted is
pullable, manifest and blobs byte-exact by digest, from every node of every
region residency allows; retagged tags agree and confined content stays
home (``georeg verify``'s tag and residency divergences, not a second
checker); every acknowledged delete is gone from every node residency lets
the deleting region's write reach; no pushed layer is found in the clear
under any node's data dir. The report's ``broken`` says what broke each.

While it runs, and once when done, a run tells the management server its
timeline (``cluster.faults.timeline``: steps applied, pushes and errors per
second, failovers) about every ``REPORT_EVERY_S``, for the dashboard to
draw; a server without that route, or a busy one, never holds up or fails
the run.

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
import structlog

from registry_node.errors import Outcome
from replicator.residency import ResidencyPolicy

from ..control.access import AdminLogin
from ..network.links import link_seed
from .controller import KINDS, SEEDED_KINDS
from .flap import Flap, FlapError
from .timeline import (
    MAX_CODES,
    MAX_ERROR,
    MAX_FAILOVERS,
    MAX_NAME,
    MAX_STEPS,
    Failover,
    Pushes,
    Timeline,
    TimelineStep,
    bucket_width,
    per_bucket,
)

SCENARIOS = Path(__file__).parent / "scenarios"    # the scenarios that ship with georeg
MAX_WORKERS = 16


class ScenarioError(ValueError):
    pass


# -- the scenario file ---------------------------------------------------------------


class Workload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    push_rate: float = 1.0
    pull_rate: float = 2.0
    retag_rate: float = 0.0     # an acknowledged image tagged again (t0..t2 of its repository)
    delete_rate: float = 0.0    # an acknowledged, never retagged image deleted by digest
    clients: tuple[str, ...] = ()
    layers: int = 2
    layer_size: int | tuple[int, int] = 65536
    repositories: int = 4


class Assertions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_lost_acknowledged: int = 0
    max_convergence_s: float = 120.0
    verify: bool = True
    min_acknowledged: int = 1
    # The random nemesis's invariants (``INVARIANTS``) checked too, beyond the
    # scenario's own: pulled from every region, deletes, residency, disk.
    invariants: bool = False


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
        if "flap" in resolved:
            # Scaled like every time; seeded from the scenario unless the step says.
            try:
                flap = Flap.parse(resolved["flap"], resolved.get("flap_jitter", 0.0))
            except FlapError as exc:
                raise ScenarioError(f"steps[{i}]: {exc}") from None
            flap = flap.scaled(scale)
            resolved["flap"] = f"{flap.on_s:g}/{flap.off_s:g}"
            resolved.setdefault("flap_seed", rng.randrange(2**32))
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
    manifest: bytes = field(default=b"", repr=False)
    layer_sample: bytes = field(default=b"", repr=False)   # 64 bytes of a layer, looked for on disk
    retagged: bool = False            # a retag of it was attempted: never deleted then
    deleting: bool = False            # a delete of it may have happened: not expected anywhere
    deleted: str = ""                 # an acknowledged delete: when, by whom, through which replica
    deleted_in: str = ""              # the region whose replica acknowledged the delete


@dataclass
class Retag:
    repository: str
    tag: str
    digest: str
    client: str
    answered_at: float
    region: str = ""                  # where it was written (the replica that acknowledged it)


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
    retags: list[Retag] = field(default_factory=list)      # acknowledged
    retags_unsure: list[Retag] = field(default_factory=list)   # may have happened (indefinite)
    deleted: list[Push] = field(default_factory=list)      # acknowledged deletes (202)
    deletes_attempted: int = 0
    # t, client, op, code (split by outcome where the answer had one, see ``error_label``)
    errors: list[tuple[float, str, str, str]] = field(default_factory=list)
    # (t, message) of every error that said why, up to _MAX_EXAMPLES per client and code
    examples: dict[tuple[str, str], list[tuple[float, str]]] = field(default_factory=dict)
    served_by: dict[str, list[tuple[float, str]]] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.started

    def live(self) -> list[Push]:
        """Acknowledged pushes no delete may have removed: expected everywhere."""
        return [p for p in self.acknowledged if not p.deleting]

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
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"   # what the workload pushes
CONVERGE_CONCURRENCY = 32       # image statuses asked at once while waiting for convergence
MAX_DISK_SAMPLES = 48           # layers looked for in the clear on disk (a seeded sample)
MAX_SHOWN = 10                  # what broke an invariant, shown per invariant
# The invariants a run with ``Assertions.invariants`` checks, beyond lost,
# converged and verify_clean (``ChaosRun._invariants``).
INVARIANTS = ("acknowledged_pullable", "tags_agree", "deletes_applied",
              "confined_stays_in_region", "no_plaintext_on_disk")
RECOVERY_POLL_S = 0.25          # how often a run past its duration asks whether faults recovered
RECOVERY_TAIL_S = 2.0           # workload kept on once they have (clients seen coming back)
log = structlog.get_logger("georeg.chaos")
REPORT_EVERY_S = 1.0            # how often a run tells the management server its timeline
TIMELINE_PATH = "/georeg/v1/dashboard/chaos-run"   # ... where (the dashboard draws it)


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
        # Bytes come from the run's name as well as its seed: a replay (a
        # shrink, named apart) never pushes the first run's blobs, which a
        # damaged copy left by that run would shadow.
        self._content = random.Random(f"{scenario.seed}/{scenario.name}")
        self.obs = obs
        self._counter = 0
        self.until = 0.0        # seconds into the run; the run may move it on while it runs
        self.until_planned = 0.0    # the scenario's duration
        # While set, the workload goes on past ``until``: the run is still finding
        # out whether its faults have recovered (``ChaosRun._outlast_recovery``).
        self.held = False

    def _layer(self) -> bytes:
        size = self.workload.layer_size
        n = self.rng.randint(*size) if isinstance(size, (list, tuple)) else size
        return self._content.randbytes(n)

    async def run(self, session: aiohttp.ClientSession, until: float) -> None:
        """Push and pull until ``until`` s into the run (or ``self.until``, if
        moved on meanwhile, and for as long as ``held``), then wait for what
        is under way."""
        self.until = self.until_planned = until
        tasks: set[asyncio.Task] = set()
        w = self.workload
        # (rate, operation, whether it needs an image to act on); a rate of 0: never.
        operations = [(w.push_rate, self._push, False), (w.pull_rate, self._pull, True),
                      (w.retag_rate, self._retag, True), (w.delete_rate, self._delete, True)]
        due = [0.0] * len(operations)
        loop_start = self.obs.now()
        while self.obs.now() < self.until or self.held:
            now = self.obs.now() - loop_start
            for i, (rate, operation, needs_image) in enumerate(operations):
                if not rate:
                    continue
                if needs_image and not self.obs.live():
                    due[i] = now
                elif now >= due[i]:
                    due[i] += self.rng.expovariate(rate)
                    if len(tasks) < MAX_WORKERS:
                        tasks.add(asyncio.create_task(operation(session)))
            done = {t for t in tasks if t.done()}
            tasks -= done
            next_due = min((d for d, (rate, *_) in zip(due, operations, strict=True) if rate),
                           default=now + 0.01)
            await asyncio.sleep(min(0.01, max(0.0, next_due - now)) or 0.001)
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
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": self._counter,
                             "run": self.scenario.name}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
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
                        0.0, manifest=image.manifest, layer_sample=image.blobs[-1][:64])
            async with session.put(f"{base}/v2/{repo}/manifests/{tag}", data=image.manifest,
                                   headers={"Content-Type": MANIFEST_TYPE,
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
        push = self.rng.choice(self.obs.live())
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

    async def _retag(self, session: aiohttp.ClientSession) -> None:
        """Tag an acknowledged image again, as a client moving ``t0``..``t2`` does.
        A client in a region that keeps its writes moves tags of its own
        (``t0-brazilsouth``): its writes never reach the others, so a tag
        shared with them would differ by design, not converge."""
        push = self.rng.choice(self.obs.live())
        client = self._client_seeing(push)
        if client is None:
            return
        tag = f"t{self.rng.randrange(3)}" + \
            (f"-{client}" if self.residency.confined(client, push.repository) else "")
        push.retagged = True
        try:
            async with session.put(
                    f"{self.endpoints[client]}/v2/{push.repository}/manifests/{tag}",
                    data=push.manifest,
                    headers={"Content-Type": MANIFEST_TYPE,
                             **self.credentials}) as r:
                await self._check(r, client, "retag", 201, push)
                self.obs.retags.append(Retag(
                    push.repository, tag, push.digest, client, self.obs.now(),
                    region_of(r.headers.get("X-Georeg-Replica", "")) or client))
        except _Refused as exc:
            outcome = exc.outcome
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            outcome = connection_outcome(exc, write=True)
            self.obs.error(client, "retag", f"connection:{type(exc).__name__}", outcome=outcome)
        else:
            return
        if outcome is Outcome.INDEFINITE:    # may land, and still be replicating at the end
            self.obs.retags_unsure.append(
                Retag(push.repository, tag, push.digest, client, self.obs.now(), client))

    def _client_seeing(self, push: Push) -> str | None:
        """A client location that can see ``push`` (residency lets it there),
        None if none can: only such a client writes about an image it has
        pulled. One in a region that keeps its writes writes only about
        images pushed there: what it writes stays there, so a tag it moved on
        an image from elsewhere would differ across regions by design (a
        modelling choice for ``tags_agree``; not a workaround: a manifest PUT
        outside a confined image's region is refused and leaves nothing,
        tests/test_replication.py)."""
        seeing = [c for c in self.clients
                  if self.residency.allows(push.region, push.repository, c)
                  and (c == push.region or not self.residency.confined(c, push.repository))]
        return self.rng.choice(seeing) if seeing else None

    async def _delete(self, session: aiohttp.ClientSession) -> None:
        """Delete an acknowledged image never retagged (so no later tag write
        brings it back), by digest."""
        candidates = [p for p in self.obs.live() if not p.retagged]
        if not candidates:
            return
        push = self.rng.choice(candidates)
        client = self._client_seeing(push)
        if client is None:
            return
        push.deleting = True                 # from now on it may be gone
        self.obs.deletes_attempted += 1
        try:
            async with session.delete(
                    f"{self.endpoints[client]}/v2/{push.repository}/manifests/{push.digest}",
                    headers=self.credentials) as r:
                await self._check(r, client, "delete", 202, push)
                replica = r.headers.get("X-Georeg-Replica", "")
                push.deleted = f"t+{self.obs.now():.2f}s by a client in {client} via {replica}"
                push.deleted_in = region_of(replica) if replica else ""
                self.obs.deleted.append(push)
        except _Refused as refused:
            push.deleting = refused.outcome is not Outcome.DEFINITE    # it did not happen
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            outcome = connection_outcome(exc, write=True)
            push.deleting = outcome is not Outcome.DEFINITE
            self.obs.error(client, "delete", f"connection:{type(exc).__name__}", outcome=outcome)

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


def _copies_behind(status: dict) -> list[str]:
    """Paired-region copies holding fewer images than the region they keep."""
    held: dict[str, int] = {}
    for node in status["nodes"]:
        held[node["region"]] = max(held.get(node["region"], 0), node.get("images") or 0)
    return [copy["name"] for copy in status.get("paired_copies") or ()
            if (copy.get("images") or 0) < held.get(copy["keeps"], 0)]


def _blob_digests(manifest: bytes) -> list[str]:
    doc = json.loads(manifest)
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def plaintext_hits(root: Path, needles: list[bytes]) -> list[tuple[str, bytes]]:
    """Every (file under ``root``, needle) where the file holds the needle in
    the clear: what encryption at rest must keep at zero."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            data = path.read_bytes()
        except FileNotFoundError:            # removed meanwhile (an upload, a compaction)
            continue
        for needle in needles:
            if needle in data:
                hits.append((str(path.relative_to(root)), needle[:40]))
    return hits


def _reason(detail: object) -> str:
    """What an error's detail says to a person: its reason, else the rest of it."""
    if isinstance(detail, dict):
        if "reason" in detail:
            return str(detail["reason"])
        rest = {k: v for k, v in detail.items() if k != "outcome"}
        return json.dumps(rest) if rest else ""
    return "" if detail is None else str(detail)


def residency_of(status: dict) -> ResidencyPolicy:
    """The cluster's residency policy, from ``GET /georeg/v1/cluster``."""
    return msgspec.convert(status["residency"], ResidencyPolicy) \
        if status.get("residency") else ResidencyPolicy()


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
                 tls: ssl.SSLContext | None = None, steps: list[Step] | None = None,
                 scope: str | None = None) -> None:
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
        # A schedule given (the random nemesis's) is taken as it is, unscaled.
        self.steps = schedule(scenario, self.rng, scale) if steps is None else list(steps)
        self.obs = Observations()
        self.applied: list[dict] = []
        self.residency = ResidencyPolicy()    # the cluster's, once known
        self.unconverged: list[str] = []      # what had not converged when the wait ended
        self._slots = asyncio.Semaphore(CONVERGE_CONCURRENCY)   # requests to nodes at once
        # A replay (shrinking) judges verify's divergences in its own
        # repositories only (this prefix): the cluster still holds what the
        # first run left, broken or not.
        self.scope = scope
        self.phase = "running"                # the timeline's (``cluster.faults.timeline``)
        self.passed: bool | None = None
        self.started_at = time.time()

    async def _api(self, session, method: str, path: str, body: dict | None = None):
        async with session.request(method, self.management + path, json=body,
                                   headers=self._owner) as r:
            data = await r.json(content_type=None) if r.content_length != 0 else None
            if r.status >= 400:
                message = (data or {}).get("error", {}).get("message", r.reason)
                raise ScenarioError(f"{method} {path}: {message}")
            return data

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(ssl=self.tls or True))

    async def status(self) -> dict:
        """The cluster's status, as the management API gives it."""
        async with self._session() as session:
            return await self._api(session, "GET", "/georeg/v1/cluster")

    async def run(self, progress=None) -> dict:
        async with self._session() as session:
            status = await self._api(session, "GET", "/georeg/v1/cluster")
            self.cluster_seed = status.get("seed")
            endpoints = status["global_endpoints"]
            residency = residency_of(status)
            self.residency = residency
            if status.get("admin_username"):       # a cluster with auth
                self.credentials = await self._admin_credentials(session)
            workload = ChaosWorkload(self.scenario, endpoints, self.rng, self.obs, residency,
                                     self.credentials)
            duration = self.scenario.duration_s * self.scale
            self.obs.started, self.started_at = time.monotonic(), time.time()
            reporter = asyncio.create_task(self._report_timeline(session))
            try:
                report = await self._run(session, status, workload, duration, progress)
                self.passed = report["passed"]
            finally:
                # Done, passed or not; a run that raised (or was interrupted) says it
                # is done too, with passed unknown, rather than be shown running.
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
                self.phase = "done"
                await self._send_timeline(session)
        return report

    async def _run(self, session, status: dict, workload: ChaosWorkload, duration: float,
                   progress) -> dict:
        """The workload and the schedule, then convergence and the checks: the report."""
        runner = asyncio.create_task(workload.run(session, duration))
        faults = asyncio.create_task(self._faults(session))
        outlast = asyncio.create_task(self._outlast_recovery(session, workload, faults))
        while not runner.done():
            if progress:
                progress(min(self.obs.now(), duration), duration)
            await asyncio.sleep(0.25)
        await runner
        await faults
        await outlast
        await self._api(session, "DELETE", "/georeg/v1/faults")
        last_heal = self.obs.now()
        self.phase = "converging"
        converged_after = await self._converge(session)
        self.phase = "checking"
        lost = await self._lost(session)
        landed = await self._landed(session)
        verify = await self._verify(session) if self.scenario.assertions.verify else None
        max_lag = await self._max_lag(session, status)
        invariants = await self._invariants(session, verify) \
            if self.scenario.assertions.invariants else None
        return self._report(last_heal, converged_after, lost, verify, max_lag, landed, invariants)

    def timeline(self) -> Timeline:
        """What the run has done so far (``cluster.faults.timeline``)."""
        obs = self.obs
        at = obs.now()
        width = bucket_width(at)
        codes: dict[str, list[float]] = {}
        for t, _client, _op, code in obs.errors:
            codes.setdefault(code, []).append(t)
        shown = sorted(codes, key=lambda c: -len(codes[c]))[:MAX_CODES]
        steps = [TimelineStep(round(step.at_s, 2), step.describe()[:MAX_NAME])
                 for step in self.steps]
        for step, applied in zip(steps, self.applied, strict=False):   # applied in order
            step.applied_at_s = applied["at_s"]
            step.fault, step.error = applied.get("fault"), applied.get("error")
            if step.error is not None:
                step.error = step.error[:MAX_ERROR]
        failovers = [Failover(round(t, 2), client, region)
                     for client, history in obs.served_by.items() for t, region in history[1:]]
        return Timeline(
            scenario=self.scenario.name[:MAX_NAME], seed=self.seed, started_at=self.started_at,
            duration_s=self.scenario.duration_s * self.scale, at_s=round(at, 2),
            phase=self.phase, steps=steps[:MAX_STEPS], bucket_s=width,
            pushes=Pushes(attempted=obs.pushes_attempted, acknowledged=len(obs.acknowledged),
                          refused=obs.pushes_refused, indefinite=len(obs.indefinite)),
            acknowledged=per_bucket([p.answered_at for p in obs.acknowledged], width, at),
            errors={code: per_bucket(codes[code], width, at) for code in shown},
            failovers=sorted(failovers, key=lambda f: f.at_s)[-MAX_FAILOVERS:],
            passed=self.passed)

    async def _send_timeline(self, session) -> bool:
        """Tell the management server the timeline (its dashboard draws it). Never
        fails the run (reporting is best effort): False when the server has no such
        route (an older one)."""
        try:
            async with session.put(self.management + TIMELINE_PATH,
                                   data=msgspec.json.encode(self.timeline()),
                                   headers={**self._owner, "Content-Type": "application/json"},
                                   timeout=aiohttp.ClientTimeout(total=REPORT_EVERY_S * 2)) as r:
                return r.status not in (404, 405)
        except (aiohttp.ClientError, TimeoutError):
            return True                         # the server is busy or away: next time
        except Exception as exc:    # noqa: BLE001 - a report's bug never fails the run
            log.warning("chaos_timeline_not_sent", error=str(exc) or type(exc).__name__)
            return True

    async def _report_timeline(self, session) -> None:
        """Every ``REPORT_EVERY_S`` until the run cancels it (its end), unless the
        server has no route for it."""
        while True:
            if not await self._send_timeline(session):
                return
            await asyncio.sleep(REPORT_EVERY_S)

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

    async def _outlast_recovery(self, session, workload: ChaosWorkload,
                                faults: asyncio.Task) -> None:
        """Keep the workload on past the scenario's duration while a fault the
        schedule set to heal by itself has not healed, or a node it took down
        is not back in routing, and then as long as the schedule left after
        its last such heal (at least ``RECOVERY_TAIL_S``): clients are seen
        coming back, and served, as the scenario meant them to be. A restart takes as long at any scale, so a scaled
        run (or one on a loaded machine) would otherwise end before it is
        done. Bounded by ``max_convergence_s``; faults the run heals at its
        end (no duration) are not waited for.

        The workload is held (``ChaosWorkload.held``) from the start until
        this decides: however late a poll comes back on a loaded machine, the
        workload never ends before recovery has been seen (extending a
        deadline a poll at a time did, whenever a poll took longer than the
        time left). Polling starts at the schedule's last such heal, so a
        recovery seen before the planned end costs at most the tail past it;
        a schedule with no fault that heals by itself is not held at all."""
        heals = [s.at_s + s.arguments["duration_s"] for s in self.steps
                 if s.action == "fault" and s.arguments.get("duration_s")]
        if not heals:
            return
        last_heal = max(heals)
        workload.held = True
        try:
            await faults
            await asyncio.sleep(max(0.0, last_heal - self.obs.now()))
            limit = self.obs.now() + self.scenario.assertions.max_convergence_s
            while self.obs.now() < limit:
                try:
                    recovered = await self._recovered(session)
                except (ScenarioError, aiohttp.ClientError, TimeoutError):
                    recovered = False           # asked again on the next poll
                if recovered:
                    # Past the planned end: as long as the schedule left after
                    # its last heal; before it, up to the tail past the heal.
                    seen = self.obs.now()
                    after = RECOVERY_TAIL_S if seen < workload.until else \
                        max(RECOVERY_TAIL_S, workload.until_planned - last_heal)
                    workload.until = max(workload.until, seen + after)
                    return
                await asyncio.sleep(RECOVERY_POLL_S)
        finally:
            workload.held = False

    async def _recovered(self, session) -> bool:
        """Whether every fault the schedule injected with a duration has healed
        and every node it took down is healthy again."""
        ours = {e["fault"] for e in self.applied if "fault" in e}
        faults = [f for f in await self._api(session, "GET", "/georeg/v1/faults")
                  if f["id"] in ours and f.get("duration_s")]
        if any(f["active"] for f in faults):
            return False
        taken = {n for f in faults for n in f.get("nodes") or ()}
        status = await self._api(session, "GET", "/georeg/v1/cluster")
        return all(n["healthy"] for n in status["nodes"] if n["name"] in taken)

    async def _converge(self, session, limit_s: float | None = None) -> float | None:
        """Seconds from the last heal until every acknowledged image (and every
        retagged tag) is everywhere residency allows, agreeing, and every
        paired-region copy holds as many images as its region (None if that did
        not happen within the limit): verify, a snapshot, needs the cluster quiet."""
        limit = limit_s or max(self.scenario.assertions.max_convergence_s * 2, 30)
        started = time.monotonic()
        status = await self._api(session, "GET", "/georeg/v1/cluster")
        node = next((n["http"] for n in status["nodes"] if n["healthy"]), None)
        in_region = {n["region"]: n["http"] for n in status["nodes"] if n["healthy"]}
        # A retagged tag is asked of its writer's region (one that keeps its
        # writes holds tags no other has).
        pending = {(p.repository, p.tag, node) for p in self.obs.live()} | \
            {(r.repository, r.tag, in_region.get(r.region, node)) for r in self.obs.retags}
        # Each status asks every replica, across the modelled WAN (a few hundred
        # ms): asked one image at a time, a pass over ~100 images took longer
        # than the convergence it was measuring.
        slots = asyncio.Semaphore(CONVERGE_CONCURRENCY)

        async def complete(repo: str, tag: str, asked: str) -> bool:
            async with slots, session.get(f"{asked}/georeg/v1/replication/status",
                                          params={"repository": repo, "reference": tag},
                                          headers=self.credentials) as r:
                return r.status == 200 and (await r.json())["complete"]

        while time.monotonic() - started < limit and node is not None:
            asked = list(pending)
            for image, done in zip(asked, await asyncio.gather(*(complete(*i) for i in asked)),
                                   strict=True):
                if done:
                    pending.discard(image)
            behind = [] if pending else \
                _copies_behind(await self._api(session, "GET", "/georeg/v1/cluster"))
            settling = [] if pending or behind else await self._settling(session)
            if not pending and not behind and not settling:
                return round(time.monotonic() - started, 2)
            await asyncio.sleep(0.25)
        # What never got there, for the report.
        self.unconverged = [f"{repo}:{tag}" for repo, tag, _ in sorted(pending)[:MAX_SHOWN]] \
            + [f"paired copy {name} behind its region" for name in behind] + settling[:MAX_SHOWN]
        return None

    async def _head(self, session, url: str) -> tuple[int, str]:
        async with self._slots, session.head(url, headers=self.credentials) as r:
            return r.status, r.headers.get("Docker-Content-Digest", "")

    async def _gone(self, session, push: Push, node: dict) -> str | None:
        """None if ``node`` no longer has the deleted ``push``, else what it has."""
        status_, _ = await self._head(session, f"{node['http']}/v2/{push.repository}/manifests/"
                                               f"{push.digest}")
        return None if status_ == 404 else \
            f"{push.repository}@{push.digest[:19]}… (pushed in {push.region} at " \
            f"t+{push.answered_at:.2f}s, deleted {push.deleted}) still on {node['name']} " \
            f"(HTTP {status_})"

    async def _settling(self, session) -> list[str]:
        """Writes still on their way that verify, a snapshot, would see: an
        acknowledged delete not yet applied on one node of each region it
        reaches, and a retagged tag (acknowledged, or of unknown outcome)
        that the regions it reaches do not resolve alike."""
        status = await self._api(session, "GET", "/georeg/v1/cluster")
        one = {}
        for n in status["nodes"]:
            if n["healthy"]:
                one.setdefault(n["region"], n)

        def reached(origin: str, repository: str) -> list[dict]:
            return [n for region, n in one.items()
                    if self.residency.allows(origin, repository, region)]

        deletes = await asyncio.gather(*(self._gone(session, p, n) for p in self.obs.deleted
                                         for n in reached(p.deleted_in or p.region, p.repository)))
        tags = sorted({(r.repository, r.tag, r.region) for r in
                       [*self.obs.retags, *self.obs.retags_unsure]})

        async def disagreeing(repo: str, tag: str, region: str) -> str | None:
            nodes = reached(region, repo)
            seen = await asyncio.gather(*(self._head(session, f"{n['http']}/v2/{repo}/manifests/"
                                                              f"{tag}") for n in nodes))
            return None if len(set(seen)) <= 1 else f"tag {repo}:{tag} differs across regions"

        return [d for d in deletes if d] + \
            [d for d in await asyncio.gather(*(disagreeing(*t) for t in tags)) if d]

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
        pushes = self.obs.live()
        return [{"repository": push.repository, "tag": push.tag, "digest": push.digest,
                 "client": push.client, "acked_at_s": round(push.answered_at, 2)}
                for push, served in zip(pushes, await self._served(session, pushes), strict=True)
                if not served]

    async def _landed(self, session) -> list[bool]:
        """For each indefinite push, whether it took effect after all (after
        convergence: what landed anywhere has had time to be served)."""
        return await self._served(session, self.obs.indefinite)

    async def _verify(self, session) -> dict | None:
        """``georeg verify``'s verdict; one that fails or never answers (the
        session's timeout) is a failed verify in the report, not a crash."""
        try:
            return await self._api(session, "GET", "/georeg/v1/verify")
        except ScenarioError as exc:
            return {"clean": False, "error": str(exc)}
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"clean": False,
                    "error": f"GET /georeg/v1/verify: {str(exc) or type(exc).__name__}"}

    async def _invariants(self, session, verify: dict | None) -> dict[str, list]:
        """What breaks each of ``INVARIANTS`` (an empty list: it holds), once the
        cluster has converged. Tags agreeing and residency come from ``georeg
        verify``'s divergences; the rest is read from every node."""
        status = await self._api(session, "GET", "/georeg/v1/cluster")
        nodes = [n for n in status["nodes"] if n["healthy"]]
        down = [f"{n['name']} not healthy ({n.get('health')}): not checked"
                for n in status["nodes"] if not n["healthy"]]
        divergences = self._divergences(verify)

        async def get(url: str, method: str = "GET") -> tuple[int, bytes, str]:
            async with self._slots, session.request(method, url, headers=self.credentials) as r:
                body = await r.read()
                return r.status, body, r.headers.get("Docker-Content-Digest", "")

        async def pullable(push: Push, node: dict) -> str | None:
            base = f"{node['http']}/v2/{push.repository}"
            status_, _, digest = await get(f"{base}/manifests/{push.tag}")
            if status_ != 200 or digest != push.digest:
                return f"{push.repository}:{push.tag} on {node['name']}: HTTP {status_}, {digest}"
            for blob in _blob_digests(push.manifest):
                status_, body, _ = await get(f"{base}/blobs/{blob}")
                actual = "sha256:" + hashlib.sha256(body).hexdigest()
                if status_ != 200 or actual != blob:
                    return (f"{push.repository}@{blob[:19]}… on {node['name']}: HTTP {status_}, "
                            f"its bytes hash to {actual[:19]}…")
            return None

        def allowed(push: Push) -> list[dict]:
            return [n for n in nodes
                    if self.residency.allows(push.region, push.repository, n["region"])]

        checked = await asyncio.gather(
            *(pullable(p, n) for p in self.obs.live() for n in allowed(p)),
            *(self._gone(session, p, n) for p in self.obs.deleted for n in allowed(p)
              # A delete is a write of the region that took it: it goes where that allows.
              if self.residency.allows(p.deleted_in or p.region, p.repository, n["region"])))
        live = sum(len(allowed(p)) for p in self.obs.live())
        roots = [Path(n["data_dir"]) for n in [*status["nodes"], *status.get("paired_copies", ())]
                 if n.get("data_dir")]
        samples = [p.layer_sample for p in self.obs.acknowledged if len(p.layer_sample) == 64]
        samples = random.Random(self.seed).sample(samples, min(len(samples), MAX_DISK_SAMPLES))
        hits = await asyncio.to_thread(lambda: [hit for root in roots
                                                for hit in plaintext_hits(root, samples)])
        return {
            "acknowledged_pullable": down + [c for c in checked[:live] if c],
            "tags_agree": [d["detail"] for d in divergences if d.get("kind") == "tag"],
            "deletes_applied": [c for c in checked[live:] if c],
            "confined_stays_in_region": [d["detail"] for d in divergences
                                         if d.get("kind") == "residency"],
            "no_plaintext_on_disk": [f"{path}: {needle.hex()[:16]}…" for path, needle in hits],
        }

    def _divergences(self, verify: dict | None) -> list[dict]:
        """verify's divergences: all of them, or a replay's own (``scope``)."""
        found = (verify or {}).get("divergences") or []
        return found if self.scope is None else \
            [d for d in found if (d.get("repository") or "").startswith(self.scope)]

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
                verify: dict | None, max_lag: float | None, landed: list[bool],
                invariants: dict[str, list] | None = None) -> dict:
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
            checks["verify_clean"] = bool(verify and verify.get("ok")) if self.scope is None \
                else bool(verify) and not verify.get("error") and not self._divergences(verify)
        for name, broken in (invariants or {}).items():
            checks[name] = not broken
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
            "unconverged": self.unconverged,
            "max_lag_ms": max_lag,
            "verify": verify,
            "retags": len(obs.retags),
            "deletes": {"attempted": obs.deletes_attempted, "acknowledged": len(obs.deleted)},
            # What broke each invariant checked (the first few of each).
            "broken": {name: what[:MAX_SHOWN] for name, what in (invariants or {}).items() if what},
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
                 else f"  did NOT converge after {healed}: "
                      + ", ".join(report.get("unconverged") or ["?"]))
    if report["max_lag_ms"] is not None:
        lines.append(f"  worst replication lag of an acknowledged image: {report['max_lag_ms']:.0f} ms")
    if report["verify"] is not None:
        verdict = report["verify"]
        if verdict.get("error"):
            lines.append(f"  georeg verify: FAILED ({verdict['error']})")
        else:
            lines.append(f"  georeg verify: {'clean' if verdict.get('ok') else 'DIVERGENT'}"
                         + (f" ({len(verdict.get('divergences') or [])} divergences)"
                            if not verdict.get("ok") else ""))
    if report.get("deletes"):
        d = report["deletes"]
        lines.append(f"  retags acknowledged: {report['retags']}; deletes: {d['attempted']} "
                     f"attempted, {d['acknowledged']} acknowledged")
    for name, what in report.get("broken", {}).items():
        lines.append(f"  invariant broken: {name}: " + "; ".join(what[:3]))
    failed = [k for k, ok in report["checks"].items() if not ok]
    if failed:
        lines.append(f"  failed checks: {', '.join(failed)}")
    return "\n".join(lines)
