"""Request throttling (``registry_node.throttle``, ``api.throttling``): the
buckets on an injected clock, then real ``georeg node`` processes with auth
and real clients — a pull-only identity empties its own bucket and no one
else's, ``Retry-After`` counts down, the token endpoint and ``/v2/`` draw on
the replica's reads, and a skopeo push through a small write limit meets
429s and completes.

The cluster side (the ``[limits]`` table, zone siblings sharing what they
admit, ``georeg fault throttle``, status, no failover on 429) is in
``test_faults`` and ``test_spec``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re

import aiohttp
import msgspec
import pytest
from rich.console import Console

from registry_node import throttle as throttle_module
from registry_node.config import RequestLimits
from registry_node.throttle import (
    FAULT,
    IDENTITY,
    READ,
    REPLICA,
    WRITE,
    Throttle,
    Throttled,
)
from replicator.topology import ClusterView

from .auth_helpers import (
    ADMIN_PASSWORD,
    PULL_PASSWORD,
    REGISTRY,
    SERVICE,
    auth_files,
    basic,
    identities,
    seed_configuration,
)
from .helpers import (
    NodeProcess,
    Skopeo,
    digest_of,
    eventually,
    make_image,
    push_image,
    write_oci_layout,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused(throttle: Throttle, kind: str, identity: str | None) -> Throttled:
    with pytest.raises(Throttled) as caught:
        throttle.admit(kind, identity)
    return caught.value


# -- the buckets, on an injected clock ---------------------------------------------------


def test_a_bucket_admits_its_burst_then_its_rate_and_retry_after_counts_down():
    clock = Clock()
    throttle = Throttle(RequestLimits(writes_per_min=60, per_identity_fraction=1.0, burst_s=3),
                        clock)
    for _ in range(3):                  # three seconds' worth at once
        throttle.admit(WRITE, None)
    first = refused(throttle, WRITE, None)
    assert (first.limit, first.retry_after) == (REPLICA, 1)
    clock.now += 1.0                    # one more token
    throttle.admit(WRITE, None)
    throttle = Throttle(RequestLimits(writes_per_min=6, per_identity_fraction=1.0, burst_s=1),
                        clock)
    throttle.admit(WRITE, "token:a")
    waits = []
    for _ in range(4):                  # refusals take nothing: the wait only shrinks
        waits.append(refused(throttle, WRITE, "token:a").retry_after)
        clock.now += 2.5
    assert waits == [10, 8, 5, 3]
    clock.now += 0.5
    throttle.admit(WRITE, "token:a")    # 10 s after the first
    assert throttle.refusals == {(WRITE, "token:a", REPLICA): 4}
    assert throttle.admit(READ, "token:a") is None      # reads are not limited here


def test_by_default_a_bucket_holds_a_minute_so_n_a_minute_admits_n_at_once():
    clock = Clock()
    throttle = Throttle(RequestLimits(writes_per_min=60, per_identity_fraction=1.0), clock)
    for _ in range(60):
        throttle.admit(WRITE, "token:a")
    assert refused(throttle, WRITE, "token:a").retry_after == 1
    clock.now += 600                    # idle: it refills to a minute's worth, no more
    for _ in range(60):
        throttle.admit(WRITE, "token:a")
    assert refused(throttle, WRITE, "token:a").limit == REPLICA


def test_each_identity_has_its_share_and_the_replica_its_whole():
    clock = Clock()
    throttle = Throttle(RequestLimits(reads_per_min=600, burst_s=1), clock)   # 10 a second
    for _ in range(5):
        throttle.admit(READ, "token:puller")
    assert refused(throttle, READ, "token:puller").limit == IDENTITY     # half: 5
    for _ in range(5):
        throttle.admit(READ, "admin:georegtest")                          # its own 5
    assert refused(throttle, READ, "token:third").limit == REPLICA      # the replica's 10 gone
    clock.now += 0.2                # 2 more for the replica, 1 more for each identity
    throttle.admit(READ, "token:third")
    throttle.admit(READ, "token:puller")
    # Both empty now: the identity's refills slower, and it is its wait that is told.
    last = refused(throttle, READ, "token:puller")
    assert (last.limit, round(last.wait_s, 6)) == (IDENTITY, 0.2)
    assert throttle.refused_by_kind()[READ] == 3


def test_a_fault_limits_on_top_of_the_limits_until_healed():
    clock = Clock()
    throttle = Throttle(None, clock)
    assert not throttle.active
    throttle.set_fault({WRITE: 60})
    assert throttle.active
    throttle.admit(WRITE, "token:x")
    assert refused(throttle, WRITE, "token:x").limit == FAULT
    throttle.admit(READ, "token:x")
    throttle.set_fault({})
    assert not throttle.active
    with pytest.raises(ValueError, match="not a kind"):
        throttle.set_fault({"pull": 5})


def test_zone_siblings_share_what_they_admit_so_the_replica_keeps_its_limit():
    """Three zone nodes, each with the replica's full buckets: what one admits is
    taken out of the others' once its report lands, so over time the replica
    admits its rate, not three times it."""
    clock = Clock()
    limits = RequestLimits(writes_per_min=60, burst_s=1)
    zones = [Throttle(limits, clock, shared=True) for _ in range(3)]

    def exchange() -> None:
        for sender in zones:
            debits = sender.take_debits()
            if debits:
                for other in zones:
                    if other is not sender:
                        other.debit(debits)

    admitted = 0
    for _ in range(40):                 # 10 s, a report every 0.25 s, a request to each zone
        for zone in zones:
            try:
                zone.admit(WRITE, None)
                admitted += 1
            except Throttled:
                pass
        exchange()
        clock.now += 0.25
    # 10 s at one a second, plus each zone's burst of one before the first report.
    assert 10 <= admitted <= 13
    assert zones[0].take_debits() is None           # reported, nothing left over
    alone = [Throttle(RequestLimits(writes_per_min=60, burst_s=1), clock) for _ in range(3)]
    admitted_alone = 0
    for _ in range(40):
        for zone in alone:
            try:
                zone.admit(WRITE, None)
                admitted_alone += 1
            except Throttled:
                pass
        clock.now += 0.25
    assert admitted_alone >= 30         # what sharing prevents: each zone its own limit


def test_a_sibling_report_that_is_not_one_is_refused():
    throttle = Throttle(RequestLimits(writes_per_min=60))
    for bad in ({"replica": {"write": -1}}, {"replica": {"write": "3"}}, {"replica": []},
                {"identities": {"a": {"write": 1.5}}}, {"identities": ["a"]}):
        with pytest.raises(ValueError):
            throttle.debit(bad)


def test_a_report_is_checked_whole_before_any_of_it_is_taken():
    """A report with one bad part takes nothing (it used to take its replica part
    and then refuse the rest); a count too large for the buckets' arithmetic is
    refused, not an overflow."""
    clock = Clock()
    throttle = Throttle(RequestLimits(writes_per_min=60, burst_s=10), clock)
    for bad in ({"replica": {"write": 5}, "identities": ["a"]},
                {"replica": {"write": 5}, "identities": {"a": {"write": -1}}},
                {"replica": {"write": 10**400}}, {"fault": {"write": 2**63}}):
        with pytest.raises(ValueError):
            throttle.debit(bad)
    assert throttle.describe()["tokens"][REPLICA] == {WRITE: 10.0}
    throttle.debit({"replica": {"write": 5}, "identities": {"token:a": {"write": 1}}})
    assert throttle.describe()["tokens"][REPLICA] == {WRITE: 5.0}


def test_every_rate_is_finite_and_sane_and_a_wait_is_at_most_a_day():
    """One check for every way a rate comes in: tiny rates used to be taken,
    and a wait of 1/1e-320 s overflowed Retry-After into a 500."""
    from cluster.cli.node import request_rate as cli_rate
    from cluster.faults.controller import Fault, FaultController, FaultError

    for rate in (1e-320, 0.001, float("inf"), float("nan"), 0, -1, 1e12, True, "60"):
        with pytest.raises(ValueError):
            RequestLimits(reads_per_min=rate)
        with pytest.raises(ValueError):
            Throttle().set_fault({"delete": rate})
        with pytest.raises(FaultError):
            asyncio.run(FaultController(None)._inject_throttle(
                Fault("f1", "throttle", {}, "", 0.0), "eastus", rate_per_min=rate))
    for fraction in (1e-320, 0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            RequestLimits(reads_per_min=60, per_identity_fraction=fraction)
    for burst in (float("inf"), 0, 1e300):
        with pytest.raises(ValueError):
            RequestLimits(reads_per_min=60, burst_s=burst)
    for text in ("1e-320", "inf", "nan", "0", "1e-320/s", "fast", "5/h"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_rate(text)
    assert (cli_rate("2/s"), cli_rate("0.01"), cli_rate("60/min")) == (120.0, 0.01, 60.0)
    # The slowest rate at the smallest share still tells a finite wait, capped at a day.
    clock = Clock()
    throttle = Throttle(RequestLimits(reads_per_min=0.01, per_identity_fraction=1e-6,
                                      burst_s=1), clock)
    throttle.admit(READ, "token:a")
    assert refused(throttle, READ, "token:a").retry_after == 86_400
    assert Throttled(READ, "", REPLICA, float("inf"), 0.0).retry_after == 86_400


def test_new_limits_re_rate_only_what_changed():
    """A reload of the node's view (``Throttle.configure``) used to refill every
    bucket: a free burst at every rewrite of the view."""
    clock = Clock()
    throttle = Throttle(RequestLimits(reads_per_min=60, writes_per_min=60, burst_s=10), clock)
    for _ in range(5):
        throttle.admit(READ, "token:a")
        throttle.admit(WRITE, "token:a")
    throttle.configure(RequestLimits(reads_per_min=60, writes_per_min=600, deletes_per_min=6,
                                     burst_s=10))
    tokens = throttle.describe()["tokens"][REPLICA]
    # Reads unchanged: as they were. Writes re-rated: what they held, at the new
    # rate. Deletes newly limited: a full bucket.
    assert (tokens[READ], tokens[WRITE], tokens["delete"]) == (5.0, 5.0, 1.0)
    # The identity's reads too: it used its 5, and the reload gave none back.
    assert refused(throttle, READ, "token:a").limit == IDENTITY
    clock.now += 1.0
    assert throttle.describe()["tokens"][REPLICA][WRITE] == 15.0


def test_new_limits_keep_the_command_lines_over_them():
    """``georeg node --deletes-per-min`` and the like stay over every view's limits
    (they used to be dropped at the first reload)."""
    throttle = Throttle(RequestLimits(reads_per_min=60, burst_s=10),
                        overrides={"deletes_per_min": 6.0, "burst_s": 5.0})
    assert throttle.limits == RequestLimits(reads_per_min=60, deletes_per_min=6, burst_s=5)
    throttle.configure(RequestLimits(writes_per_min=600, deletes_per_min=60))
    assert throttle.limits == RequestLimits(writes_per_min=600, deletes_per_min=6, burst_s=5)
    throttle.configure(None)            # the view's limits gone: the command line's stay
    assert throttle.limits.per_minute() == {"delete": 6}


def test_identity_buckets_go_least_recently_used(monkeypatch):
    monkeypatch.setattr(throttle_module, "MAX_IDENTITY_BUCKETS", 2)
    clock = Clock()
    throttle = Throttle(RequestLimits(reads_per_min=600, per_identity_fraction=0.1, burst_s=1),
                        clock)                          # an identity: one at once
    throttle.admit(READ, "token:a")
    throttle.admit(READ, "token:b")
    refused(throttle, READ, "token:a")                  # a used since b: b is the oldest
    throttle.admit(READ, "token:c")                     # b's bucket goes, not a's
    assert refused(throttle, READ, "token:a").limit == IDENTITY
    throttle.admit(READ, "token:b")                     # afresh


def test_refusals_are_counted_by_name_for_a_bounded_number_of_identities(monkeypatch):
    monkeypatch.setattr(throttle_module, "MAX_REFUSED_IDENTITIES", 2, raising=False)
    throttle = Throttle(RequestLimits(reads_per_min=600, per_identity_fraction=0.1, burst_s=1),
                        Clock())                        # an identity: one at once
    for name in ("token:a", "token:b", "token:c", "token:d"):
        throttle.admit(READ, name)
        assert refused(throttle, READ, name).limit == IDENTITY
    assert refused(throttle, READ, "token:a").limit == IDENTITY
    assert throttle.refusals == {(READ, "token:a", IDENTITY): 2, (READ, "token:b", IDENTITY): 1,
                                 (READ, "(other)", IDENTITY): 2}
    assert throttle.refused_by_kind()[READ] == 5


def test_a_refunded_token_is_as_if_never_taken():
    clock = Clock()
    throttle = Throttle(RequestLimits(reads_per_min=60, burst_s=2), clock, shared=True)
    throttle.admit(READ, "token:a")
    throttle.refund(READ, "token:a")
    assert throttle.take_debits() is None               # nothing to tell the siblings
    throttle.admit(READ, "token:a")                     # the identity's one token, again
    assert refused(throttle, READ, "token:a").limit == IDENTITY


def test_the_status_table_shows_what_a_node_reports_even_without_a_number():
    from cluster.cli.cluster import _throttling_table

    console = Console(file=io.StringIO(), width=200)
    _throttling_table(console, {"throttling": {"eastus": {
        "limits": {"read": None, "write": 60.0}, "per_identity_fraction": None,
        "fault": {"delete": float("nan"), "write": None}, "refused": {"read": 1},
        "refused_by_identity": {"anonymous": {"read": 1}}}}})
    out = console.file.getvalue()
    assert "eastus" in out and "? / 60 / - / -" in out


# -- real node processes --------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    return auth_files(tmp_path, "node")


async def auth_node(node_process, files, http, *limits: str):
    node = node_process("node", *files.node_args("node"), *limits)
    await seed_configuration(http, node.url, identities(), files.internal_headers())
    return node


async def throttled_count(http, node, files, **labels: str) -> float:
    async with http.get(f"{node.url}/metrics", headers=files.internal_headers()) as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("georeg_throttled_requests_total{") and all(
                f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_pull_only_identity_empties_its_own_bucket_while_another_is_unaffected(
        node_process, files, http):
    # 600 reads a minute for the replica, 300 for each identity, two seconds' burst:
    # an identity has 10 at once, the replica 20.
    node = await auth_node(node_process, files, http, "--reads-per-min", "600", "--burst", "2")
    admin = basic(REGISTRY, ADMIN_PASSWORD)
    async with aiohttp.ClientSession(headers=admin) as pusher:
        await push_image(pusher, node.url, "shared/app", make_image(seed=1), tag="v1")
    puller = basic("puller", PULL_PASSWORD)
    url = f"{node.url}/v2/shared/app/manifests/v1"
    statuses = []
    for _ in range(40):                 # far more than 10 + what refills meanwhile
        async with http.get(url, headers=puller) as r:
            statuses.append(r.status)
            if r.status == 429:
                body = await r.json()
                retry_after = r.headers["Retry-After"]
                break
    assert statuses[-1] == 429 and statuses.count(200) >= 10, statuses
    error = body["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert error["detail"]["limit"] == "identity" and error["detail"]["kind"] == "read"
    assert retry_after.isdigit() and int(retry_after) >= 1
    # The admin user's own bucket is full; the replica has what the puller left.
    for _ in range(5):
        async with http.get(url, headers=admin) as r:
            assert r.status == 200
    assert await throttled_count(http, node, files, identity="token:puller", kind="read",
                                 limit="identity") >= 1
    assert await throttled_count(http, node, files, identity=f"admin:{REGISTRY}") == 0


async def test_retry_after_counts_down_across_retries(node_process, files, http):
    # 0.6 writes a minute, the identity's share the whole of it, a burst of one:
    # one write, then a token every 100 s — far longer than the test, however
    # loaded the machine. A refused request takes none, so the wait only shrinks.
    node = await auth_node(node_process, files, http, "--writes-per-min", "0.6",
                           "--per-identity-fraction", "1", "--burst", "1")
    admin = basic(REGISTRY, ADMIN_PASSWORD)
    start = f"{node.url}/v2/countdown/app/blobs/uploads/"
    async with http.post(start, headers=admin) as r:
        assert r.status == 202
    async with http.post(start, headers=admin) as r:
        assert r.status == 429
        first = int(r.headers["Retry-After"])
    assert 1 <= first <= 100
    seen = [first]

    async def lower() -> bool:
        async with http.post(start, headers=admin) as r:
            assert r.status == 429
            seen.append(int(r.headers["Retry-After"]))
        return seen[-1] < first

    await eventually(lower, timeout=10, what="Retry-After to count down")
    assert seen == sorted(seen, reverse=True), seen


async def test_unauthenticated_requests_share_one_identitys_reads_and_leave_the_rest(
        node_process, files, http):
    """The token endpoint is charged before its login is checked, to the one
    pseudo-identity of unauthenticated requests (``anonymous``), at an
    identity's share: a flood of anonymous token requests empties that share,
    not the replica's reads, so a puller's ``GET /v2/`` is still served. ``/v2/``
    is a read of the replica; the cluster's own requests are never throttled."""
    # 0.6 reads a minute, 5000 s' burst: the replica holds 50, each identity 25,
    # refilling one per 100 s (200 s for an identity): nothing refills in the test.
    node = await auth_node(node_process, files, http, "--reads-per-min", "0.6",
                           "--burst", "5000")
    token_url = f"{node.url}/oauth2/token"
    params = {"service": SERVICE, "scope": "repository:x/app:pull"}
    statuses = []
    for _ in range(60):                 # past the replica's 50
        async with http.get(token_url, params=params) as r:
            statuses.append(r.status)
            if r.status == 429:
                error = (await r.json())["errors"][0]
                break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {401}, statuses     # no login
    assert 25 <= len(statuses) - 1 < 50, statuses
    assert error["code"] == "TOOMANYREQUESTS" and error["detail"]["limit"] == "identity"
    # An authenticated identity keeps reading: its own bucket, the replica's rest.
    puller = basic("puller", PULL_PASSWORD)
    async with http.get(f"{node.url}/v2/", headers=puller) as r:
        assert r.status == 200
    # A login is charged before it is checked: to the same pseudo-identity.
    admin = basic(REGISTRY, ADMIN_PASSWORD)
    async with http.get(token_url, params=params, headers=admin) as r:
        assert r.status == 429
    # /v2/ is a read of the same replica: the admin's reads end where the
    # replica's do (its own 25 outlast the replica's remaining 24).
    statuses = []
    for _ in range(40):
        async with http.get(f"{node.url}/v2/", headers=admin) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert r.headers["Retry-After"].isdigit()
                assert (await r.json())["errors"][0]["detail"]["limit"] == "replica"
                break
    assert statuses[-1] == 429 and 1 <= statuses.count(200) < 25, statuses
    # No credentials: authentication refuses it before throttling counts it.
    async with http.get(f"{node.url}/v2/") as r:
        assert r.status == 401
    # The cluster's own requests are never throttled.
    for _ in range(10):
        async with http.get(f"{node.url}/v2/", headers=files.internal_headers()) as r:
            assert r.status == 200
        async with http.get(f"{node.url}/georeg/v1/throttle",
                            headers=files.internal_headers()) as r:
            assert r.status == 200
            state = await r.json()
    assert state["limits"]["per_minute"] == {"read": 0.6}
    assert state["refused"]["read"] == 3        # the three 429s above, each counted once
    assert state["refused_by_identity"]["anonymous"] == {"read": 2}


async def test_a_skopeo_push_through_a_small_write_limit_meets_429s_and_completes(
        node_process, files, http, tmp_path):
    """skopeo 1.9 (containers/image 5.23) waits out a 429's Retry-After and retries
    requests without a body (POST, the upload's closing PUT, GET, HEAD), up to
    five times; a 429 on one with a body (a PATCH of the layer, the manifest PUT)
    fails the copy, which ``--retry-times`` retries whole."""
    # 300 writes a minute (5 a second), one second's burst, the identity all of it.
    node = await auth_node(node_process, files, http, "--writes-per-min", "300",
                           "--per-identity-fraction", "1", "--burst", "1")
    admin = basic(REGISTRY, ADMIN_PASSWORD)
    burst = []
    for _ in range(30):                 # the burst: far past 5 at once
        async with http.post(f"{node.url}/v2/burst/app/blobs/uploads/", headers=admin) as r:
            burst.append((r.status, r.headers.get("Retry-After")))
    assert (429, "1") in burst and burst.count((202, None)) >= 5
    before = await throttled_count(http, node, files, kind="write")

    image = make_image([1024, 1024, 1024], seed=7)
    write_oci_layout(tmp_path / "layout", image)
    host = node.url.partition("://")[2]
    skopeo = Skopeo(tmp_path / "skopeo", host)
    skopeo.auth.write_text(json.dumps({"auths": {host: {
        "auth": base64.b64encode(f"{REGISTRY}:{ADMIN_PASSWORD}".encode()).decode()}}}))
    _, _, log = await skopeo.run("copy", "--debug", "--retry-times", "3", "--authfile",
                                 str(skopeo.auth), "--dest-tls-verify=false",
                                 f"oci:{tmp_path / 'layout'}:latest", skopeo.ref("burst/app:v1"))
    # skopeo met 429s, and waited out their Retry-After before asking again.
    assert await throttled_count(http, node, files, kind="write") > before
    assert re.search(r"Too many requests to .*: sleeping for 1\.0+ seconds", log), log[-3000:]
    # (skopeo compresses the layers on the way: the manifest is its own.)
    async with http.get(f"{node.url}/v2/burst/app/manifests/v1", headers=admin) as r:
        assert r.status == 200 and len((await r.json())["layers"]) == 3


async def test_a_node_takes_new_limits_from_its_view_file_while_it_runs(tmp_path, http):
    """The plan writes each node's limits into its view; when they change (the
    spec's [limits], the registry's tier), the node takes them at once."""
    # A write every 100 minutes: no refill admits the second one; only the reload.
    view = ClusterView(name="westus", region="westus", grpc_listen="127.0.0.1:0",
                       request_limits=RequestLimits(writes_per_min=0.01, burst_s=1,
                                                    per_identity_fraction=1))
    path = tmp_path / "view.json"
    view.dump(path)
    # The command line's own limit stays over the view's, across reloads.
    node = NodeProcess(tmp_path / "node", ["--cluster", str(path),
                                           "--deletes-per-min", "30"]).start()
    try:
        start = f"{node.url}/v2/limits/app/blobs/uploads/"
        async with http.post(start) as r:
            assert r.status == 202
        async with http.post(start) as r:
            assert r.status == 429
        msgspec.structs.replace(view, request_limits=RequestLimits(writes_per_min=600)).dump(path)

        async def admitted() -> bool:
            async with http.post(start) as r:
                return r.status == 202

        await eventually(admitted, timeout=10, what="the node to take its new limits")
        async with http.get(f"{node.url}/georeg/v1/throttle") as r:
            assert (await r.json())["limits"]["per_minute"] == {"write": 600, "delete": 30}
    finally:
        node.close()


async def test_a_node_answers_rates_and_reports_past_the_bounds_400_never_500(
        node_process, http):
    """A throttling fault of 1e-320 deletes a minute used to be taken, and the
    second DELETE then overflowed Retry-After into a 500; a sibling's report with
    a count past float arithmetic was a 500, and one with a bad part was taken
    in part before it was refused."""
    node = node_process("open", "--writes-per-min", "60", "--burst", "10")
    fault = f"{node.url}/georeg/v1/faults/throttle"
    for rates in ({"delete": 1e-320}, {"delete": 1e400}, {"read": "60"}, {"pull": 60}):
        async with http.put(fault, data=json.dumps(rates)) as r:
            assert r.status == 400, rates
    async with http.get(fault) as r:
        assert await r.json() == {}
    for _ in range(2):
        async with http.delete(f"{node.url}/v2/x/app/manifests/sha256:{'0' * 64}") as r:
            assert r.status == 404
    debits = f"{node.url}/georeg/v1/throttle/debits"
    for report in ({"replica": {"write": 10**400}}, {"replica": {"write": 5}, "identities": ["a"]},
                   {"replica": {"write": 5}, "fault": {"write": 1.5}}):
        async with http.post(debits, json=report) as r:
            assert r.status == 400, report
            assert (await r.json())["errors"][0]["message"] == "bad debits"
    async with http.get(f"{node.url}/georeg/v1/throttle") as r:
        assert (await r.json())["tokens"][REPLICA] == {WRITE: 10.0}    # none of it taken


async def test_a_declined_hand_over_gives_its_read_token_back(node_process, http):
    """The hand-over path takes a read token before it reads the blob's first
    piece; one it then declines (here: the piece fails its integrity check) is
    answered by the HTTP chain, which takes its own token — the hand-over's is
    given back, so the request costs one."""
    from cluster.routing.policy import NodeEndpoint, NodeHealth, ReplicaGroup, Replicas
    from cluster.routing.proxy import RoutingProxy

    # 0.6 reads a minute, 5000 s' burst: 50 tokens, one more per 100 s.
    node = node_process("eastus", "--region", "eastus", "--reads-per-min", "0.6",
                        "--burst", "5000")
    image = make_image([1000], seed=3)
    await push_image(http, node.url, "handed/app", image, tag="v1")
    digest = digest_of(image.layers[0])
    blob_file = node.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
    raw = bytearray(blob_file.read_bytes())
    raw[-1] ^= 0xFF                     # the last segment's tag: it fails authentication
    blob_file.write_bytes(bytes(raw))
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    replicas = Replicas([ReplicaGroup("eastus", (NodeEndpoint("eastus", "eastus", "", host,
                                                              int(port)),))])
    proxy = RoutingProxy.global_endpoint("eastus", replicas, lambda _client, _replica: 0,
                                         NodeHealth())
    await proxy.start()
    try:
        async def read_tokens() -> float:
            async with http.get(f"{node.url}/georeg/v1/throttle") as r:
                return (await r.json())["tokens"][REPLICA][READ]

        before = await read_tokens()
        async with http.get(f"{proxy.url}/v2/handed/app/blobs/{digest}") as r:
            assert r.status == 404          # the HTTP chain's answer to a corrupt blob
        spent = before - await read_tokens()
        assert 0.5 < spent < 1.5, spent     # one token (refill adds 0.01 a second)
        assert proxy.handed_over == 0
    finally:
        await proxy.stop()
