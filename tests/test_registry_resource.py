"""The registry resource on running clusters: its tier as live configuration
(``georeg registry update --sku``, through the CLI and the management API),
``show-usage`` against what ``georeg verify`` counts, the spec's
``storage_limit`` met by a real client, and ``check-health`` on a healthy
cluster and with a region crashed.

Two small clusters, one per module fixture: ``basic`` (one Basic region,
eastus, which a test takes to Premium and back, adding and deleting a
replica) and ``premium`` (zone-redundant eastus, and brazilsouth, confined;
a storage limit of ``LIMIT`` and a short GC grace). Each test leaves its
cluster as it found it. The decision rules of a tier change, every reason
included, are tested without a cluster in ``test_sku``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request

import msgspec
import pytest

from cluster.control import management_client, soft_delete
from cluster.control import spec as specs
from cluster.control.errors import ClusterError
from cluster.control.state import saved_spec
from cluster.testing import RunningCluster
from registry_node import tiers

from .helpers import Skopeo, digest_of, eventually, make_image, push_image, write_oci_layout
from .test_cluster import georeg

BASIC = specs.ClusterSpec(registry="georegbasic", tier="Basic", home_region="eastus",
                          paired_copies=False, limits=specs.LimitsSpec(limits="tier"))
LIMIT = 64 * 1024
GC_GRACE_S = 2
PREMIUM = msgspec.structs.replace(specs.ClusterSpec(
    registry="georegpremium", tier="Premium", home_region="eastus", home_zone_redundant=True,
    paired_copies=False, replicas=(specs.ReplicaSpec("brazilsouth"),)),
    limits=specs.LimitsSpec(storage_limit=f"{LIMIT // 1024}KiB"))


@pytest.fixture(scope="module")
def basic(tmp_path_factory):
    with RunningCluster(BASIC, tmp_path_factory.mktemp("basic")) as c:
        yield c


@pytest.fixture(scope="module")
def premium(tmp_path_factory):
    with RunningCluster(PREMIUM, tmp_path_factory.mktemp("premium"),
                        node_args=("--gc-grace", str(GC_GRACE_S), "--gc-interval", "0.5")) as c:
        yield c


def cli(c: RunningCluster, *args: str):
    done = georeg(*args, data_dir=c.data_dir)
    return done.returncode, done.stdout, done.stderr


def ok(c: RunningCluster, *args: str):
    code, out, err = cli(c, *args)
    assert code == 0, (args, out, err)
    return json.loads(out) if out.lstrip()[:1] in ("{", "[") else out


def api(c: RunningCluster, method: str, path: str, body: dict | None = None):
    return c.management_api(method, path, body)


def on_node(c: RunningCluster, node: str, path: str) -> dict | None:
    """GET a node's internal route, as the cluster itself; None if it does not answer 200."""
    request = urllib.request.Request(f"{c.node_url(node)}{path}", headers=c.internal_headers())
    try:
        with management_client.open_direct(request, 10) as r:
            return json.load(r)
    except OSError:
        return None


def tier_limits_on(c: RunningCluster, node: str) -> tuple[dict | None, float | None]:
    """The request rates per minute and the download budget (bytes/s) ``node``
    runs with, as it reports them (None: it does not answer)."""
    throttle = on_node(c, node, "/georeg/v1/throttle")
    request = urllib.request.Request(f"{c.node_url(node)}/metrics", headers=c.internal_headers())
    try:
        with management_client.open_direct(request, 10) as r:
            metrics = r.read().decode()
    except OSError:
        return None, None
    download = next(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith('georeg_bandwidth_limit_bytes_per_second{direction="download"'))
    return (throttle or {}).get("limits", {}).get("per_minute"), download


def sku_held(c: RunningCluster, node: str) -> str | None:
    held = on_node(c, node, "/georeg/v1/configuration/registry/default")
    return (held or {}).get("value", {}).get("sku")


# -- a tier recorded at a restart (first: no module cluster is running yet) --------------------


def test_a_registry_that_ran_as_the_default_tier_records_a_lower_one_only_if_it_may_move_down(
        tmp_path):
    """A registry started with the default tier (Premium) records none; started
    again with ``tier = "Basic"``, recording Basic is a move down, refused for
    what Basic forbids: the start fails with the reasons, nothing is written."""
    spec = specs.ClusterSpec(registry="georegdefault", home_region="eastus", paired_copies=False)
    assert spec.tier == tiers.DEFAULT_TIER
    with RunningCluster(spec, tmp_path) as c:
        c.run(lambda: c.cluster.update_registry(anonymous_pull_enabled=True))
        assert sku_held(c, "eastus") == ""         # the registry is written, its tier never
    lower = RunningCluster(msgspec.structs.replace(spec, tier="Basic"), tmp_path)
    try:
        with pytest.raises(ClusterError) as refused:
            lower.start()
    finally:
        lower.stop()
    assert ("the registry cannot move from Premium to Basic: the Basic tier has no anonymous "
            "pull and it is enabled") in str(refused.value)
    # Nothing was recorded: started as it ran, it still holds no tier.
    with RunningCluster(spec, tmp_path) as c:
        assert sku_held(c, "eastus") == ""         # the registry is written, its tier never
        assert c.run(c.cluster.registry_properties)["anonymousPullEnabled"] is True


# -- the tier, live --------------------------------------------------------------------------


async def test_basic_to_premium_allows_a_replica_at_once_and_premium_refuses_to_move_down_while_it_exists(
        basic):
    c = basic
    assert ok(c, "registry", "show", "--json")["sku"] == {"name": "Basic", "tier": "Basic"}
    # Recorded at the first start: every node reads the registry's tier.
    assert sku_held(c, "eastus") == "Basic"
    # [limits] limits = "tier": the node runs with Basic's request rates and bandwidth.
    basic_rates = {"read": 10_000, "write": 2_000, "delete": 1_000, "referrers": 500}
    assert tier_limits_on(c, "eastus") == (basic_rates, 30e6)
    code, _, err = cli(c, "replication", "create", "--location", "westeurope")
    assert code == 2 and "geo-replication needs the Premium tier" in err, err

    pid = c.cluster.nodes()["eastus"].pid
    assert ok(c, "registry", "update", "--sku", "premium") and \
        ok(c, "registry", "show", "--json")["sku"]["name"] == "Premium"
    await eventually(lambda: sku_held(c, "eastus") == "Premium", what="the tier on eastus")
    # ... and Premium's from now on, without a restart.
    premium_rates = {"read": 20_000, "write": 4_000, "delete": 4_000, "referrers": 2_000}
    await eventually(lambda: tier_limits_on(c, "eastus") == (premium_rates, 100e6),
                     what="Premium's limits on eastus")
    ok(c, "replication", "create", "--location", "westeurope")     # no restart needed
    assert c.cluster.nodes()["eastus"].pid == pid
    await eventually(lambda: sku_held(c, "westeurope") == "Premium", timeout=30,
                     what="the new replica holding the tier")

    code, _, err = cli(c, "registry", "update", "--sku", "Standard")
    assert code == 2, err
    assert ("the registry cannot move from Premium to Standard: geo-replication needs the Premium "
            "tier and this registry has replicas in westeurope: delete them first") in err
    # ARM's whole sku object, as `registry show` prints it, is taken too.
    status, answer = api(c, "PATCH", "/georeg/v1/registry",
                         {"sku": {"name": "Basic", "tier": "Basic"}})
    assert status == 409 and answer["error"]["code"] == "Conflict", answer
    assert "has replicas in westeurope" in answer["error"]["message"]
    assert ok(c, "registry", "show", "--json")["sku"]["name"] == "Premium"     # unchanged
    assert sku_held(c, "eastus") == "Premium"

    ok(c, "replication", "delete", "--name", "westeurope")
    status, answer = api(c, "PATCH", "/georeg/v1/registry", {"sku": {"name": "Basic"}})
    assert status == 200 and answer["sku"]["name"] == "Basic", answer
    assert c.cluster.spec.tier == "Basic" and saved_spec(c.data_dir).tier == "Basic"
    await eventually(lambda: tier_limits_on(c, "eastus") == (basic_rates, 30e6),
                     what="Basic's limits on eastus again")
    status, answer = api(c, "PATCH", "/georeg/v1/registry", {"sku": "Gold"})
    assert status == 400 and "is not one of Basic, Standard, Premium" in answer["error"]["message"]
    status, answer = api(c, "PATCH", "/georeg/v1/registry",
                         {"sku": {"name": "Premium", "tier": "Basic"}})
    assert status == 400 and "sku.name 'Premium' and sku.tier 'Basic' differ" in \
        answer["error"]["message"], answer


def test_a_move_down_is_refused_while_the_registry_holds_more_than_the_lower_tier_allows(basic):
    c = basic
    ok(c, "registry", "update", "--sku", "Standard")
    for name in ("hook1", "hook2", "hook3"):
        ok(c, "webhook", "create", "-n", name, "--uri", "https://hooks.example/x",
           "--actions", "push")
    ok(c, "registry", "update", "--anonymous-pull-enabled", "true")
    code, _, err = cli(c, "registry", "update", "--sku", "Basic")
    assert code == 2, err
    assert "the registry cannot move from Standard to Basic: " in err
    assert "the Basic tier allows 2 webhooks and this registry has 3: delete 1 first" in err
    assert "the Basic tier has no anonymous pull and it is enabled: disable it first" in err
    status, answer = api(c, "PATCH", "/georeg/v1/registry", {"sku": "Basic"})
    assert status == 409 and "allows 2 webhooks" in answer["error"]["message"], answer
    # One reason gone, the other still refuses.
    ok(c, "webhook", "delete", "-n", "hook3")
    code, _, err = cli(c, "registry", "update", "--sku", "Basic")
    assert code == 2 and "anonymous pull" in err and "webhooks" not in err, err
    # Both in one update: anonymous pull off and the tier down.
    shown = ok(c, "registry", "update", "--sku", "Basic", "--anonymous-pull-enabled", "false")
    assert "Basic" in shown
    code, _, err = cli(c, "registry", "update", "--anonymous-pull-enabled", "true")
    assert code == 2 and "anonymous pull needs the Standard or Premium tier; this registry is " \
                         "Basic" in err, err
    # The counted limits follow the live tier: a third webhook is refused on Basic.
    code, _, err = cli(c, "webhook", "create", "-n", "hook3", "--uri", "https://hooks.example/x",
                       "--actions", "push")
    assert code == 2 and "Quota exceeded for resource type webhooks for the registry SKU " \
                         "Basic: the Basic tier allows 2 webhooks" in err, err
    for name in ("hook1", "hook2"):
        ok(c, "webhook", "delete", "-n", name)


def test_show_usage_on_a_basic_registry_has_acr_s_shape_and_limits(basic):
    c = basic
    usage = ok(c, "registry", "show-usage", "--json")
    assert [e["name"] for e in usage["value"]] == ["Size", "Webhooks", "ScopeMaps", "Tokens"]
    assert usage["value"][0] == {"name": "Size", "currentValue": 0, "limit": 10 * tiers.GiB,
                                 "unit": "Bytes"}
    assert usage["value"][1] == {"name": "Webhooks", "currentValue": 0, "limit": 2,
                                 "unit": "Count"}
    assert usage["storage"]["limit_bytes"] == 40 * tiers.TiB
    table = ok(c, "registry", "show-usage")
    assert "Size" in table and "10.0 GiB" in table


# -- storage: once per registry, and the limit -------------------------------------------------


def counts_match(usage: dict, report) -> None:
    for node, held in usage["replicas"].items():
        counted = report.counts[node]
        assert (held["blobs"], held["manifests"], held["bytes"]) == (
            counted["blobs"], counted["manifests"],
            counted["blob_bytes"] + counted["manifest_bytes"] + counted["recycled_bytes"]), (
            node, held, counted)


def test_a_move_to_standard_and_enabling_retention_at_once_leave_one_of_them(basic):
    """``--sku Standard`` and ``retention update --status enabled`` started
    together on a Premium registry without replicas (the move first, in one
    event loop): each checks the other's field inside the registry object's
    one read-modify-write, so one is refused and the registry never ends
    Standard with retention on (retention review finding 5)."""
    c, cluster = basic, basic.cluster
    c.run(lambda: cluster.update_registry(sku="Premium"))

    async def both():
        return await asyncio.gather(cluster.update_registry(sku="Standard"),
                                    cluster.lifecycle.update_retention(status="enabled"),
                                    return_exceptions=True)

    moved, enabled = c.run(both)
    try:
        stored = c.run(cluster.registry_object)
        assert (stored["sku"], stored.get("retention_enabled", False)) in (
            ("Standard", False), ("Premium", True)), (moved, enabled, stored)
        assert stored["sku"] == cluster.tier
        assert isinstance(moved, Exception) != isinstance(enabled, Exception), (moved, enabled)
    finally:
        c.run(lambda: cluster.lifecycle.update_retention(status="disabled"))
        c.run(lambda: cluster.update_registry(sku="Basic"))


def test_a_generic_write_of_the_registry_object_keeps_every_policy_its_commands_set(basic):
    """``Cluster.set_configuration("registry", …)`` (``georeg config set``)
    keeps what the registry's own commands wrote — soft delete included,
    which it used to drop to its default (off) — and refuses to set it."""
    c, cluster = basic, basic.cluster
    c.run(lambda: soft_delete.update(cluster, {"status": "enabled", "retentionDays": 3}))
    try:
        c.run(lambda: cluster.set_configuration("registry", "default", {"admin_enabled": False}))
        stored = c.run(cluster.registry_object)
        assert stored["soft_delete"] == {"enabled": True, "days": 3}
        with pytest.raises(ClusterError, match="soft_delete: set by the control plane"):
            c.run(lambda: cluster.set_configuration("registry", "default",
                                                    {"soft_delete": {"enabled": False}}))
    finally:
        c.run(lambda: soft_delete.update(cluster, {"status": "disabled"}))


async def test_show_usage_counts_the_registry_once_and_each_node_as_verify_does(premium):
    c = premium
    shared, confined = make_image([9000, 7000], seed=11), make_image([5000], seed=12)
    async with c.http() as http:
        await push_image(http, c.endpoint("eastus"), "shared/app", shared, tag="v1")
        await push_image(http, c.regional_endpoint("brazilsouth"), "local/app", confined,
                         tag="v1")
    await eventually(lambda: asyncio.to_thread(lambda: c.verify(timeout=30).ok), timeout=60,
                     what="a clean verify")
    report = c.verify(timeout=30)
    usage = ok(c, "registry", "show-usage", "--json")
    counts_match(usage, report)
    assert set(usage["replicas"]) == {"eastus-1", "eastus-2", "eastus-3", "brazilsouth"}
    # Once: what every region shares, plus what brazilsouth keeps to itself.
    expected = sum(len(b) for b in (*shared.blobs, shared.manifest, *confined.blobs,
                                    confined.manifest))
    size = next(e for e in usage["value"] if e["name"] == "Size")
    assert size == {"name": "Size", "currentValue": expected, "limit": 500 * tiers.GiB,
                    "unit": "Bytes"}
    assert usage["storage"]["bytes"] == expected and "brazilsouth" in usage["storage"]["rule"]
    assert usage["storage"]["limit_bytes"] == LIMIT
    assert {"name": "Geo-replications", "currentValue": 2, "limit": 40, "unit": "Count"} \
        in usage["value"]
    status, answer = api(c, "GET", "/georeg/v1/registry/usages")
    assert status == 200 and answer["value"] == usage["value"]


async def test_the_storage_limit_refuses_a_real_client_keeps_nothing_and_accepts_after_delete_and_gc(
        premium, tmp_path):
    c = premium
    held = make_image([20_000], seed=21)
    async with c.http() as http:
        await push_image(http, c.endpoint("eastus"), "fill/app", held, tag="v1")
    big = make_image([LIMIT - 20_000], seed=22)        # fits alone; not beside ``held``
    layout = tmp_path / "big"
    write_oci_layout(layout, big)
    host = urllib.parse.urlsplit(c.endpoint("eastus")).netloc
    skopeo = Skopeo(tmp_path / "skopeo", host, cluster=c)
    # ``held`` everywhere first: its replication would otherwise change a
    # node's usage between the two snapshots compared below.
    await eventually(lambda: asyncio.to_thread(lambda: c.verify(timeout=30).ok), timeout=60,
                     what="a clean verify")
    before = ok(c, "registry", "show-usage", "--json")["replicas"]

    code, _, err = await skopeo.run("copy", "--quiet", "--authfile", str(skopeo.auth),
                                    "--dest-tls-verify=false", f"oci:{layout}:latest",
                                    skopeo.ref("big/app:v1"), check=False)
    assert code != 0 and "registry storage limit reached" in err, err
    # Nothing of it anywhere: no record, no file, no upload left, usage as it was.
    after = ok(c, "registry", "show-usage", "--json")["replicas"]
    assert {n: u["bytes"] for n, u in after.items()} == {n: u["bytes"] for n, u in before.items()}
    layer = digest_of(big.layers[0])
    for node in c.cluster.plan.nodes:
        assert not any(node.data_dir.joinpath("uploads").iterdir()), node.name
        assert layer not in (on_node(c, node.name, "/georeg/v1/inventory") or {})["blobs"]
    # Reads and deletes go on; once GC has reclaimed the deleted image, there is room.
    async with c.http() as http:
        async with http.get(f"{c.endpoint('eastus')}/v2/fill/app/manifests/v1",
                            headers={"Accept": held.media_type}) as r:
            assert r.status == 200
        async with http.delete(f"{c.endpoint('eastus')}/v2/fill/app/manifests/{held.digest}") as r:
            assert r.status == 202

    def reclaimed() -> bool:
        usage = ok(c, "registry", "show-usage", "--json")["replicas"]
        return all(u["bytes"] <= before[n]["bytes"] - 20_000 for n, u in usage.items())

    await eventually(lambda: asyncio.to_thread(reclaimed), timeout=30,
                     what="garbage collection reclaiming the deleted image everywhere")
    await skopeo.copy(f"oci:{layout}:latest", skopeo.ref("big/app:v1"))
    async with c.http() as http:                       # as the test found it
        async with http.head(f"{c.endpoint('eastus')}/v2/big/app/manifests/v1",
                             headers={"Accept": big.media_type}) as r:
            pushed = r.headers["Docker-Content-Digest"]
        async with http.delete(f"{c.endpoint('eastus')}/v2/big/app/manifests/{pushed}") as r:
            assert r.status == 202


def test_a_zone_redundant_premium_registry_cannot_move_down(premium):
    c = premium
    code, _, err = cli(c, "registry", "update", "--sku", "Standard")
    assert code == 2, err
    assert "has replicas in brazilsouth" in err
    assert "zone redundancy needs the Premium tier and the replica in eastus is zone redundant" \
        in err
    status, answer = api(c, "PATCH", "/georeg/v1/registry", {"sku": "Basic"})
    assert status == 409 and "zone redundant" in answer["error"]["message"], answer
    assert ok(c, "registry", "show", "--json")["sku"]["name"] == "Premium"


# -- check-health ------------------------------------------------------------------------------


async def test_check_health_passes_healthy_and_names_a_crashed_region(premium):
    c = premium
    code, out, err = cli(c, "registry", "check-health")
    assert code == 0, (out, err)
    assert out.strip().endswith("healthy")
    health = ok(c, "registry", "check-health", "--json")
    assert health["healthy"] and health["broken"] == []
    checked = {(x["check"].split(" ")[0], x["target"]) for x in health["checks"]}
    assert ("Challenge", "regional endpoint (brazilsouth)") in checked
    assert ("Fetch", "global endpoint (eastus)") in checked        # tokens, with auth
    assert ("Replica", "node eastus-2 (zone 2)") in checked
    assert all(x["status"] == "OK" for x in health["checks"]), health

    fault = c.run(lambda: c.cluster.faults.inject("region-outage", region="brazilsouth",
                                                  mode="crash"))
    try:
        code, out, err = cli(c, "registry", "check-health")
        assert code == 1, (out, err)
        assert "broken:" in out and "brazilsouth:" in out
        status, health = api(c, "GET", "/georeg/v1/registry/health")
        assert status == 200 and not health["healthy"]
        assert len(health["broken"]) == 1 and health["broken"][0].startswith("brazilsouth: ")
        failed = {(x["target"], x["code"]) for x in health["checks"] if x["status"] == "ERROR"}
        assert failed == {("regional endpoint (brazilsouth)", "CONNECTIVITY_CHALLENGE_ERROR"),
                          ("node brazilsouth", "REPLICA_UNAVAILABLE")}, health
    finally:
        c.run(lambda: c.cluster.faults.heal(fault.id))
    c.run(c.cluster.wait_ready)
    assert ok(c, "registry", "check-health", "--json")["healthy"]


def test_a_node_answers_its_usage_only_to_the_cluster(premium):
    c = premium
    with pytest.raises(urllib.error.HTTPError) as refused:
        with management_client.open_direct(
                urllib.request.Request(f"{c.node_url('brazilsouth')}/georeg/v1/usage"), 10):
            pass
    assert refused.value.code == 401
    assert [e["code"] for e in json.load(refused.value)["errors"]] == ["UNAUTHORIZED"]
    held = on_node(c, "brazilsouth", "/georeg/v1/usage")
    assert held is not None and held["limit_bytes"] == LIMIT and held["tier"] == "Premium"

