"""The web dashboard (``cluster.control.dashboard``) of a real cluster (node
processes, links, endpoints and the management server; auth on, two regions): who may
see and who may change, asked of the server directly; then the page itself in
Debian's chromium driven by Playwright (the system browser through
``executable_path``; Playwright never downloads one): every region on the map,
a region outage injected from the page turning its node red within 2 s and
the heal turning it back, a viewer without fault controls, and screenshots at
1280×800 and at a phone's width (no horizontal overflow) kept in
``build/test-artifacts/dashboard/`` (or ``$GEOREG_TEST_ARTIFACTS/dashboard/``);
``docs/dashboard-outage.png`` is one of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import msgspec
import pytest

from cluster.control import spec as specs
from cluster.control.dashboard import (
    LOGIN_TOKEN_TTL_S,
    MAX_SESSIONS,
    MAX_SIGN_INS_AT_ONCE,
    MAX_STREAMS,
    MAX_STREAMS_EACH,
    OWNER,
    SESSION_TTL_S,
    UPDATE_EVERY_S,
    VIEWER,
    LagWindow,
    LinkRates,
    Sessions,
    histogram_quantile,
    link_states,
    may_watch,
    parse_lag,
)
from cluster.control.errors import TooManyRequests
from cluster.faults.chaos import Assertions, ChaosRun, Scenario, Workload
from cluster.faults.timeline import MAX_BUCKETS, decode_timeline
from cluster.network.links import Link
from cluster.testing import RunningCluster

from .helpers import eventually, make_image, push_image
from .test_cluster import georeg

SPEC = {"home_region": "westeurope", "paired_copies": False, "auth": "token",
        "replicas": [{"region": "eastus"}]}
REGIONS = ("westeurope", "eastus")
TIMELINE = {"scenario": "s", "seed": 1, "started_at": 1.0, "duration_s": 2.0, "at_s": 1.0,
            "phase": "running", "steps": [{"at_s": 0.5, "step": "t+0.5s routing(region=eastus)"}],
            "bucket_s": 1.0, "pushes": {"attempted": 1, "acknowledged": 1, "refused": 0,
                                        "indefinite": 0},
            "acknowledged": [1, 0], "errors": {}, "failovers": []}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Dashboard:
    """The cluster (in this process, real node processes) and its dashboard's addresses."""

    def __init__(self, running: RunningCluster) -> None:
        self.running = running
        self.data = running.data_dir
        self.management = running.management.url
        self.dashboard = f"{self.management}/dashboard/"
        self.owner = running.cluster.secrets.owner
        self.password = running.credentials.password


@pytest.fixture(scope="module")
def dashboard_cluster(tmp_path_factory):
    with RunningCluster(specs.parse(SPEC), tmp_path_factory.mktemp("dashboard")) as running:
        yield Dashboard(running)


@pytest.fixture(scope="module")
def viewer(dashboard_cluster):
    """An identity with the Reader role on the registry: its id and secret."""
    access = dashboard_cluster.running.cluster.access
    identity = dashboard_cluster.running.run(lambda: access.create_identity("watcher"))
    dashboard_cluster.running.run(lambda: access.create_role_assignment("Reader", identity["id"]))
    return identity["id"], identity["secret"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _session(http: aiohttp.ClientSession, base: str, body: dict) -> tuple[int, dict]:
    async with http.post(f"{base}api/session", json=body) as r:
        return r.status, await r.json()


async def test_the_server_refuses_what_a_caller_may_not_do(dashboard_cluster, viewer, http):
    base, owner = dashboard_cluster.dashboard, dashboard_cluster.owner
    # The page and its assets: anyone, and no secret in them.
    for path in ("", "static/dashboard.js", "static/dashboard.css", "static/world.json"):
        async with http.get(base + path) as r:
            assert r.status == 200, path
            text = await r.text()
        assert owner not in text and dashboard_cluster.password not in text
    async with http.get(base + "static/..%2fdashboard.py") as r:   # a file one level up
        assert r.status == 404
    # Nothing else without a credential: no state, no stream, no fault.
    for method, path in (("GET", "api/state"), ("GET", "api/events"), ("POST", "api/faults"),
                         ("DELETE", "api/faults")):
        async with http.request(method, base + path, json={"kind": "routing",
                                                           "region": "eastus"}) as r:
            assert r.status == 401, (method, path)
    assert (await _session(http, base, {"credential": "not-it"}))[0] == 401
    # The owner sees every region in one snapshot.
    async with http.get(base + "api/state", headers=_bearer(owner)) as r:
        assert r.status == 200
        state = await r.json()
    assert {g["name"] for g in state["regions"]} == set(REGIONS)
    assert state["links"] and {link["state"] for link in state["links"]} == {"ok"}

    # A viewer (an identity with Reader) watches, and the server refuses its changes.
    identity, secret = viewer
    assert (await _session(http, base, {"identity": identity, "secret": "wrong"}))[0] == 401
    # A role on the whole registry that cannot pull (AcrImageSigner) does not watch: the
    # image search would show it every repository.
    access, running = dashboard_cluster.running.cluster.access, dashboard_cluster.running
    signer = running.run(lambda: access.create_identity("signer"))
    running.run(lambda: access.create_role_assignment("AcrImageSigner", signer["id"]))

    async def signed_in() -> bool:      # the role assignment replicates to the node asked
        return (await _session(http, base, {"identity": identity, "secret": secret}))[0] == 200
    await eventually(signed_in, timeout=10, what="the viewer signing in")
    status, session = await _session(http, base, {"identity": identity, "secret": secret})
    assert session["role"] == "viewer"
    as_viewer = _bearer(session["session"])
    assert any(a["roleDefinitionName"] == "AcrImageSigner" for a in running.run(
        lambda: access.list_role_assignments(signer["id"])))       # where sign-in reads it
    assert (await _session(http, base, {"identity": signer["id"],
                                        "secret": signer["secret"]}))[0] == 401
    async with http.get(base + "api/state", headers=as_viewer) as r:
        assert r.status == 200
    for method, path in (("POST", "api/faults"), ("DELETE", "api/faults"),
                         ("DELETE", "api/faults/f1")):
        async with http.request(method, base + path, headers=as_viewer,
                                json={"kind": "routing", "region": "eastus"}) as r:
            assert r.status == 403, (method, path)
            assert (await r.json())["error"]["code"] == "Forbidden"
    async with http.get(f"{dashboard_cluster.management}/georeg/v1/faults") as r:
        assert r.status == 401
    assert not (await (await http.get(f"{dashboard_cluster.management}/georeg/v1/faults",
                                      headers=_bearer(owner))).json())   # nothing injected
    # A dashboard session is not a management credential.
    async with http.get(f"{dashboard_cluster.management}/georeg/v1/cluster",
                        headers=as_viewer) as r:
        assert r.status == 401
    async with http.post(f"{dashboard_cluster.management}/georeg/v1/dashboard/login-tokens",
                         headers=as_viewer) as r:
        assert r.status == 401
    # A scenario's timeline is the owner's to report, and must be one.
    chaos_run = f"{dashboard_cluster.management}/georeg/v1/dashboard/chaos-run"
    async with http.put(chaos_run, headers=as_viewer, json={}) as r:
        assert r.status == 401
    async with http.put(chaos_run, headers=_bearer(owner), json={"scenario": "x"}) as r:
        assert r.status == 400 and "timeline" in (await r.json())["error"]["message"]
    # Not JSON (Python writes Infinity), and too large though sent without a length.
    async with http.put(chaos_run, headers={**_bearer(owner), "Content-Type": "application/json"},
                        data=json.dumps(TIMELINE | {"duration_s": float("inf")})) as r:
        assert r.status == 400, r.status
    heavy = json.dumps(TIMELINE | {"steps": [{"at_s": 1.0, "step": "x" * 1500}] * 200}).encode()

    async def chunked():
        for at in range(0, len(heavy), 64 * 1024):
            yield heavy[at:at + 64 * 1024]
    async with http.put(chaos_run, headers=_bearer(owner), data=chunked()) as r:
        assert r.status == 413, r.status

    # A one-time login token (what `georeg dashboard --open` mints) works once.
    async with http.post(f"{dashboard_cluster.management}/georeg/v1/dashboard/login-tokens",
                         headers=_bearer(owner)) as r:
        assert r.status == 201
        token = (await r.json())["loginToken"]
    status, session = await _session(http, base, {"loginToken": token})
    assert status == 200 and session["role"] == "owner"
    assert (await _session(http, base, {"loginToken": token}))[0] == 401
    # The owner's streams: the first frame is a snapshot; a fifth stream of one sign-in is
    # refused; signing out ends the session and every stream it holds.
    as_owner = _bearer(session["session"])
    streams = [await http.get(base + "api/events", headers=as_owner)
               for _ in range(MAX_STREAMS_EACH)]
    try:
        assert streams[0].headers["Content-Type"].startswith("text/event-stream")
        frame = await streams[0].content.readuntil(b"\n\n")
        assert frame.startswith(b"data: ")
        assert {g["name"] for g in json.loads(frame[6:])["regions"]} == set(REGIONS)
        async with http.get(base + "api/events", headers=as_owner) as r:
            assert r.status == 429, r.status
        async with http.delete(base + "api/session", headers=as_owner) as r:
            assert r.status == 204
        for stream in streams:      # the rest of each stream, then its end: within seconds
            await asyncio.wait_for(stream.read(), 5)
    finally:
        for stream in streams:
            stream.close()
    async with http.get(base + "api/state", headers=as_owner) as r:
        assert r.status == 401

    # A viewer's stream ends when its identity loses the role that let it watch.
    dashboard_cluster.running.management.dashboard.verify_every_s = 0.0
    async with http.get(base + "api/events", headers=as_viewer) as r:
        assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
        assignment = access.assignment_id("Reader", identity)
        running.run(lambda: access.delete_role_assignment(assignment))
        await asyncio.wait_for(r.read(), 10)
    async with http.get(base + "api/state", headers=as_viewer) as r:
        assert r.status == 401
    running.run(lambda: access.create_role_assignment("Reader", identity))   # the browser test's


async def test_a_fault_made_elsewhere_wakes_the_streams_at_once(dashboard_cluster, http):
    """A fault injected and healed through the management API (what `georeg fault`
    and a scenario call), not the page: with the stream's own tick an hour apart, only
    the fault controller telling the dashboard can bring the frames."""
    dashboard = dashboard_cluster.running.management.dashboard
    owner = _bearer(dashboard_cluster.owner)
    faults = f"{dashboard_cluster.management}/georeg/v1/faults"

    async def frame(stream: aiohttp.ClientResponse) -> dict:
        return json.loads((await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5))[6:])
    dashboard.update_every_s = 3600.0
    try:
        async with http.get(dashboard_cluster.dashboard + "api/events", headers=owner) as stream:
            assert not (await frame(stream))["faults"]
            async with http.post(faults, headers=owner,
                                 json={"kind": "routing", "region": "eastus"}) as r:
                assert r.status == 201
            assert [f["kind"] for f in (await frame(stream))["faults"]] == ["routing"]
            async with http.delete(faults, headers=owner) as r:
                assert r.status == 200
            assert not (await frame(stream))["faults"]
    finally:
        dashboard.update_every_s = UPDATE_EVERY_S


async def test_the_sign_in_bound_never_holds_back_the_owner(dashboard_cluster, viewer, http):
    """With every slot for checking an identity taken (anyone may send identities), the
    owner credential and a login token still sign in: they ask no node."""
    dashboard = dashboard_cluster.running.management.dashboard
    base, owner = dashboard_cluster.dashboard, dashboard_cluster.owner
    async with http.post(f"{dashboard_cluster.management}/georeg/v1/dashboard/login-tokens",
                         headers=_bearer(owner)) as r:
        token = (await r.json())["loginToken"]
    dashboard._signing_in = MAX_SIGN_INS_AT_ONCE
    try:
        assert (await _session(http, base, {"identity": viewer[0], "secret": viewer[1]}))[0] == 429
        for body in ({"credential": owner}, {"loginToken": token}):
            status, session = await _session(http, base, body)
            assert status == 200 and session["role"] == "owner", (sorted(body), status)
            async with http.delete(base + "api/session", headers=_bearer(session["session"])):
                pass
    finally:
        dashboard._signing_in = 0


def test_a_raising_watcher_never_breaks_fault_injection(dashboard_cluster):
    """A watcher with a bug is skipped (and logged): the fault is injected, the
    watchers after it are told, and a fault with a duration still heals itself."""
    running = dashboard_cluster.running
    faults = running.cluster.faults
    told: list[int] = []

    def broken() -> None:
        raise RuntimeError("a watcher's bug")

    def after() -> None:
        told.append(1)
    faults.watchers[:0] = [broken]
    faults.watchers.append(after)
    try:
        fault = running.run(lambda: faults.inject("routing", region="eastus", duration_s=0.3))
        assert told
        running.run(lambda: eventually(lambda: not fault.active, timeout=10,
                                       what="the fault healing itself"))
    finally:
        faults.watchers.remove(broken)
        faults.watchers.remove(after)
        running.run(faults.heal_all)


def test_pokes_bring_a_snapshot_at_once_but_not_more_than_the_floor_allows(dashboard_cluster):
    """A burst of fault changes (a flap at its quickest) makes one snapshot at once and
    the next when the floor has passed, not one each."""
    dashboard = dashboard_cluster.running.management.dashboard
    made = 0
    real = dashboard.snapshot

    def counted() -> dict:
        nonlocal made
        made += 1
        return real()

    async def burst() -> tuple[int, int]:
        dashboard.snapshot = counted
        try:
            for _ in range(20):
                dashboard._poke()
                dashboard._encoded()
            in_burst = made
            await asyncio.wait_for(dashboard._wake.wait(), 2)    # the deferred wake
            dashboard._encoded()
            return in_burst, made
        finally:
            del dashboard.snapshot
    in_burst, after = dashboard_cluster.running.run(burst)
    assert in_burst <= 1 and after >= in_burst + 1, (in_burst, after)


def test_a_run_that_stopped_reporting_is_shown_silent(dashboard_cluster):
    """A run killed mid-way: how long it has said nothing, in 5 s steps; none while it
    reports, nor once it is done."""
    dashboard = dashboard_cluster.running.management.dashboard
    try:
        for ago, phase, silent in ((12, "running", 10), (0, "running", None), (12, "done", None)):
            run = decode_timeline(json.dumps(TIMELINE | {"phase": phase}).encode())
            dashboard._chaos = (time.monotonic() - ago, msgspec.to_builtins(run))   # as kept
            assert dashboard._chaos_now()["silent_s"] == silent, (ago, phase)
    finally:
        dashboard._chaos = None


async def test_a_report_that_cannot_be_made_never_fails_the_run():
    scenario = Scenario(name="s", duration_s=1.0, steps=(), workload=Workload(),
                        assertions=Assertions())
    run = ChaosRun(scenario, "http://127.0.0.1:9")
    run.phase = "sleeping"                     # a bug: not a phase, so not a timeline
    async with aiohttp.ClientSession() as session:
        assert await run._send_timeline(session)


def test_only_a_role_that_pulls_the_whole_registry_watches():
    for role in ("Owner", "Contributor", "Reader", "AcrPush", "AcrPull"):
        assert may_watch([role]), role
    assert not may_watch(["AcrImageSigner"]) and not may_watch(["AcrDelete"])
    assert not may_watch([]) and may_watch(["AcrDelete", "AcrPull"])


def test_viewers_cannot_crowd_out_the_owner_and_streams_are_bounded(clock):
    sessions = Sessions(now=clock.monotonic)
    owner = f"Bearer {sessions.open(OWNER)['session']}"
    for _ in range(MAX_SESSIONS[VIEWER]):
        sessions.open(VIEWER, "someone")
    with pytest.raises(TooManyRequests):
        sessions.open(VIEWER, "someone")
    assert sessions.role_of(owner) == OWNER                # still signed in
    clock.advance(SESSION_TTL_S + 1)                       # expired viewers make room
    sessions.open(VIEWER, "someone")
    with contextlib.ExitStack() as held:
        for _ in range(MAX_STREAMS_EACH):
            held.enter_context(sessions.stream("a"))
        with pytest.raises(TooManyRequests):
            held.enter_context(sessions.stream("a"))
        for n in range(MAX_STREAMS - MAX_STREAMS_EACH):
            held.enter_context(sessions.stream(f"b{n}"))
        with pytest.raises(TooManyRequests):
            held.enter_context(sessions.stream("c"))
    with sessions.stream("a"):                             # released on exit
        pass


def test_sessions_and_login_tokens_expire_and_a_login_token_works_once(clock):
    sessions = Sessions(now=clock.monotonic)
    opened = sessions.open(VIEWER)
    bearer = f"Bearer {opened['session']}"
    assert sessions.role_of(bearer) == VIEWER and sessions.role_of("Bearer other") is None
    token = sessions.mint_login_token()
    clock.advance(LOGIN_TOKEN_TTL_S + 1)
    assert not sessions.redeem(token)                     # too late
    token = sessions.mint_login_token()
    assert sessions.redeem(token) and not sessions.redeem(token)
    clock.advance(SESSION_TTL_S)
    assert sessions.role_of(bearer) is None               # expired
    first = sessions.open(OWNER)["session"]
    for _ in range(MAX_SESSIONS[OWNER]):
        sessions.open(OWNER)
    assert sessions.role_of(f"Bearer {first}") is None    # the owner's oldest forgotten first


def test_lag_quantiles_from_prometheus_buckets():
    text = "\n".join([
        'georeg_replication_lag_seconds_bucket{origin_region="a",destination_region="b",'
        f'kind="{kind}",le="{le}"}} {count}'
        for kind in ("manifest_put", "blob_put", "tag_set")    # one image: one manifest
        for le, count in (("0.1", 0), ("0.2", 50), ("0.5", 99), ("1.0", 100), ("+Inf", 100))])
    assert parse_lag(text)[("a", "b")][float("inf")] == 100
    buckets = sorted(parse_lag(text)[("a", "b")].items())
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.2 + 0.3 * 25 / 49)  # inside
    assert histogram_quantile(0.9, [(0.1, 1.0), (float("inf"), 3.0)]) == pytest.approx(0.1)
    assert histogram_quantile(0.5, [(float("inf"), 0.0)]) is None


def _lag(**counts: float) -> dict:
    """One node's buckets for origin a → destination b: {le: cumulative count}."""
    les = {"l0_1": 0.1, "l0_5": 0.5, "l1": 1.0, "l5": 5.0, "inf": float("inf")}
    return {("a", "b"): {les[k]: v for k, v in counts.items()}}


def test_the_lag_window_per_node_with_one_dropping_out_and_restarting():
    window = LagWindow(window_s=60)
    fast = {"l0_1": 100, "l0_5": 100, "l1": 100, "l5": 100, "inf": 100}
    first = window.add(0, {"z1": _lag(**fast), "z2": _lag(**fast)})["a"]["b"]
    assert first["count"] == 200 and first["over"] == "start"   # totals since start, said so
    # z1 is down (not scraped); z2 sees 150 changes of 1-5 s: the window holds those.
    slow = {"l0_1": 100, "l0_5": 100, "l1": 100, "l5": 250, "inf": 250}
    window.add(5, {"z2": _lag(**fast)})
    second = window.add(10, {"z2": _lag(**slow)})["a"]["b"]
    assert second["count"] == 350          # the first scrape (200) is still in the window
    # z1 restarted: its counters began again (20 changes of 0.5-1 s since).
    restarted = {"l0_1": 0, "l0_5": 0, "l1": 20, "l5": 20, "inf": 20}
    third = window.add(15, {"z1": _lag(**restarted), "z2": _lag(**slow)})["a"]["b"]
    assert third["count"] == 370
    # A minute on, only what came in the last minute: no start totals, no negative counts.
    window.add(61, {"z1": _lag(**restarted), "z2": _lag(**slow)})
    later = window.add(62, {"z1": _lag(**restarted), "z2": _lag(**slow)})["a"]["b"]
    assert later["over"] == "window" and later["count"] == 170
    assert later["p50_ms"] == pytest.approx((1 + 4 * (85 - 20) / 150) * 1000, abs=0.1)


def _links(ab: int, ba: int) -> list[dict]:
    return [{"a": "eastus", "b": "westeurope", "bytes": [ab, ba]}]


def test_link_rates_each_way_steady_when_idle_and_reset_by_a_gap():
    rates = LinkRates(window_s=3)
    first = _links(1000, 50_000)
    rates.add(0, first)
    assert first[0]["bytes_per_s"] == [None, None] and "bytes" not in first[0]
    rates.add(1, one := _links(1600, 50_620))            # heartbeats: about 600 B/s each way
    assert one[0]["bytes_per_s"] == [600.0, 620.0]
    rates.add(2, two := _links(2250, 51_200))            # 625 and 600: within the steady band
    assert two[0]["bytes_per_s"] == [600.0, 620.0]
    rates.add(3, busy := _links(2250 + 6_000_000, 51_800))   # a transfer one way: shown at once
    assert busy[0]["bytes_per_s"] == [2_000_000.0, 620.0]
    rates.add(4, _links(2250 + 6_000_000, 52_400))
    rates.add(5, _links(2250 + 6_000_000, 53_000))
    rates.add(7, later := _links(2250 + 6_000_000, 54_200))  # the transfer left the window
    assert later[0]["bytes_per_s"] == [0.0, 620.0]
    rates.add(60, gap := _links(2250 + 6_000_000, 90_000))   # pages closed a while: no rate
    assert gap[0]["bytes_per_s"] == [None, None]
    rates.add(61, again := _links(100, 90_600))          # a link made again: its count restarted
    assert again[0]["bytes_per_s"] == [None, 600.0]


def test_link_states_put_each_links_bytes_on_the_right_way():
    """Two node links, one each way: a link's bytes out go from its source's region,
    its bytes back to it."""
    west_east = Link("westeurope-1->eastus-1", ("127.0.0.1", 1))
    east_west = Link("eastus-1->westeurope-1", ("127.0.0.1", 1))
    west_east.bytes_forwarded, west_east.bytes_back = 1000, 300
    east_west.bytes_forwarded, east_west.bytes_back = 50, 20
    cluster = SimpleNamespace(supervisor=SimpleNamespace(
        nodes={name: SimpleNamespace(plan=SimpleNamespace(region=name.split("-")[0]))
               for name in ("westeurope-1", "eastus-1")},
        links={("westeurope-1", "eastus-1"): west_east, ("eastus-1", "westeurope-1"): east_west}))
    [link] = link_states(cluster)
    assert (link["a"], link["b"]) == ("eastus", "westeurope")
    assert link["bytes"] == [30 + 300, 700 + 20]         # [eastus → westeurope, back]


def test_a_timeline_is_checked_before_it_is_shown():
    """Decoded as the route does: strict JSON (no NaN or Infinity), and in bounds."""
    assert decode_timeline(json.dumps(TIMELINE).encode()).steps[0].applied_at_s is None
    step = TIMELINE["steps"][0]
    for bad in ({"phase": "sleeping"}, {"bucket_s": 0.0}, {"acknowledged": [0] * (MAX_BUCKETS + 1)},
                {"steps": [{"at_s": "soon", "step": "x"}]}, {"extra": 1},
                {"duration_s": float("inf")}, {"steps": [step | {"at_s": float("nan")}]},
                {"acknowledged": [-1]}, {"pushes": {"attempted": 1, "more": 2}},
                {"steps": [step | {"step": "x" * 1000}]}, {"errors": {"E": [1, -2]}}):
        with pytest.raises(msgspec.DecodeError):
            decode_timeline(json.dumps(TIMELINE | bad).encode())


# -- the page in a real browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def screenshots() -> Path:
    """A known place for the screenshots (the last run's; $GEOREG_TEST_ARTIFACTS or
    build/test-artifacts in the worktree)."""
    root = os.environ.get("GEOREG_TEST_ARTIFACTS") or Path(__file__).parents[1] / "build" / \
        "test-artifacts"
    where = Path(root) / "dashboard"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    return where


async def test_the_page_in_chromium_injects_an_outage_heals_it_and_a_viewer_cannot(
        dashboard_cluster, viewer, screenshots):
    from playwright.async_api import async_playwright, expect

    opened = georeg("dashboard", "--open", data_dir=dashboard_cluster.data,
                    env={"BROWSER": "true"})             # print the URL; open no browser here
    assert opened.returncode == 0, opened.stderr
    url = opened.stdout.strip().splitlines()[0]
    assert url.startswith(f"{dashboard_cluster.dashboard}#login="), url
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
        chaos: asyncio.Task | None = None
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            started = time.monotonic()
            await page.goto(url)
            for region in REGIONS:
                await expect(page.locator(f'[data-region="{region}"]')).to_be_visible()
            await expect(page.locator("#live")).to_have_text("live")
            loaded_s = time.monotonic() - started
            # The browser's own count: navigation start to the load event (HTML, script,
            # style sheet), and to the first snapshot drawn (sign-in, world, stream).
            load_event_s = await page.evaluate(
                "performance.getEntriesByType('navigation')[0].loadEventEnd / 1000")
            drawn_s = await page.evaluate("performance.now() / 1000")
            assert "#login" not in page.url          # the token left the address bar
            await page.screenshot(path=screenshots / "dashboard-1280x800.png")
            # Three pushes show up in the image search with every replica's arrival; the
            # lag scrape runs while the partition below is injected and healed.
            node_url = dashboard_cluster.running.cluster.node_url("westeurope")
            async with dashboard_cluster.running.http() as registry:
                for seed in range(3):
                    await push_image(registry, node_url, "demo/app", make_image([512], seed=seed),
                                     tag=f"v{seed}")
            await page.fill("#image-ref", "demo/app:v2")
            await page.click("#image-form button")
            for region in REGIONS:
                await expect(page.locator(f'#image tr[data-replica="{region}"]')).to_have_attribute(
                    "data-state", "present", timeout=15000)
            await expect(page.locator("#image-summary")).to_contain_text("on every replica")

            # A partition from the page: the WAN link turns red; healed, green again.
            link = page.locator('[data-link="eastus-westeurope"]')
            await expect(link).to_have_attribute("data-state", "ok")
            await page.select_option("#fault-kind", "partition")
            await page.select_option("#fault-region", "eastus")
            await page.select_option("#fault-other", "westeurope")
            await page.click("#inject-button")
            await expect(link).to_have_attribute("data-state", "cut", timeout=2000)
            # A push while cut: eastus's replica is an image behind until the heal.
            eastus = page.locator('#replicas tr[data-sync="eastus"]')
            await expect(eastus).to_have_attribute("data-complete", "yes")
            async with dashboard_cluster.running.http() as registry:
                await push_image(registry, node_url, "demo/app", make_image([512], seed=3),
                                 tag="v3")
            await expect(eastus).to_have_attribute("data-complete", "no", timeout=5000)
            await expect(eastus.locator("td").nth(2)).to_have_text("3/4")
            await expect(page.locator('[data-region="eastus"] .sync-label')).to_have_text(
                "syncing 3/4")
            await page.click("#heal-all")
            await expect(link).to_have_attribute("data-state", "ok", timeout=2000)
            # Bytes/s each way on the link, measured over the last few seconds.
            rate = re.compile(r"^[0-9.]+ (B|kB|MB)/s$")
            for way in ("westeurope-eastus", "eastus-westeurope"):
                await expect(page.locator(f'[data-rate="{way}"]')).to_have_text(rate)
            await expect(page.locator('[data-link-label="eastus-westeurope"]')).to_have_text(
                re.compile(r"^[0-9]+ ms · [0-9.]+ (B|kB|MB)/s$"))
            # The lag heatmap has filled with numbers meanwhile (scraped while the partition
            # came and went; read before eastus's crash, which restarts its counters).
            await expect(page.locator('[data-lag="westeurope-eastus"]')).to_have_text(
                re.compile(r"^[0-9.]+ / [0-9.]+$"), timeout=15000)
            await expect(eastus).to_have_attribute("data-complete", "yes", timeout=10000)
            await expect(eastus.locator("td").nth(2)).to_have_text("4/4")   # caught up
            await page.screenshot(path=screenshots / "dashboard-after-pushes.png")

            node = page.locator('[data-region="eastus"] .node')
            await expect(node).to_have_attribute("data-health", "ok")
            await page.select_option("#fault-kind", "region-outage")
            await page.select_option("#fault-region", "eastus")
            await page.select_option("#fault-mode", "crash")
            clicked = time.monotonic()
            await page.click("#inject-button")
            await expect(node).to_have_attribute("data-health", "down", timeout=2000)
            red_after_s = time.monotonic() - clicked
            await expect(node).to_have_css("fill", "rgb(214, 45, 45)")
            await expect(eastus).to_have_attribute("data-complete", "unknown")   # none up
            await expect(page.locator("[data-fault]")).to_contain_text("eastus down")
            await page.screenshot(path=screenshots / "dashboard-region-outage.png")
            await page.click("[data-heal]")
            await expect(node).to_have_attribute("data-health", "ok", timeout=30000)
            await expect(page.locator("[data-fault]")).to_have_count(0)

            # A chaos scenario runs (pushes, a routing fault healing itself after 1 s)
            # while a viewer watches on a phone; the owner's page draws its timeline.
            scenario = Scenario(name="dashboard-demo", duration_s=2.0, steps=(
                {"at_s": 0.2, "fault": "routing", "region": "eastus", "duration_s": 1.0},),
                workload=msgspec.convert({"push_rate": 4.0, "pull_rate": 0.0, "layers": 1,
                                          "layer_size": 256, "repositories": 1,
                                          "clients": ["westeurope"]}, Workload),
                assertions=Assertions(verify=False, max_convergence_s=20.0))
            chaos = asyncio.create_task(ChaosRun(scenario, dashboard_cluster.management,
                                                 owner=dashboard_cluster.owner).run())

            # A viewer at a phone's width: the map, no fault controls, nothing wider than the screen.
            identity, secret = viewer
            phone = await browser.new_page(viewport={"width": 390, "height": 844})
            await phone.goto(dashboard_cluster.dashboard)
            await phone.fill("#identity", identity)
            await phone.fill("#secret", secret)
            await phone.click("#sign-in-form button[type=submit]")
            for region in REGIONS:
                await expect(phone.locator(f'[data-region="{region}"]')).to_be_visible()
            await expect(phone.locator("#role")).to_have_text("signed in: viewer")
            await expect(phone.locator("#inject")).to_be_hidden()
            await expect(phone.locator("#inject-button")).to_be_hidden()
            await expect(phone.locator("#read-only")).to_be_visible()
            await expect(phone.locator("#chaos-panel")).to_be_visible(timeout=10000)
            assert await phone.evaluate(
                "document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            box = await phone.locator("#map").bounding_box()
            assert box is not None and 300 <= box["width"] <= 390
            await phone.screenshot(path=screenshots / "dashboard-390-viewer.png", full_page=True)

            # A frame the page cannot parse is skipped, not the stream: the next one is drawn
            # (the phone's page again, its stream served by the test: one bad frame, one good).
            async with aiohttp.ClientSession() as http:
                async with http.get(dashboard_cluster.dashboard + "api/state",
                                    headers=_bearer(dashboard_cluster.owner)) as r:
                    state = await r.read()
            await phone.route("**/api/events", lambda route: route.fulfill(
                status=200, content_type="text/event-stream",
                body=b"data: {not json\n\ndata: " + state + b"\n\n"))
            await phone.reload()                 # the session is kept (sessionStorage)
            await expect(phone.locator("#registry")).to_contain_text(json.loads(state)["registry"])
            await phone.close()

            step = page.locator('#chaos-timeline [data-step="0"]')
            await expect(step).to_have_attribute("data-state", "applied", timeout=10000)
            fault = page.locator("#chaos-timeline [data-chaos-fault]")
            await expect(fault).to_have_attribute("data-state", "healed", timeout=10000)
            report = await asyncio.wait_for(chaos, 60)
            assert report["passed"], report["checks"]
            await expect(page.locator("#chaos-title")).to_contain_text("dashboard-demo (seed 1): "
                                                                       "passed")
            await expect(page.locator("#chaos-summary")).to_contain_text(
                f"pushes: {report['pushes']['acknowledged']} acknowledged")
            assert await page.locator("#chaos-timeline rect.acked").count() >= 1
            await page.screenshot(path=screenshots / "dashboard-chaos.png", full_page=True)
        finally:
            if chaos is not None and not chaos.done():   # failed before the run ended
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
            await browser.close()
    for name in ("dashboard-1280x800.png", "dashboard-region-outage.png",
                 "dashboard-after-pushes.png", "dashboard-390-viewer.png", "dashboard-chaos.png"):
        assert (screenshots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (screenshots / name).stat().st_size > 20_000, name   # a drawn page, not a blank one
    print(f"dashboard: load event {load_event_s:.2f}s, first snapshot drawn by {drawn_s:.2f}s "
          f"(browser clock), goto to live {loaded_s:.2f}s; outage red after {red_after_s:.2f}s; "
          f"screenshots in {screenshots}")
