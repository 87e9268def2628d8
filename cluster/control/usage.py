"""The registry's usage, as ``az acr show-usage`` shows it, and its storage
counted once per registry: ``Cluster.usage`` asks every serving node for
the usage it keeps on write (``GET /georeg/v1/usage``, ``registry_node.usage``:
one lookup, no walk) and this module turns the answers into the report.
No I/O here but ``node_usage``.

Once per registry, without comparing digests
    Every replica holds everything its region may hold, so the replicas of a
    registry hold the same content except what residency confines to one
    region. ACR shows a geo-replicated registry's storage "for the home
    region" and counts a pushed image once against the tier however many
    replicas hold it. georeg's rule (``registry_size``): the *reference* is
    the home region unless it is confined, else the first replica region
    that is not (none: a registry of confined regions only); the registry's
    size is the reference's usage plus, for every confined region, what it
    holds beyond the reference (its usage minus the reference's, at least
    0) — content confined there, which no other region has. A region's
    usage is its first node's that answered (the zones of a region hold the
    same content).

    The rule is exact on a converged registry (what ``georeg verify``
    checks) whose confinement is by region (the default, and
    ``residency.confined_regions``). It is a snapshot: while replication is
    in flight a region may hold less than the reference, or more. A
    ``[[residency.repositories]]`` rule that confines a repository in a
    region that is not confined by default makes it a lower bound (that
    repository's bytes count only where the reference holds them). Upload
    sessions in progress are not counted (nor by ACR's billing).

The report
    ``value``: ACR's ``RegistryUsageListResult`` — ``{name, currentValue,
    limit, unit}`` for ``Size`` (bytes; the limit is the tier's *included*
    storage, as ACR's), ``Webhooks``, ``ScopeMaps``, ``Tokens`` and, on
    Premium, ``Geo-replications`` (the home replica included; the limit is
    what georeg plans, 40, since ACR documents none). IP rules and private
    endpoints are left out: georeg has neither yet. Beside it, georeg's own:
    ``storage`` (``storage_report``: the registry's size, the rule that made
    it, the maximum and the limit uploads are refused at, and a ``warning``
    when the size is past that limit) and ``replicas`` (every node's usage,
    the numbers ``georeg verify`` counts from the node's records).

The limit is a node's, the size the registry's
    Each node refuses clients' uploads against what *it* holds. Content
    confined to a region counts only on that region's nodes, and
    replication is never refused, so a registry's size counted once can
    pass the limit while every node stays under it (two confined regions
    each filling to just below it). ``storage_report`` says so rather than
    let the number pass silently; it refuses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import aiohttp

from registry_node import tiers
from registry_node.usage import StorageUsage
from replicator.residency import ResidencyPolicy

from .errors import NodeRefusal
from .spec import MAX_REPLICAS

TIMEOUT_S = 10.0


async def node_usage(http: aiohttp.ClientSession, name: str, url: str) -> dict:
    """``GET /georeg/v1/usage`` of one node; ``NodeRefusal`` (503) if it does not answer."""
    try:
        async with http.get(f"{url}/georeg/v1/usage",
                            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as r:
            if r.status == 200:
                return await r.json()
            reason = f"HTTP {r.status}"
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
    raise NodeRefusal(f"{name} did not answer: {reason}", 503, "NodeUnavailable")


def storage_of(answer: Mapping) -> StorageUsage:
    return StorageUsage(answer["blob_bytes"], answer["blobs"], answer["manifest_bytes"],
                        answer["manifests"], answer.get("recycled_bytes", 0),  # older nodes:
                        answer.get("recycled", 0))                             # no bins


def registry_size(home: str, regions: Iterable[str], by_region: Mapping[str, StorageUsage],
                  policy: ResidencyPolicy) -> tuple[int, str]:
    """The registry's storage, counted once (see the module docstring), and
    how: ``regions`` are the replica regions in the spec's order, home first;
    ``by_region`` the usage of those that answered."""
    order = list(regions)
    confined = [r for r in order if policy.confined(r, "")]
    open_regions = [r for r in order if r not in confined]
    reference = next((r for r in open_regions if r in by_region), None)
    if reference is None and open_regions:
        raise NodeRefusal(f"no node of {', '.join(open_regions)} answered: the registry's "
                          f"storage cannot be counted", 503, "RegionUnavailable")
    base = by_region[reference].bytes if reference is not None else 0
    parts = [f"{reference} {base}"] if reference is not None else []
    total = base
    for region in confined:
        if region not in by_region:
            raise NodeRefusal(f"no node of {region} (confined) answered: the registry's storage "
                              f"cannot be counted", 503, "RegionUnavailable")
        extra = max(0, by_region[region].bytes - base)
        total += extra
        parts.append(f"{region} +{extra}")
    verb = "holds" if len(confined) == 1 else "hold"
    how = (f"{reference}'s usage" if reference is not None else "nothing shared") + \
        (f" plus what {', '.join(confined)} (confined) {verb} beyond it" if confined else "")
    return total, f"{how}: {', '.join(parts)} bytes"


def storage_report(size: int, rule: str, tier: str, storage_limit: int | None) -> dict:
    """georeg's ``storage`` beside ACR's list (see the module docstring):
    ``storage_limit`` is the spec's, None for the tier's maximum."""
    limits = tiers.limits(tier)
    limit = storage_limit if storage_limit is not None else limits.maximum_storage
    report = {"bytes": size, "rule": rule, "included_bytes": limits.included_storage,
              "maximum_bytes": limits.maximum_storage, "limit_bytes": limit,
              "limit": "storage_limit" if storage_limit is not None else "tier maximum"}
    if size > limit:
        report["warning"] = (
            f"the registry stores {tiers.format_size(size)} counted once, past its limit of "
            f"{tiers.format_size(limit)}: each node refuses uploads only against what it "
            f"holds itself, and content confined to a region (or brought by replication, "
            f"which is never refused) counts on that region's nodes alone")
    return report


def usage_list(tier: str, size: int, webhooks: int, scope_maps: int, tokens: int,
               replicas: int) -> list[dict]:
    """ACR's ``value[]`` (see the module docstring)."""
    limits = tiers.limits(tier)
    value = [
        {"name": "Size", "currentValue": size, "limit": limits.included_storage, "unit": "Bytes"},
        {"name": "Webhooks", "currentValue": webhooks, "limit": limits.webhooks, "unit": "Count"},
        {"name": "ScopeMaps", "currentValue": scope_maps, "limit": limits.scope_maps,
         "unit": "Count"},
        {"name": "Tokens", "currentValue": tokens, "limit": limits.tokens, "unit": "Count"},
    ]
    if limits.geo_replication:
        value.append({"name": "Geo-replications", "currentValue": replicas,
                      "limit": MAX_REPLICAS, "unit": "Count"})
    return value
