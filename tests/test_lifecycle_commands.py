"""Retention, purge and schedules on a running cluster of three regions:
eastus (home), westeurope and brazilsouth (confined): ``georeg registry
retention`` and its management API, bad input refused with nothing changed;
retention deleting the same manifests in every region while brazilsouth's
content never leaves it, ``georeg verify`` clean after. The rules themselves
are tested on one in-process node in ``test_retention``; purge's and the
scheduler's decisions without a cluster in ``test_purge`` and
``test_schedules``.
"""

from __future__ import annotations

import json

import pytest

from cluster.control import spec as specs
from cluster.testing import RunningCluster

from .helpers import make_image, push_image, verified_clean
from .test_cluster import georeg

SPEC = specs.ClusterSpec(
    registry="georeglife", tier="Premium", home_region="eastus", paired_copies=False,
    replicas=(specs.ReplicaSpec("westeurope"), specs.ReplicaSpec("brazilsouth")),
    schedules=(specs.ScheduleSpec("hourly-purge", "0 * * * *",
                                  "purge --filter 'sched/app:.*' --ago 0d --untagged"),))
REGIONS = ("eastus", "westeurope", "brazilsouth")


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("lifecycle")) as running:
        yield running


def cli(c: RunningCluster, *args: str):
    done = georeg(*args, data_dir=c.data_dir)
    return done.returncode, done.stdout, done.stderr


def api(c: RunningCluster, method: str, path: str, body: dict | None = None):
    return c.management_api(method, path, body)


def test_retention_days_out_of_range_are_refused_and_nothing_changes(c):
    before = api(c, "GET", "/georeg/v1/registry/retention")
    assert before == (200, {"type": "UntaggedManifests", "days": 7, "status": "disabled",
                            "enabledSince": None})
    for days in ("-1", "366", "x"):
        code, _, err = cli(c, "registry", "retention", "update", "--days", days,
                           "--status", "enabled")
        assert code == 2 and "0 to 365" in err, (days, err)
    for body in ({"days": 366}, {"days": -1}, {"days": "x"}, {"days": True},
                 {"status": "on"}, {"days": 1, "kind": "x"}, {}):
        status, answer = api(c, "PATCH", "/georeg/v1/registry/retention", body)
        assert status == 400, (body, answer)
    assert api(c, "GET", "/georeg/v1/registry/retention") == before


def test_retention_deletes_the_same_manifests_in_every_region(c):
    code, out, err = cli(c, "registry", "retention", "update", "--days", "0",
                         "--status", "enabled")
    assert code == 0, err
    assert "enabled" in out
    policy = json.loads(cli(c, "registry", "retention", "show", "--json")[1])
    assert policy["days"] == 0 and policy["status"] == "enabled" and policy["enabledSince"]
    # The policy is the control plane's: a move below Premium is refused while it is on, the
    # generic configuration route neither sets it nor, writing the registry object, drops it.
    status, answer = api(c, "PATCH", "/georeg/v1/registry", {"sku": "Standard"})
    assert status == 409 and "retention policy" in answer["error"]["message"]
    status, answer = api(c, "PUT", "/georeg/v1/configuration/registry/default",
                         {"retention_days": 1})
    assert status == 400 and "georeg registry retention update" in answer["error"]["message"]
    assert api(c, "PUT", "/georeg/v1/configuration/registry/default",
               {"admin_enabled": True})[0] == 200
    assert api(c, "GET", "/georeg/v1/registry/retention")[1] == policy

    async def push_and_move() -> dict[str, tuple[str, str]]:
        """In each region, push ``life:v1`` twice: (untagged, still tagged)."""
        out = {}
        async with c.http() as http:
            for seed, region in enumerate(REGIONS):
                base = c.regional_endpoint(region)
                old = await push_image(http, base, "life", make_image(seed=100 + seed),
                                       tag=f"v-{region}")
                new = await push_image(http, base, "life", make_image(seed=200 + seed),
                                       tag=f"v-{region}")
                out[region] = (old, new)
        return out

    pushed = c.run(push_and_move)

    async def push_cross(region: str, seed: int) -> str:
        async with c.http() as http:
            return await push_image(http, c.regional_endpoint(region), "life",
                                    make_image(seed=seed), tag="cross")

    # A tag moved off a manifest by a push in another region: the note that it is
    # untagged is written on its own region's node when that move replicates there.
    crossed = c.run(lambda: push_cross("eastus", 300))
    c.wait_for(lambda: tags_everywhere(c, "life")["westeurope"] >= {"cross"},
               what="life:cross in westeurope")
    moved = c.run(lambda: push_cross("westeurope", 301))
    c.wait_for(lambda: c.run(lambda: tag_digest(c, "eastus", "life", "cross")) == moved,
               what="the move of life:cross in eastus")
    reports = c.run(lambda: c.cluster.lifecycle.sweep_once(settleSeconds=0))
    for region in REGIONS:
        expected = {pushed[region][0]} | ({crossed} if region == "eastus" else set())
        assert {d["digest"] for d in reports[region]["deleted"]} == expected, reports

    async def held(region: str, digest: str) -> bool:
        async with c.http() as http:
            url = f"{c.node_url(region)}/v2/life/manifests/{digest}"
            async with http.head(url, headers=c.internal_headers()) as r:
                return r.status == 200

    def converged() -> bool:
        for region in REGIONS:
            for origin in REGIONS:
                old, new = pushed[origin]
                visible = origin == region or origin != "brazilsouth"
                if c.run(lambda r=region, d=old: held(r, d)) \
                        or c.run(lambda r=region, d=new: held(r, d)) != visible:
                    return False
        return True

    c.wait_for(converged, timeout=30, what="the same manifests deleted in every region")
    # brazilsouth's content never reached the others, before or after its delete.
    verified_clean(c)
    metrics = c.run(lambda: _metrics(c, "brazilsouth"))
    assert "georeg_retention_manifests_deleted_total 1.0" in metrics
    # Off again: the control process's own sweep (every 60 s) must not act on later tests.
    assert cli(c, "registry", "retention", "update", "--status", "disabled")[0] == 0


async def _metrics(c: RunningCluster, node: str) -> str:
    async with c.http() as http:
        async with http.get(f"{c.node_url(node)}/metrics", headers=c.internal_headers()) as r:
            return await r.text()


async def tag_digest(c: RunningCluster, node: str, repo: str, tag: str) -> str | None:
    async with c.http() as http:
        async with http.head(f"{c.node_url(node)}/v2/{repo}/manifests/{tag}",
                             headers=c.internal_headers()) as r:
            return r.headers.get("Docker-Content-Digest") if r.status == 200 else None


def tags_everywhere(c: RunningCluster, repo: str) -> dict[str, set[str]]:
    async def tags(region: str) -> set[str]:
        async with c.http() as http:
            async with http.get(f"{c.node_url(region)}/v2/{repo}/tags/list",
                                headers=c.internal_headers()) as r:
                return set((await r.json())["tags"] or []) if r.status == 200 else set()
    return {region: c.run(lambda r=region: tags(r)) for region in REGIONS}


def test_purge_deletes_what_it_says_through_the_data_plane_and_it_replicates(c):
    async def push() -> dict[str, str]:
        async with c.http() as http:
            base = c.regional_endpoint("eastus")
            return {tag: await push_image(http, base, "purge/app", make_image(seed=300 + i),
                                          tag=tag)
                    for i, tag in enumerate(["old1", "old2", "keep"])}

    pushed = c.run(push)
    c.wait_for(lambda: tags_everywhere(c, "purge/app")["westeurope"] == {"old1", "old2", "keep"},
               what="the tags in westeurope")
    for args, why in [(("--filter", "purge/app:(", "--ago", "0d"), "does not compile"),
                      (("--filter", "purge/app:old.*", "--ago", "1y"), "is a duration"),
                      (("--filter", "purge/nope:.*", "--ago", "0d"), "no repository matches")]:
        code, _, err = cli(c, "purge", *args)
        assert code == 2 and why in err, (args, err)
    code, out, err = cli(c, "purge", "--filter", "purge/app:old.*", "--ago", "0d", "--untagged",
                         "--dry-run")
    assert code == 0, err
    assert "would delete tag purge/app:old1" in out and "nothing deleted" in out
    assert tags_everywhere(c, "purge/app")["eastus"] == {"old1", "old2", "keep"}
    code, out, err = cli(c, "purge", "--filter", "purge/app:old.*", "--ago", "0d", "--untagged",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert sorted(report["tagsDeleted"]) == ["purge/app:old1", "purge/app:old2"]
    assert sorted(report["manifestsDeleted"]) == sorted(
        f"purge/app@{pushed[t]}" for t in ("old1", "old2"))
    c.wait_for(lambda: all(t == {"keep"} for t in tags_everywhere(c, "purge/app").values()),
               what="the purge replicated to every region")


def test_a_scheduled_purge_runs_in_the_control_process_and_its_run_is_listed(c):
    async def push() -> None:
        async with c.http() as http:
            await push_image(http, c.regional_endpoint("eastus"), "sched/app",
                             make_image(seed=400), tag="v1")

    c.run(push)
    listed = json.loads(cli(c, "schedule", "list", "--json")[1])
    assert [(s["name"], s["lastRun"]) for s in listed] == [("hourly-purge", None)]
    assert listed[0]["nextRun"].endswith(":00:00Z")
    code, out, err = cli(c, "schedule", "run", "hourly-purge")
    assert code == 0, (out, err)
    listed = json.loads(cli(c, "schedule", "list", "--json")[1])
    last = listed[0]["lastRun"]
    assert last["result"] == "Succeeded" and last["detail"]["tagsDeleted"] == ["sched/app:v1"]
    code, out, _ = cli(c, "schedule", "list")
    assert code == 0 and "hourly-purge" in out and "Succeeded" in out
    assert cli(c, "schedule", "run", "nope")[0] == 2


def test_retention_waits_while_a_region_cannot_be_asked(c):
    """A region's sweep that cannot reach any of its nodes says so and deletes nothing."""
    c.crash("westeurope")
    try:
        reports = c.run(lambda: c.cluster.lifecycle.sweep_once(settleSeconds=0))
        assert "error" in reports["westeurope"] and "eastus" in reports
    finally:
        c.restart("westeurope")

