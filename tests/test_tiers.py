"""Tiers as data, without a cluster: the decision on a tier change
(``cluster.control.sku``) for every reason it can refuse, the registry's
storage counted once (``cluster.control.usage.registry_size``) for the
shapes residency gives a registry, ACR's ``show-usage`` list, and sizes as
the spec writes them. The same rules on running clusters:
``test_registry_resource``."""

from __future__ import annotations

import pytest

from cluster.control import spec as specs
from cluster.control.errors import NodeRefusal
from cluster.control.plan import plan
from cluster.control.sku import TierState, refusals
from cluster.control.usage import registry_size, storage_report, usage_list
from registry_node import tiers
from registry_node.usage import StorageUsage
from replicator.residency import RepositoryRule, ResidencyPolicy


@pytest.mark.parametrize("current, target", [("Basic", "Standard"), ("Basic", "Premium"),
                                             ("Standard", "Premium")])
def test_a_move_up_is_never_refused(current, target):
    full = TierState(webhooks=2, tokens=100, scope_maps=100, anonymous_pull=current != "Basic",
                     storage_bytes=40 * tiers.TiB, retention_enabled=True)
    assert refusals(current, target, full) == []


def test_premium_cannot_move_down_with_replicas_or_zones():
    state = TierState(geo_replicas=("westeurope", "brazilsouth"), zone_redundant=("eastus",))
    for target in ("Standard", "Basic"):
        reasons = refusals("Premium", target, state)
        assert len(reasons) == 2, reasons
        assert reasons[0].startswith("geo-replication needs the Premium tier and this registry "
                                     "has replicas in westeurope, brazilsouth: delete them first")
        assert reasons[1].startswith("zone redundancy needs the Premium tier and the replica in "
                                     "eastus is zone redundant")
    assert refusals("Premium", "Premium", state) == []


@pytest.mark.parametrize("field, noun, basic, standard", [
    ("webhooks", "webhooks", 2, 10), ("tokens", "tokens", 100, 500),
    ("scope_maps", "scope maps", 100, 500)])
def test_a_move_down_is_refused_past_each_counted_limit_and_allowed_at_it(field, noun, basic,
                                                                          standard):
    assert refusals("Standard", "Basic", TierState(**{field: basic})) == []
    assert refusals("Standard", "Basic", TierState(**{field: basic + 1})) == [
        f"the Basic tier allows {basic:,} {noun} and this registry has {basic + 1:,}: delete 1 first"]
    assert refusals("Premium", "Standard", TierState(**{field: standard + 5})) == [
        f"the Standard tier allows {standard:,} {noun} and this registry has "
        f"{standard + 5:,}: delete 5 first"]


def test_basic_has_no_anonymous_pull_and_no_room_past_40_tib():
    assert refusals("Standard", "Basic", TierState(anonymous_pull=True)) == [
        "the Basic tier has no anonymous pull and it is enabled: disable it first "
        "(`georeg registry update --anonymous-pull-enabled false`)"]
    assert refusals("Premium", "Standard", TierState(anonymous_pull=True)) == []
    assert refusals("Premium", "Standard", TierState(storage_bytes=40 * tiers.TiB)) == []
    assert refusals("Premium", "Standard", TierState(retention_enabled=True)) == [
        "the retention policy for untagged manifests needs the Premium tier and it is enabled: "
        "disable it first (`georeg registry retention update --status disabled`)"]
    assert refusals("Premium", "Standard", TierState(storage_bytes=40 * tiers.TiB + 1)) == [
        "the registry stores 40.0 TiB, more than the Standard tier's maximum of 40.0 TiB: "
        "delete images first"]


def usage(n: int) -> StorageUsage:
    return StorageUsage(blob_bytes=n, blobs=1)


AZURE = ResidencyPolicy()          # brazilsouth and southeastasia confined


def test_storage_counts_once_what_every_region_shares_plus_what_confined_regions_keep():
    regions = ["eastus", "westeurope", "brazilsouth", "southeastasia"]
    # Converged: eastus and westeurope hold the shared 100; each confined region
    # holds them too, plus its own.
    held = {"eastus": usage(100), "westeurope": usage(100), "brazilsouth": usage(130),
            "southeastasia": usage(107)}
    size, how = registry_size("eastus", regions, held, AZURE)
    assert size == 137
    assert how == ("eastus's usage plus what brazilsouth, southeastasia (confined) hold beyond "
                   "it: eastus 100, brazilsouth +30, southeastasia +7 bytes")
    # The home region down: another region that is not confined is the reference.
    del held["eastus"]
    assert registry_size("eastus", regions, held, AZURE)[0] == 137
    # A confined region behind the reference adds nothing, never less than nothing.
    held["brazilsouth"] = usage(40)
    assert registry_size("eastus", regions, held, AZURE)[0] == 107


def test_storage_of_a_confined_home_and_of_confined_regions_only():
    # Home confined: the reference is the first region that is not.
    held = {"brazilsouth": usage(150), "eastus": usage(100)}
    assert registry_size("brazilsouth", ["brazilsouth", "eastus"], held, AZURE)[0] == 150
    # Only confined regions: they share nothing, so they add up.
    held = {"brazilsouth": usage(50), "southeastasia": usage(70)}
    size, how = registry_size("brazilsouth", ["brazilsouth", "southeastasia"], held, AZURE)
    assert size == 120 and how.startswith("nothing shared")
    # One region.
    assert registry_size("eastus", ["eastus"], {"eastus": usage(9)}, AZURE)[0] == 9
    # A policy that confines nothing: the home region's usage, as ACR shows it.
    open_policy = ResidencyPolicy(confined_regions=(),
                                  repositories=(RepositoryRule("x/*", False),))
    assert registry_size("eastus", ["eastus", "brazilsouth"],
                         {"eastus": usage(10), "brazilsouth": usage(10)}, open_policy)[0] == 10


def test_the_storage_report_warns_when_the_registry_passes_a_limit_each_node_keeps():
    # Two confined regions, each just under a 100-byte storage_limit: no node
    # refuses, the registry counted once holds 190 bytes.
    size, how = registry_size("brazilsouth", ["brazilsouth", "southeastasia"],
                              {"brazilsouth": usage(95), "southeastasia": usage(95)}, AZURE)
    report = storage_report(size, how, "Premium", 100)
    assert (report["bytes"], report["limit_bytes"], report["limit"]) == \
        (190, 100, "storage_limit")
    assert report["warning"].startswith("the registry stores 190 bytes counted once, past its "
                                        "limit of 100 bytes: each node refuses uploads only "
                                        "against what it holds itself")
    assert "warning" not in storage_report(100, how, "Premium", 100)       # at the limit
    tier_maximum = storage_report(5, how, "Basic", None)
    assert (tier_maximum["limit_bytes"], tier_maximum["limit"], "warning" in tier_maximum) == \
        (40 * tiers.TiB, "tier maximum", False)


def test_storage_cannot_be_counted_without_the_regions_it_needs():
    regions = ["eastus", "brazilsouth"]
    with pytest.raises(NodeRefusal, match="no node of brazilsouth .confined. answered") as refused:
        registry_size("eastus", regions, {"eastus": usage(1)}, AZURE)
    assert refused.value.status == 503
    with pytest.raises(NodeRefusal, match="no node of eastus answered"):
        registry_size("eastus", regions, {"brazilsouth": usage(1)}, AZURE)


def test_the_usage_list_is_acr_s_with_the_tier_s_limits():
    assert usage_list("Standard", 5, 1, 2, 3, 1) == [
        {"name": "Size", "currentValue": 5, "limit": 100 * tiers.GiB, "unit": "Bytes"},
        {"name": "Webhooks", "currentValue": 1, "limit": 10, "unit": "Count"},
        {"name": "ScopeMaps", "currentValue": 2, "limit": 500, "unit": "Count"},
        {"name": "Tokens", "currentValue": 3, "limit": 500, "unit": "Count"}]
    premium = usage_list("Premium", 0, 0, 0, 0, 3)
    assert premium[0]["limit"] == 500 * tiers.GiB
    assert premium[-1] == {"name": "Geo-replications", "currentValue": 3, "limit": 40,
                           "unit": "Count"}


def test_the_spec_takes_a_storage_limit_in_bytes_or_with_a_unit():
    assert specs.parse({"limits": {"storage_limit": "200MiB"}}).limits.storage_limit_bytes == \
        200 * 1024**2
    assert specs.parse({"limits": {"storage_limit": "1.5GB"}}).limits.storage_limit_bytes == \
        1_500_000_000
    assert specs.parse({"limits": {"storage_limit": 4096}}).limits.storage_limit_bytes == 4096
    assert specs.parse({}).limits.storage_limit_bytes is None
    for bad, says in (("lots", "is not a size"), ("10XB", "is not a size"),
                      (-1, "a size is not negative")):
        with pytest.raises(specs.SpecError, match=f"limits.storage_limit: .*{says}"):
            specs.parse({"limits": {"storage_limit": bad}})
    with pytest.raises(specs.SpecError, match="did you mean 'storage_limit'"):
        specs.parse({"limits": {"storage_limt": "1MiB"}})


def test_a_storage_limit_is_read_exactly_and_a_huge_one_is_refused_with_a_message():
    # Exact, not through a float: 2**53 + 1 bytes, and fractions of a unit.
    assert tiers.parse_size(str(2**53 + 1)) == 2**53 + 1
    assert tiers.parse_size("0.999999999999999999EiB") == 1024**6 - 2     # 1.15 bytes less
    assert tiers.parse_size("0.1KiB") == 102
    assert specs.parse({"limits": {"storage_limit": "1EiB"}}).limits.storage_limit_bytes == \
        1024**6
    for bad in ("9" * 400, "9" * 400 + "TiB", "2EiB", 1024**6 + 1, "1.000000000000000001EiB"):
        with pytest.raises(specs.SpecError, match="limits.storage_limit: .*at most 1 EiB"):
            specs.parse({"limits": {"storage_limit": bad}})


def test_the_plan_gives_serving_nodes_the_storage_limit(tmp_path):
    spec = specs.parse({"registry": "georegplan", "home_region": "eastus",
                        "replicas": [{"region": "westeurope"}],
                        "limits": {"storage_limit": "1MiB"}}).seeded(1)
    planned = plan(spec, tmp_path)
    assert {n.name: n.storage_limit for n in planned.nodes} == {"eastus": 1024**2,
                                                                "westeurope": 1024**2}
    assert all(n.storage_limit is None for n in planned.pair_copies)   # storage only
