"""Bandwidth per tier: blob bytes shaped, never refused (``registry_node.bandwidth``).

The budget's arithmetic runs on virtual time (no waiting); the spec's
``[limits]`` and each node's share are pure; the rest are real node processes
and real clients (aiohttp, skopeo, a routing proxy's hand-over and splice).
Elapsed times are asserted only as lower bounds derived from the configured
rate: what the shape promises whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import time

import aiohttp
import pytest

from cluster.control import spec as specs
from cluster.control.plan import plan
from cluster.routing.policy import NodeEndpoint, NodeHealth, ReplicaGroup, Replicas
from cluster.routing.proxy import RoutingProxy
from registry_node.bandwidth import Bandwidth, ByteBudget
from registry_node.config import BandwidthSettings
from replicator.service import INLINE_BLOB_MAX
from replicator.topology import ClusterView, Peer, ReplicationSettings

from .helpers import (
    NodeProcess,
    Skopeo,
    digest_of,
    eventually,
    make_image,
    push_blob,
    push_image,
    write_oci_layout,
)
from .replication_harness import free_port

MIB = 1 << 20


# -- the budget, on virtual time -------------------------------------------------------


class VirtualTime:
    """A clock that moves only when every task of ``run`` is asleep: then to
    the earliest wake-up. A budget's waits take no real time, and what a
    task sees is exactly what the arithmetic says."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), woken))
        await woken

    async def run(self, *coroutines) -> list:
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        idle = 0
        while not all(t.done() for t in tasks):
            for _ in range(50):                      # let every runnable task reach a sleep
                await asyncio.sleep(0)
            live = [s for s in self._sleepers if not s[2].done()]
            if not live:
                idle += 1
                if idle > 100:       # blocked on something other than a virtual sleep
                    raise RuntimeError("no task is runnable and none sleeps on virtual time")
                continue
            idle = 0
            heapq.heapify(live)
            self._sleepers = live
            wake, _, woken = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            woken.set_result(None)
        return [t.result() for t in tasks]


async def _pieces(total: int, piece: int = MIB):
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield os.urandom(n)
        sent += n


async def _transfer(budget: ByteBudget, vt: VirtualTime, total: int) -> tuple[float, bytes, int]:
    """Send ``total`` bytes through ``budget``: when the last was granted, the
    bytes, and the largest piece granted at once."""
    body = bytearray()
    largest = 0
    async for chunk in budget.shaped(_pieces(total)):
        body += chunk
        largest = max(largest, len(chunk))
    return vt.now, bytes(body), largest


async def test_a_budget_grants_its_rate_and_nothing_beyond_one_burst():
    vt = VirtualTime()
    budget = ByteBudget(8, clock=vt.clock, sleep=vt.sleep)       # 1,000,000 bytes/s
    assert budget.rate == 1e6 and budget.burst == budget.quantum
    [(finished, body, largest)] = await vt.run(_transfer(budget, vt, 3 * MIB))
    assert len(body) == 3 * MIB and budget.granted == 3 * MIB
    assert largest == budget.quantum == 20_000
    assert finished == pytest.approx((3 * MIB - budget.burst) / budget.rate)
    # Idle for a minute, it holds one burst, not a minute's worth.
    vt.now += 60
    start = vt.now
    [(finished, _, _)] = await vt.run(_transfer(budget, vt, MIB))
    assert finished - start == pytest.approx((MIB - budget.burst) / budget.rate)


async def test_transfers_sharing_a_budget_take_turns():
    vt = VirtualTime()
    budget = ByteBudget(8, clock=vt.clock, sleep=vt.sleep)
    (a, _, _), (b, _, _) = await vt.run(_transfer(budget, vt, 2 * MIB),
                                        _transfer(budget, vt, 2 * MIB))
    # Together at the rate of one: the last byte at 4 MiB's time ...
    assert max(a, b) == pytest.approx((4 * MIB - budget.burst) / budget.rate)
    # ... and neither first: a budget serving them one after the other would
    # finish one at half of that.
    assert min(a, b) >= (4 * MIB - 2 * budget.quantum - budget.burst) / budget.rate


async def test_a_cancelled_wait_gives_its_reservation_back():
    vt = VirtualTime()
    budget = ByteBudget(8, clock=vt.clock, sleep=vt.sleep)
    await budget.take(budget.burst)                 # the burst: granted at once
    waiting = asyncio.ensure_future(budget.take(MIB))
    for _ in range(5):
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    [_] = await vt.run(budget.take(budget.quantum))
    assert vt.now == pytest.approx(budget.quantum / budget.rate)   # as if it never asked
    assert budget.granted == budget.burst + budget.quantum


async def test_a_cancelled_wait_with_another_behind_it_keeps_the_other_s_turn():
    """Its reservation cannot be given back without moving the one made
    behind it: the budget keeps both, so the rate is never exceeded (the
    cancelled bytes are lost time, at most a transfer's quantum in use)."""
    vt = VirtualTime()
    budget = ByteBudget(8, clock=vt.clock, sleep=vt.sleep)
    await budget.take(budget.burst)
    cancelled = asyncio.ensure_future(budget.take(budget.quantum))
    behind = asyncio.ensure_future(budget.take(budget.quantum))
    for _ in range(5):
        await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await vt.run(behind)
    assert vt.now == pytest.approx(2 * budget.quantum / budget.rate)   # its turn, unmoved
    assert budget.granted == budget.burst + budget.quantum


async def test_paced_chunks_pass_whole_and_in_order():
    vt = VirtualTime()
    budget = ByteBudget(8, clock=vt.clock, sleep=vt.sleep)
    chunks = [os.urandom(n) for n in (100, 300_000, 5)]

    async def read():
        async def source():
            for chunk in chunks:
                yield chunk
        return [c async for c in budget.paced(source())]

    [passed] = await vt.run(read())
    assert passed == chunks
    assert vt.now == pytest.approx((sum(map(len, chunks)) - budget.burst) / budget.rate)


def test_unshaped_directions_have_no_budget_and_bad_rates_are_refused():
    unshaped = Bandwidth.of(BandwidthSettings())
    assert (unshaped.download, unshaped.upload) == (None, None)
    shaped = Bandwidth.of(BandwidthSettings(download_mbps=8))
    assert shaped.download.rate == 1e6 and shaped.upload is None
    for bad in (-1, 1e-300, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            BandwidthSettings(upload_mbps=bad)
    with pytest.raises(ValueError):
        ByteBudget(0)


def test_new_settings_replace_the_budgets_whose_rate_changed():
    """A tier change while the node runs (``replicator.runtime``): a direction
    turned on gets a budget, one turned off loses it, one unchanged keeps its
    budget and what it counted."""
    bandwidth = Bandwidth.of(BandwidthSettings(download_mbps=8))
    download = bandwidth.download
    download.granted = 123
    bandwidth.configure(BandwidthSettings(download_mbps=8, upload_mbps=16))
    assert bandwidth.download is download and download.granted == 123
    assert bandwidth.upload.rate == 2e6
    bandwidth.configure(BandwidthSettings(download_mbps=80, upload_mbps=16))
    assert bandwidth.download is not download and bandwidth.download.rate == 1e7
    bandwidth.configure(BandwidthSettings())
    assert (bandwidth.download, bandwidth.upload) == (None, None)


# -- the spec's [limits] and each node's share -----------------------------------------


def _shares(raw: dict, tmp_path) -> dict[str, tuple[float, float]]:
    """Each node's (download, upload) Mbit/s as its view says; a paired
    copy's under ``copy:REGION``."""
    cluster = plan(specs.parse(raw).seeded(1), tmp_path)
    named = [(n.name, n) for n in cluster.nodes] + [(f"copy:{n.copy_of}", n)
                                                    for n in cluster.pair_copies]
    return {name: (cluster.view(n).bandwidth.download_mbps, cluster.view(n).bandwidth.upload_mbps)
            for name, n in named}


def test_limits_are_off_unless_the_spec_says_so(tmp_path):
    assert set(_shares({"tier": "Basic"}, tmp_path).values()) == {(0.0, 0.0)}
    assert set(_shares({}, tmp_path).values()) == {(0.0, 0.0)}


@pytest.mark.parametrize(("tier", "down_mbyte", "up_mbyte"),
                         [("Basic", 30, 10), ("Standard", 60, 20), ("Premium", 100, 50)])
def test_the_tier_gives_acrs_older_numbers_to_its_one_node(tier, down_mbyte, up_mbyte, tmp_path):
    shares = _shares({"tier": tier, "limits": {"limits": "tier"}}, tmp_path)
    assert shares["eastus"] == (8 * down_mbyte, 8 * up_mbyte)      # MB/s in Mbit/s
    assert shares["copy:eastus"] == (0.0, 0.0)        # serves no client


def test_a_zone_redundant_replica_splits_its_budget_across_its_zones(tmp_path):
    shares = _shares({"tier": "Premium", "home_zone_redundant": True,
                      "replicas": [{"region": "westeurope"}], "limits": {"limits": "tier"}},
                     tmp_path)
    zones = [shares[f"eastus-{z}"] for z in ("1", "2", "3")]
    assert zones == [(800 / 3, 400 / 3)] * 3
    assert sum(down for down, _ in zones) == pytest.approx(800)   # the replica's, not each zone's
    assert shares["westeurope"] == (800, 400)


def test_numbers_given_override_the_tiers_and_zero_turns_one_off(tmp_path):
    assert _shares({"limits": {"download_mbps": 8}}, tmp_path)["eastus"] == (8, 0)
    assert _shares({"tier": "Basic", "limits": {"limits": "tier", "upload_mbps": 0}},
                   tmp_path)["eastus"] == (240, 0)


def test_bad_limits_say_what_to_change():
    with pytest.raises(specs.SpecError) as info:
        specs.parse({"limits": {"limits": "Tiers", "download_mbps": -5}})
    first, second = info.value.problems
    assert "limits.limits 'Tiers' is not one of 'tier'" in first and "did you mean 'tier'?" in first
    assert "limits.download_mbps must be a number of Mbit/s, 0 (unshaped) or from 0.01 on" in second
    with pytest.raises(specs.SpecError) as info:
        specs.parse({"limits": {"download_mpbs": 5}})
    assert "did you mean 'download_mbps'?" in info.value.problems[0]


# -- a shaped node process -------------------------------------------------------------

RATE_MBPS = 16             # 2,000,000 bytes/s: a MiB takes about half a second
SIZE = MIB


def at_least_s(size: int, mbps: float = RATE_MBPS) -> float:
    """The least time ``size`` bytes can take through a budget of ``mbps``
    starting idle: all but one burst paid for at its rate."""
    budget = ByteBudget(mbps)
    return (size - budget.burst) / budget.rate


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """One node process shaped both ways at ``RATE_MBPS`` (tests take turns on
    it: an idle budget holds no more than one burst, so none gains from another)."""
    node = NodeProcess(tmp_path_factory.mktemp("bandwidth") / "node",
                       ["--download-mbps", str(RATE_MBPS), "--upload-mbps", str(RATE_MBPS)]).start()
    yield node
    node.close()


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("georeg_bandwidth")}


def passed(counts: dict[str, float], direction: str) -> float:
    return counts[f'georeg_bandwidth_bytes_total{{direction="{direction}"}}']


async def test_a_push_and_a_pull_take_at_least_their_size_at_the_rate(shaped):
    data = os.urandom(SIZE)
    async with aiohttp.ClientSession() as session:
        before = await metrics(session, shaped.url)
        started = time.monotonic()
        digest = await push_blob(session, shaped.url, "shape/plain", data)
        pushed = time.monotonic() - started
        started = time.monotonic()
        async with session.get(f"{shaped.url}/v2/shape/plain/blobs/{digest}") as r:
            assert r.status == 200 and await r.read() == data
        pulled = time.monotonic() - started
        after = await metrics(session, shaped.url)
    assert pushed >= at_least_s(SIZE) and pulled >= at_least_s(SIZE), (pushed, pulled)
    # What the node reports: its rate, and every blob byte through its budgets.
    assert after['georeg_bandwidth_limit_bytes_per_second{direction="download"}'] == 2e6
    assert passed(after, "upload") - passed(before, "upload") == SIZE
    assert passed(after, "download") - passed(before, "download") == SIZE


async def test_chunked_uploads_are_shaped_too(shaped):
    data = os.urandom(SIZE)
    half = SIZE // 2
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(f"{shaped.url}/v2/shape/chunked/blobs/uploads/") as r:
            location = r.headers["Location"]
        for start in (0, half):
            async with session.patch(f"{shaped.url}{location}", data=data[start:start + half],
                                     headers={"Content-Range": f"{start}-{start + half - 1}"}) as r:
                assert r.status == 202, await r.text()
                location = r.headers["Location"]
        async with session.put(f"{shaped.url}{location}", params={"digest": digest_of(data)}) as r:
            assert r.status == 201, await r.text()
        elapsed = time.monotonic() - started
    assert elapsed >= at_least_s(SIZE), elapsed


async def test_concurrent_pulls_share_the_budget_evenly(shaped):
    data = [os.urandom(SIZE), os.urandom(SIZE)]
    budget = ByteBudget(RATE_MBPS)
    async with aiohttp.ClientSession() as session:
        digests = [await push_blob(session, shaped.url, "shape/shared", d) for d in data]
        started = time.monotonic()
        answered = []

        async def pull(digest: str) -> float:
            async with session.get(f"{shaped.url}/v2/shape/shared/blobs/{digest}") as r:
                answered.append(time.monotonic() - started)   # its head: sent before any byte
                assert r.status == 200 and len(await r.read()) == SIZE
            return time.monotonic() - started

        first, second = sorted(await asyncio.gather(*(pull(d) for d in digests)))
    # One budget for both: the pair takes what 2 MiB takes ...
    assert second >= at_least_s(2 * SIZE), second
    # ... and they take turns once both are under way (the later head's
    # arrival): the first done has waited for the other's bytes since then,
    # less a quantum each way. Served one after the other, it would be done
    # when its own MiB is, about half of that.
    both = max(answered)
    assert first >= at_least_s(2 * SIZE) - both - 2 * budget.quantum / budget.rate, \
        (first, second, both)


async def test_what_the_budgets_are_charged(shaped):
    """A HEAD moves no blob bytes and spends none; a Range GET spends its
    range; a body given with the PUT that ends an upload is shaped as a
    POST's or a PATCH's."""
    data = os.urandom(SIZE // 4)
    async with aiohttp.ClientSession() as session:
        digest = await push_blob(session, shaped.url, "shape/charged", data)
        blob = f"{shaped.url}/v2/shape/charged/blobs/{digest}"
        before = await metrics(session, shaped.url)
        async with session.head(blob) as r:
            assert r.status == 200
        async with session.get(blob, headers={"Range": "bytes=1000-100999"}) as r:
            assert r.status == 206 and await r.read() == data[1000:101000]
        after = await metrics(session, shaped.url)
        assert passed(after, "download") - passed(before, "download") == 100_000

        other = os.urandom(SIZE)
        async with session.post(f"{shaped.url}/v2/shape/charged/blobs/uploads/") as r:
            location = r.headers["Location"]
        started = time.monotonic()
        async with session.put(f"{shaped.url}{location}", params={"digest": digest_of(other)},
                               data=other) as r:
            assert r.status == 201, await r.text()
        elapsed = time.monotonic() - started
        uploaded = passed(await metrics(session, shaped.url), "upload") - passed(after, "upload")
    assert uploaded == SIZE and elapsed >= at_least_s(SIZE), (uploaded, elapsed)


async def test_skopeo_copies_both_ways_at_no_more_than_the_rate(shaped, tmp_path):
    image = make_image([SIZE], seed=11)
    write_oci_layout(tmp_path / "layout", image)
    skopeo = Skopeo(tmp_path / "skopeo", shaped.url.removeprefix("http://"))
    started = time.monotonic()
    await skopeo.copy(f"oci:{tmp_path / 'layout'}:latest", skopeo.ref("shape/skopeo:v1"))
    pushed = time.monotonic() - started
    started = time.monotonic()
    await skopeo.copy(skopeo.ref("shape/skopeo:v1"), f"oci:{tmp_path / 'back'}:v1")
    pulled = time.monotonic() - started
    # (skopeo compresses the layer on its way up: a MiB of random bytes, a bit more.)
    blobs = (tmp_path / "back" / "blobs" / "sha256").iterdir()
    assert max(blob.stat().st_size for blob in blobs) >= SIZE
    assert pushed >= at_least_s(SIZE) and pulled >= at_least_s(SIZE), (pushed, pulled)


# -- through an endpoint: hand-over, and the splice ------------------------------------


async def proxy_to(node: NodeProcess, **options) -> RoutingProxy:
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    replicas = Replicas([ReplicaGroup("eastus", (NodeEndpoint("eastus", "eastus", "", host,
                                                              int(port)),))])
    proxy = RoutingProxy.global_endpoint("eastus", replicas, lambda _c, _r: 0.0, NodeHealth(),
                                         **options)
    await proxy.start()
    return proxy


async def test_an_endpoints_hand_over_and_splice_carry_the_shape_of_the_node(shaped):
    """A hand-over writes on the client's socket from the node, with the node's
    budget; a relayed download or upload is spliced by the endpoint at the
    pace the node writes or reads: no path around the limit."""
    data = os.urandom(SIZE)
    handing = await proxy_to(shaped)
    relaying = await proxy_to(shaped, handoff_blobs=False)
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            digest = await push_blob(session, relaying.url, "shape/endpoint", data)
            pushed = time.monotonic() - started
            timings = {}
            for proxy in (handing, relaying):
                started = time.monotonic()
                async with session.get(f"{proxy.url}/v2/shape/endpoint/blobs/{digest}") as r:
                    assert r.status == 200 and await r.read() == data
                timings[proxy] = time.monotonic() - started
        assert handing.handed_over == 1 and relaying.handed_over == 0
        assert relaying.spliced_bytes >= SIZE        # the upload's body, at least, spliced
        assert pushed >= at_least_s(SIZE), pushed
        assert min(timings.values()) >= at_least_s(SIZE), timings
    finally:
        await handing.stop()
        await relaying.stop()


# -- replication is not shaped ---------------------------------------------------------


async def test_replication_never_spends_a_nodes_budget(tmp_path):
    """Two ``georeg node --cluster`` processes whose views (as the plan writes
    them) give each a download budget a MiB takes 8 s to pass: a layer
    pushed to one replicates to the other over gRPC without a byte through
    either budget, while a client's pull of a small blob goes through it."""
    grpc = {"eastus": free_port(), "westeurope": free_port()}
    share = BandwidthSettings(download_mbps=1)                 # 125,000 bytes/s
    nodes = {}
    try:
        for name in grpc:
            other = next(n for n in grpc if n != name)
            view = ClusterView(name=name, region=name, grpc_listen=f"127.0.0.1:{grpc[name]}",
                               peers=(Peer(name=other, region=other,
                                           grpc=f"127.0.0.1:{grpc[other]}"),),
                               replication=ReplicationSettings(anti_entropy_interval_s=1.0),
                               bandwidth=share)
            view.dump(tmp_path / f"{name}.json")
            nodes[name] = await asyncio.get_running_loop().run_in_executor(
                None, NodeProcess(tmp_path / name, ["--cluster", str(tmp_path / f"{name}.json")])
                .start)
        east, west = nodes["eastus"].url, nodes["westeurope"].url
        # Larger than replication sends with its event (INLINE_BLOB_MAX): fetched
        # by digest; the config goes with the event.
        image = make_image([INLINE_BLOB_MAX + MIB], seed=3)
        async with aiohttp.ClientSession() as session:
            await push_image(session, east, "shape/replicated", image, tag="v1")

            async def arrived() -> bool:
                async with session.head(f"{west}/v2/shape/replicated/manifests/v1") as r:
                    return r.status == 200
            await eventually(arrived, timeout=60, what="the image in westeurope")
            for url in (east, west):
                counts = await metrics(session, url)
                assert counts['georeg_bandwidth_limit_bytes_per_second{direction="download"}'] \
                    == 125_000
                assert passed(counts, "download") == 0, url
            async with session.get(f"{west}/v2/shape/replicated/blobs/"
                                   f"{digest_of(image.config)}") as r:
                assert await r.read() == image.config
            assert passed(await metrics(session, west), "download") == len(image.config)
    finally:
        for node in nodes.values():
            node.close()
