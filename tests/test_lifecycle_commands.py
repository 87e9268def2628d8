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

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from cluster.control import management_client
from cluster.control import spec as specs
from cluster.testing import RunningCluster

from .helpers import make_image, push_image, verified_clean
from .test_cluster import georeg

SPEC = specs.ClusterSpec(registry="georeglife", tier="Premium", home_region="eastus",
                         paired_copies=False,
                         replicas=(specs.ReplicaSpec("westeurope"), specs.ReplicaSpec("brazilsouth")))
REGIONS = ("eastus", "westeurope", "brazilsouth")


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("lifecycle")) as running:
        yield running


def cli(c: RunningCluster, *args: str):
    done = georeg(*args, data_dir=c.data_dir)
    return done.returncode, done.stdout, done.stderr


def api(c: RunningCluster, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{c.management_url}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={**c.owner_headers(), "Content-Type": "application/json"})
    try:
        with management_client.open_direct(request, 60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


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
    reports = c.run(lambda: c.cluster.lifecycle.sweep_once(settleSeconds=0))
    for region in REGIONS:
        assert {d["digest"] for d in reports[region]["deleted"]} == {pushed[region][0]}, reports

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


async def _metrics(c: RunningCluster, node: str) -> str:
    async with c.http() as http:
        async with http.get(f"{c.node_url(node)}/metrics", headers=c.internal_headers()) as r:
            return await r.text()


def test_retention_waits_while_a_region_cannot_be_asked(c):
    """A region's sweep that cannot reach any of its nodes says so and deletes nothing."""
    c.crash("westeurope")
    try:
        reports = c.run(lambda: c.cluster.lifecycle.sweep_once(settleSeconds=0))
        assert "error" in reports["westeurope"] and "eastus" in reports
    finally:
        c.restart("westeurope")
        c.run(lambda: asyncio.sleep(0))
