"""What a change of the registry's tier (``az acr update --sku``) needs, as a
decision on data: ``refusals(current, target, state)`` lists every reason
the change cannot be made now, each saying what to do first; empty, it can.
``Cluster.update_registry`` gathers the state (under the locks that every
change to what is counted takes) and writes the new tier through the home
region; nothing here does I/O.

The rules, after ACR ("you can move freely between tiers as long as the
tier you're switching to has the required maximum storage capacity";
geo-replication, zone redundancy, private endpoints and IP rules are
Premium's; Basic has no anonymous pull; the counted limits of
``registry_node.tiers``):

* Premium → lower: refused while geo-replicas exist (delete them first) or a
  replica is zone redundant (which, as in ACR, is chosen when a replica is
  created and cannot be turned off);
* any move down: refused while the registry holds more webhooks, tokens or
  scope maps than the target tier allows, or more storage than its
  maximum;
* → Basic: refused while anonymous pull is on;
* moves up are never refused: Basic → Premium makes replicas possible at
  once (no restart: the control plane reads the live tier).

ACR documents no message for a refused SKU change (the sources read are
cited in ``docs/tiers.md``); these are georeg's, one clause per reason.
Private endpoints and IP rules count nothing yet: georeg has neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry_node import tiers


@dataclass(frozen=True, slots=True)
class TierState:
    """What the registry holds that a tier limits."""

    geo_replicas: tuple[str, ...] = ()        # replica regions other than the home region
    zone_redundant: tuple[str, ...] = ()      # regions whose replica is zone redundant
    webhooks: int = 0
    tokens: int = 0
    scope_maps: int = 0
    anonymous_pull: bool = False
    storage_bytes: int = 0                    # the registry's size (``usage.registry_size``)
    retention_enabled: bool = False           # the retention policy (Premium only, as in ACR)


def refusals(current: str, target: str, state: TierState) -> list[str]:
    """Why ``current`` cannot become ``target`` now (empty: it can)."""
    limits = tiers.limits(target)
    out: list[str] = []
    if not limits.geo_replication:
        if state.geo_replicas:
            regions = ", ".join(state.geo_replicas)
            out.append(f"geo-replication needs the Premium tier and this registry has replicas in "
                       f"{regions}: delete them first (`georeg replication delete --name "
                       f"REGION`)")
        if state.zone_redundant:
            out.append(f"zone redundancy needs the Premium tier and the replica in "
                       f"{', '.join(state.zone_redundant)} is zone redundant, which is chosen "
                       f"when a replica is created and cannot be turned off")
    for noun, held, allowed in (("webhooks", state.webhooks, limits.webhooks),
                                ("tokens", state.tokens, limits.tokens),
                                ("scope maps", state.scope_maps, limits.scope_maps)):
        if held > allowed:
            out.append(f"the {target} tier allows {allowed:,} {noun} and this registry has "
                       f"{held:,}: delete {held - allowed:,} first")
    if state.anonymous_pull and not limits.anonymous_pull:
        out.append(f"the {target} tier has no anonymous pull and it is enabled: disable it first "
                   f"(`georeg registry update --anonymous-pull-enabled false`)")
    if state.retention_enabled and current == tiers.PREMIUM != target:
        out.append("the retention policy for untagged manifests needs the Premium tier and it "
                   "is enabled: disable it first (`georeg registry retention update --status "
                   "disabled`)")
    if state.storage_bytes > limits.maximum_storage:
        out.append(f"the registry stores {tiers.format_size(state.storage_bytes)}, more than the "
                   f"{target} tier's maximum of {tiers.format_size(limits.maximum_storage)}: "
                   f"delete images first")
    return out


def refusal_message(current: str, target: str, reasons: list[str]) -> str:
    return (f"the registry cannot move from {current} to {target}: " + "; ".join(reasons)
            + ". Nothing was changed")
