"""The registry's soft delete policy, after ``az acr config soft-delete show |
update``: ``status`` (enabled / disabled) and ``retentionDays`` (1 to 90,
default 7). It is a field of the registry object (``registry/default``,
``registry_node.configuration``), read and written through the home region
like ``--sku``, and replicated to every node, which decides by what it holds
whether the deletes it takes go to the recycle bin (``registry_node.recycle_bin``).

Unlike ACR, georeg allows the policy on a geo-replicated registry and beside
the retention policy (docs/soft-delete.md says how the two meet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from registry_node.recycle_bin import DEFAULT_DAYS, MAX_DAYS, MIN_DAYS

from .errors import ClusterError

if TYPE_CHECKING:                      # a Cluster is handed in; it never imports this module
    from .cluster import Cluster

_STATUSES = ("enabled", "disabled")


def _shown(stored: dict) -> dict:
    policy = stored.get("soft_delete") or {}
    return {"status": "enabled" if policy.get("enabled") else "disabled",
            "retentionDays": policy.get("days", DEFAULT_DAYS)}


def parse(body: dict) -> dict:
    """``{"status", "retentionDays"}`` (either) checked, as the changes to make."""
    unknown = sorted(set(body) - {"status", "retentionDays"})
    if unknown or not body:
        raise ClusterError('send {"status": "enabled"|"disabled", "retentionDays": '
                           f'{MIN_DAYS}..{MAX_DAYS}}}'
                           + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    changes: dict = {}
    if "status" in body:
        status = body["status"]
        if not isinstance(status, str) or status.lower() not in _STATUSES:
            raise ClusterError(f"status is enabled or disabled, not {str(status)[:32]!r}")
        changes["enabled"] = status.lower() == "enabled"
    if "retentionDays" in body:
        days = body["retentionDays"]
        if isinstance(days, bool) or not isinstance(days, int) or not MIN_DAYS <= days <= MAX_DAYS:
            raise ClusterError(f"retentionDays is a whole number of days from {MIN_DAYS} to "
                               f"{MAX_DAYS}, not {str(days)[:32]!r}")
        changes["days"] = days
    return changes


async def show(cluster: Cluster) -> dict:
    return _shown(await cluster.registry_object())


async def update(cluster: Cluster, body: dict) -> dict:
    """Change what ``body`` names; the rest keeps its value (the registry
    object's one read-modify-write, ``Cluster.update_registry_object``)."""
    changes = parse(body)

    async def policy(_home: str, current: dict) -> dict:
        return {"soft_delete": {"enabled": False, "days": DEFAULT_DAYS,
                                **(current.get("soft_delete") or {}), **changes}}

    return _shown(await cluster.update_registry_object(policy))
