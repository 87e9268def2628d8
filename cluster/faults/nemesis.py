"""The random nemesis (after Jepsen): a seeded schedule of faults drawn from
every kind the fault controller offers, for ``georeg chaos random``, and the
shrinker that finds the shortest fault history that still breaks an invariant.

What it owns, and its invariants:

* ``NEMESIS`` — one table entry per nemesis kind: a function from a seeded
  ``random.Random`` and the cluster's ``Topology`` to the fault to inject
  (a controller kind and its arguments), or None where the topology has no
  place for it (a zone outage in a cluster without zones). Adding a kind is
  one entry. ``destroy`` is left out on purpose: wiping a confined region
  loses what only it may hold, by design, and no invariant could tell that
  from a bug.
* ``plan`` — the schedule is a pure function of (seed, duration, kinds,
  intensity, topology): no clock, no cluster, no global random state. Every
  random draw a fault makes later (segment fates, EIO, bit rot, HTTP faults)
  takes a seed drawn here, so a fault replays the same when others are
  removed around it (shrinking).
* Faults keep within what the registry promises to survive: a clock is
  skewed within the tolerated offset (``registry_node.clock``), bit rot
  strikes only where a replica residency allows can repair it (a confined
  region without zones has none, and says so: ``docs/faults.md``).
* ``shrink`` — delta debugging over a fault history: it only ever returns a
  history the predicate said breaks, never longer than the one given, and
  asks at most ``max_runs`` times.

The run itself (workload, final heal, invariants, report) is
``cluster.faults.chaos.ChaosRun``'s; the nemesis only supplies its steps.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .chaos import Assertions, Scenario, Step, Workload, residency_of
from .controller import MODES

CLOCK_OFFSET_S = 0.4          # within the 500 ms tolerated offset (docs/faults.md)
SEED_LIMIT = 2**31


@dataclass(frozen=True)
class Topology:
    """What the nemesis may aim at: regions with their zones (``("",)`` for a
    region without zones), the client locations (global endpoints), and the
    regions that keep what is pushed in them (residency)."""

    regions: tuple[tuple[str, tuple[str, ...]], ...]
    clients: tuple[str, ...]
    confined: tuple[str, ...] = ()

    @classmethod
    def from_status(cls, status: dict) -> Topology:
        """From the management API's ``GET /georeg/v1/cluster``."""
        zones: dict[str, list[str]] = {}
        for node in status["nodes"]:
            zones.setdefault(node["region"], []).append(node.get("zone") or "")
        policy = residency_of(status)
        return cls(tuple((r, tuple(sorted(z))) for r, z in sorted(zones.items())),
                   tuple(sorted(status["global_endpoints"])),
                   tuple(sorted(policy.confined_regions)))

    @classmethod
    def from_spec(cls, spec) -> Topology:  # spec: cluster.control.spec.ClusterSpec
        """What a cluster started from ``spec`` will have (no cluster needed)."""
        replicas = spec.all_replicas
        return cls(tuple(sorted((r.region, tuple(sorted(r.zones))) for r in replicas)),
                   tuple(sorted(r.region for r in replicas if r.global_routing)),
                   tuple(sorted(spec.residency_policy().confined_regions)))

    @property
    def names(self) -> list[str]:
        return [region for region, _ in self.regions]

    def zoned(self) -> list[str]:
        return [region for region, zones in self.regions if len(zones) > 1]

    def node(self, rng: random.Random, regions: list[str] | None = None) -> str | None:
        """A node as the controller names it: ``REGION`` or ``REGION/ZONE``."""
        choices = [f"{r}/{z}" if z else r for r, zones in self.regions
                   if regions is None or r in regions for z in zones]
        return rng.choice(choices) if choices else None


def _seed(rng: random.Random) -> int:
    return rng.randrange(SEED_LIMIT)


def _region_outage(rng, topo):
    return {"fault": "region-outage", "region": rng.choice(topo.names), "mode": rng.choice(MODES)}


def _zone_outage(rng, topo):
    zoned = topo.zoned()
    if not zoned:
        return None
    region = rng.choice(zoned)
    zone = rng.choice(dict(topo.regions)[region])
    return {"fault": "zone-outage", "region": region, "zone": zone, "mode": rng.choice(MODES)}


def _pair(rng, topo) -> tuple[str, str] | None:
    if len(topo.names) < 2:
        return None
    a, b = rng.sample(topo.names, 2)
    return a, b


def _partition(rng, topo):
    pair = _pair(rng, topo)
    return pair and {"fault": "partition", "a": pair[0], "b": pair[1],
                     "one_way": rng.random() < 0.3}


def _link(**draws: Callable[[random.Random], object]):
    """A link fault between two regions, its degradation drawn by ``draws``."""
    def draw(rng, topo):
        pair = _pair(rng, topo)
        return pair and {"fault": "link", "a": pair[0], "b": pair[1],
                         **{name: d(rng) for name, d in draws.items()}, "seed": _seed(rng)}
    return draw


def _disk(**draws: Callable[[random.Random], object]):
    def draw(rng, topo):
        region, _, zone = topo.node(rng).partition("/")
        return {"fault": "disk", "region": region, **({"zone": zone} if zone else {}),
                **{name: d(rng) for name, d in draws.items()}}
    return draw


def _bitrot(rng, topo):
    # Only where another replica residency allows can repair it.
    repairable = [r for r, zones in topo.regions if len(zones) > 1 or r not in topo.confined]
    node = topo.node(rng, repairable)
    if node is None:
        return None
    region, _, zone = node.partition("/")
    return {"fault": "bitrot", "region": region, **({"zone": zone} if zone else {}),
            "blobs": rng.randint(1, 3), "seed": _seed(rng)}


def _clock(rng, topo):
    return {"fault": "clock", "node": topo.node(rng),
            "offset_s": round(rng.uniform(-CLOCK_OFFSET_S, CLOCK_OFFSET_S), 3)}


def _http(rng, topo):
    action = rng.choice(("status", "reset", "truncate"))
    return {"fault": "http", "endpoint": f"global:{rng.choice(topo.clients)}", "action": action,
            **({"status": rng.choice((500, 503, 429))} if action == "status" else {}),
            "probability": round(rng.uniform(0.1, 0.5), 2), "seed": _seed(rng)}


def _pause(rng, topo):
    # A node stopped with its sockets open, or one that answers but stalls blob bodies.
    return {"fault": "pause", "region": topo.node(rng), "stall_bodies": rng.random() < 0.3}


def _routing(rng, topo):
    return {"fault": "routing", "region": rng.choice(topo.clients), "enabled": False}


def _throttle(rng, topo):
    return {"fault": "throttle", "region": rng.choice(topo.names),
            "rate_per_min": rng.choice((30, 60, 120))}


# One entry per kind: (rng, topology) -> {"fault": controller kind, **arguments} | None.
NEMESIS: dict[str, Callable[[random.Random, Topology], dict | None]] = {
    "region-outage": _region_outage,
    "zone-outage": _zone_outage,
    "partition": _partition,
    "link-slow": _link(latency_ms=lambda r: r.choice((50, 150, 400)),
                       jitter_ms=lambda r: r.choice((0, 20, 80))),
    "link-lossy": _link(loss=lambda r: round(r.uniform(0.005, 0.03), 3),
                        duplicate=lambda r: round(r.uniform(0.0, 0.02), 3),
                        reorder=lambda r: r.random() < 0.5),
    "link-corrupt": _link(corrupt=lambda r: round(r.uniform(0.005, 0.03), 3)),
    "disk-full": _disk(full=lambda r: True),
    "disk-slow": _disk(slow_ms=lambda r: r.choice((20, 80, 200))),
    "disk-eio": _disk(eio=lambda r: r.choice(("read", "write")),
                      probability=lambda r: round(r.uniform(0.05, 0.3), 2), seed=_seed),
    "bitrot": _bitrot,
    "clock": _clock,
    "http": _http,
    "pause": _pause,
    "routing": _routing,
    "throttle": _throttle,
}
DEFAULT_INTENSITY = 1.0       # faults started per 10 s, on average


class NemesisError(ValueError):
    pass


def kinds_from(text: str | None) -> tuple[str, ...]:
    """``--kinds a,b``: the kinds named (all of them when None), or NemesisError."""
    if not text:
        return tuple(NEMESIS)
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in NEMESIS]
    if unknown or not kinds:
        raise NemesisError(f"unknown nemesis kind(s) {', '.join(unknown) or '(none)'}; "
                           f"kinds: {', '.join(NEMESIS)}")
    return tuple(k for k in NEMESIS if k in kinds)    # one order, whatever order was asked


def plan(seed: int, duration_s: float, kinds: Sequence[str], intensity: float,
         topology: Topology) -> list[Step]:
    """The fault schedule: a pure function of its arguments.

    Faults start as a Poisson process (``intensity`` per 10 s) over the first
    80 % of the run, each lasting 10–35 % of it (at least 1 s) and healing
    itself by 90 % of it, so the workload sees the cluster whole again before
    it ends. Kinds the topology has no place for are dropped."""
    if duration_s <= 0 or intensity <= 0:
        raise NemesisError("the duration and intensity must be positive")
    rng = random.Random(f"nemesis {seed}")
    pool = [k for k in kinds_from(",".join(kinds))]
    steps: list[Step] = []
    at = rng.expovariate(intensity / 10.0)
    for _ in range(10_000):                       # bounded, whatever the intensity
        if at >= 0.8 * duration_s or not pool:
            break
        kind = rng.choice(pool)
        drawn = NEMESIS[kind](rng, topology)
        if drawn is None:
            pool.remove(kind)
            continue
        lasts = max(1.0, rng.uniform(0.10, 0.35) * duration_s)
        lasts = round(min(lasts, 0.9 * duration_s - at), 2)
        controller_kind = drawn.pop("fault")
        if controller_kind != "bitrot":           # an act: nothing to heal
            drawn["duration_s"] = max(lasts, 0.5)
        steps.append(Step(round(at, 2), "fault", controller_kind, drawn))
        at += rng.expovariate(intensity / 10.0)
    return steps


def scenario(seed: int, duration_s: float, name: str | None = None) -> Scenario:
    """The standard workload of a random run: pushes, pulls, retags and
    deletes from every client location, every invariant checked."""
    return Scenario(
        name=name or f"random-{seed}",
        description="random nemesis: seeded faults of every kind under the standard workload",
        seed=seed, duration_s=duration_s,
        workload=Workload(push_rate=2.0, pull_rate=3.0, retag_rate=0.5, delete_rate=0.3,
                          layers=2, layer_size=(4096, 32768), repositories=3),
        assertions=Assertions(invariants=True, max_convergence_s=max(60.0, duration_s)))


async def shrink(history: list, breaks: Callable[[list], Awaitable[bool]],
                 max_runs: int = 16) -> tuple[list, int]:
    """The shortest sub-history (order kept) found for which ``breaks`` still
    holds, and how many times it was asked: delta debugging (Zeller's ddmin,
    complements only), after trying no faults at all. ``history`` is assumed
    to break; at most ``max_runs`` replays."""
    runs = 0

    async def ask(candidate: list) -> bool:
        nonlocal runs
        runs += 1
        return await breaks(candidate)

    if history and await ask([]):
        return [], runs
    n = 2
    while len(history) > 1 and runs < max_runs:
        chunk = -(-len(history) // n)             # ceiling
        parts = [history[i:i + chunk] for i in range(0, len(history), chunk)]
        for i in range(len(parts)):
            if runs >= max_runs:
                break
            complement = [x for j, part in enumerate(parts) if j != i for x in part]
            if await ask(complement):
                history, n = complement, max(n - 1, 2)
                break
        else:
            if n >= len(history):
                break
            n = min(2 * n, len(history))
    return history, runs
