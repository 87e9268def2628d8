"""The registry's retention policy for untagged manifests, as ``az acr config
retention show|update`` manage it, and the sweeps that apply it.
``Cluster.lifecycle`` is one of these; the management API and ``georeg
registry retention`` are layers over it.

The policy is registry configuration (``RegistryProperties.retention_*``):
an update is checked here (days 0 to 365: ``registry_node.untagged``; the
Premium tier, inside the registry object's one read-modify-write,
``Cluster.update_registry_object``, so a move of the tier cannot come
between), then written through a node of the home region, which checks it
again, stamps it and logs it; replication takes it to every node. While the home region cannot
be reached an update fails with the control plane's message; ``show`` answers
from any node. Enabling a disabled policy records when
(``retention_enabled_ns``, this process's clock, which is the nodes' wall
clock on one machine): the policy applies to manifests untagged from then on,
as ACR's does.

Sweeps. Every ``interval_s`` the control process asks one answering node of
each region (the first zone first: ``delivery_order``) to sweep the manifests
first pushed in that region, and the home region's node also those first
pushed in regions that are no longer replicas. So each manifest has one
deciding region, whatever residency keeps from other regions, and a region
that cannot be reached just waits for its next sweep (its manifests with
it). The node decides and deletes (``registry_node.untagged``); its deletes
replicate like a client's.

Scheduled purges (``schedules``) run here too: ``purge_as_client`` is
``georeg purge`` from the control process, a client of the home region's
data plane (its regional endpoint, or a home node when the cluster routes
nothing) with the admin user's login on a cluster with auth — so a
scheduled purge fails, and says so in its run, while the admin user is
disabled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from registry_node import tiers
from registry_node.untagged import DEFAULT_DAYS, check_days

from .errors import ClusterError, NodeRefusal
from .purge import PurgeError, PurgeRequest, run_purge
from .regions import REGIONS
from .schedules import iso
from .tls import client_context
from .webhooks import delivery_order

log = structlog.get_logger("georeg.lifecycle")

NodeCall = Callable[..., Awaitable[dict]]
SWEEP_INTERVAL_S = 60.0
STATUSES = ("enabled", "disabled")
# The registry object's fields this module owns (``Cluster.set_configuration`` keeps them).
RETENTION_FIELDS = ("retention_enabled", "retention_days", "retention_enabled_ns")


def retention_view(stored: dict) -> dict:
    """ACR's ``retentionPolicy`` of a stored registry object (``{}``: never written)."""
    enabled = bool(stored.get("retention_enabled", False))
    return {"type": "UntaggedManifests", "days": stored.get("retention_days", DEFAULT_DAYS),
            "status": "enabled" if enabled else "disabled",
            "enabledSince": iso(stored.get("retention_enabled_ns", 0) / 1e9) if enabled else None}


def check_update(days: object, status: object) -> None:
    """What ``update_retention`` is given, or ``ClusterError`` saying what is wrong."""
    if days is None and status is None:
        raise ClusterError('send {"days": 0..365, "status": "enabled"|"disabled"}')
    if days is not None:
        try:
            check_days(days)
        except ValueError as exc:
            raise ClusterError(str(exc)) from None
    if status is not None and status not in STATUSES:
        raise ClusterError(f"status is enabled or disabled, not {str(status)[:32]!r}")


class RegistryLifecycle:
    """``update`` is the registry object's one read-modify-write
    (``Cluster.update_registry_object``: under the locks a move of the tier
    takes too); ``reader`` a node to read from; ``current`` the stored
    registry object on a node; ``plan``/``regions`` the cluster's plan and
    replica regions, ``home_region`` its home region; ``tier`` the live tier;
    ``answers`` whether a node answers; ``request`` a node's own route;
    ``wall_ns`` the clock that dates an enabling (the nodes' wall clock)."""

    def __init__(self, *, update: Callable[..., Awaitable[dict]],
                 reader: Callable[[], Awaitable[str]],
                 current: Callable[[str], Awaitable[dict]],
                 plan: Callable[[], object], regions: Callable[[], list[str]],
                 home_region: Callable[[], str], tier: Callable[[], str],
                 answers: Callable[[str], Awaitable[bool]], request: NodeCall,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self._update, self._reader, self._current = update, reader, current
        self._plan, self._regions, self._home_region = plan, regions, home_region
        self._tier = tier
        self._answers, self._request = answers, request
        self._wall_ns = wall_ns
        self.last_sweep: dict[str, dict] = {}     # region → its last sweep's report (or error)

    # -- the policy ------------------------------------------------------------------

    async def retention(self) -> dict:
        """``az acr config retention show``."""
        return retention_view(await self._current(await self._reader()))

    async def update_retention(self, *, days: int | None = None,
                               status: str | None = None) -> dict:
        """``az acr config retention update --days --status``: what is given
        changes, the rest keeps its value; nothing changes on a refusal."""
        check_update(days, status)

        async def changes(_home: str, current: dict) -> dict:
            # Checked inside the read-modify-write a move of the tier makes
            # too (under the same locks): none can come between.
            if status == "enabled" and self._tier() != tiers.PREMIUM:
                raise ClusterError(f"a retention policy needs the Premium tier, as in ACR; this "
                                   f"registry is {self._tier()} (georeg registry update --sku "
                                   f"Premium)")
            value: dict = {}
            if days is not None:
                value["retention_days"] = days
            if status is not None:
                enabled = status == "enabled"
                if enabled and not current.get("retention_enabled"):
                    value["retention_enabled_ns"] = self._wall_ns()
                value["retention_enabled"] = enabled
            return value

        return retention_view(await self._update(changes))

    # -- sweeps ------------------------------------------------------------------------

    def origins(self) -> dict[str, list[str]]:
        """Region → the regions whose first pushes its node decides for."""
        regions = self._regions()
        home = self._home_region()
        gone = sorted(r for r in REGIONS if r not in regions)
        return {region: [region] + (gone if region == home else []) for region in regions}

    async def sweep_once(self, **options: object) -> dict[str, dict]:
        """One sweep in every region that answers; region → its report, or
        ``{"error": why}``. ``options``: the node route's ``limit`` and
        ``settleSeconds``."""
        async def one(region: str, origins: list[str]) -> tuple[str, dict]:
            for name in delivery_order(self._plan(), region):
                if await self._answers(name):
                    try:
                        report = await self._request(name, "POST", "/georeg/v1/retention/sweep",
                                                     {"origins": origins, **options})
                    except (NodeRefusal, OSError) as exc:
                        return region, {"error": str(exc)[:300]}
                    return region, {"node": name, **report}
            return region, {"error": f"no node of {region} answers: its sweep waits"}

        results = dict(await asyncio.gather(*(one(r, o) for r, o in self.origins().items())))
        self.last_sweep = results
        return results

    async def run(self, interval_s: float = SWEEP_INTERVAL_S) -> None:
        """Sweep every ``interval_s`` until cancelled, while the policy is
        enabled (a disabled one costs one read a period); a failed sweep waits
        for the next."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if (await self.retention())["status"] != "enabled":
                    continue
                results = await self.sweep_once()
            except ClusterError as exc:      # no node answers: the next period may
                log.warning("retention_sweep_skipped", reason=str(exc)[:200])
                continue
            except Exception:        # noqa: BLE001 - a failed sweep must not end the next
                log.exception("retention_sweep_failed")
                continue
            deleted = sum(len(r.get("deleted", [])) for r in results.values())
            if deleted:
                log.info("retention_swept", deleted=deleted)


class ClusterAsClient(Protocol):
    """What of a ``Cluster`` a purge from the control process uses (a Cluster
    is one; not imported here, since it imports this module)."""

    spec: Any
    plan: Any
    routing: Any
    access: Any
    ca_file: Path | None

    def regional_endpoint(self, region: str) -> str: ...

    def node_url(self, name: str) -> str: ...

    async def control_plane(self) -> str: ...


async def purge_as_client(cluster: ClusterAsClient, request: PurgeRequest) -> dict:
    """A purge from the control process (a scheduled one): see the module
    docstring. Through ``request.region``'s endpoint (default the home
    region's), or without routing one of its nodes."""
    region = request.region or cluster.spec.home_region
    if cluster.routing is not None:
        base = cluster.regional_endpoint(region)
    elif region == cluster.spec.home_region:
        base = cluster.node_url(await cluster.control_plane())
    else:
        names = delivery_order(cluster.plan, region)
        if not names:
            raise PurgeError(f"{region} has no replica")
        base = cluster.node_url(names[0])
    headers = {}
    if cluster.spec.auth_enabled:
        login = await cluster.access.admin_login()
        if login is None:
            raise PurgeError("the admin user is disabled: a scheduled purge logs in as it "
                             "(georeg registry update --admin-enabled true)")
        headers = login.headers()
    tls = client_context(cluster.ca_file) if base.startswith("https:") else None
    return (await run_purge(base, headers, request, time.time(), tls)).as_dict()
