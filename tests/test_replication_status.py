"""Per-image replication status, its CLI, and replication's /metrics.

``GET /georeg/v1/replication/status?repository=&reference=`` on any node answers
for every replica: present (arrived_at, lag_ms), pending, excluded (residency),
stale (the tag points at an older push there), unreachable, failed (and why).
``georeg replication status REPO:TAG --node URL`` prints it, run here as a
child process against the in-process cluster (its nodes serve real sockets;
the subprocess runs without blocking the loop that serves them).

Every cluster here runs with access control on (``auth_inprocess``: mutual
TLS between nodes, the admin user in the registry configuration), as a
user's does: the status is asked with a client's credentials (pull on the
repository), the CLI finds them in a client auth file, and /metrics and
/georeg/v1/node, which serve the cluster itself, take its internal credential.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import aiohttp
import pytest

from cluster.network.links import LinkFaults
from registry_node.app import REPLICATION_COMPLETION

from .auth_inprocess import ADMIN, start_auth_cluster
from .command_line import georeg_command
from .helpers import eventually, push_image
from .replication_invariants import (
    big_image,
    layered_image,
    metric_samples,
    metric_sum,
    metrics_text,
    stop_cluster,
)

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"), ("westeurope", ""),
            ("brazilsouth", "")]
NAMES = ["eastus-1", "eastus-2", "eastus-3", "westeurope", "brazilsouth"]


@pytest.fixture
async def http():
    """A registry client logged in as the admin user (Basic on every request)."""
    async with aiohttp.ClientSession(auto_decompress=False, headers=ADMIN) as session:
        yield session


async def status(http: aiohttp.ClientSession, node, repo: str, reference: str) -> dict:
    async with http.get(f"{node.url}/georeg/v1/replication/status",
                        params={"repository": repo, "reference": reference}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def states(answer: dict) -> dict[str, str]:
    return {r["name"]: r["state"] for r in answer["replicas"]}


async def cli(*args: str) -> tuple[int, str]:
    done = await asyncio.to_thread(georeg_command, ["replication", "status", *args], timeout=60,
                                   env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
                                   stderr_to_stdout=True)
    return done.returncode, done.stdout


async def test_status_through_present_pending_stale_unreachable_and_excluded(tmp_path, http):
    cluster = await start_auth_cluster(tmp_path, TOPOLOGY)
    try:
        n = cluster.nodes
        rng = random.Random(1)
        first = layered_image(rng, False)

        # present, everywhere: each replica with when it arrived and its lag.
        await push_image(http, n["eastus-1"].url, "app/web", first, tag="v1")
        await eventually(lambda: _complete(http, n["westeurope"], "app/web", "v1"), timeout=20,
                         what="v1 everywhere")
        answer = await status(http, n["brazilsouth"], "app/web", "v1")
        assert answer["digest"] == first.digest and answer["origin"]["region"] == "eastus"
        assert states(answer) == dict.fromkeys(NAMES, "present")
        for replica in answer["replicas"]:
            assert replica["arrived_at"] and replica["lag_ms"] is not None and replica["lag_ms"] >= 0
        by_digest = await status(http, n["eastus-2"], "app/web", first.digest)
        assert by_digest["complete"] and states(by_digest) == dict.fromkeys(NAMES, "present")
        # What webhooks are told (replication completion, over the nodes' mutual
        # TLS): each region's arrival as status gives it, a zone-redundant
        # region's at its write quorum (the second of three zones).
        done = await n["westeurope"].runner.app[REPLICATION_COMPLETION].wait(
            "app/web", first.digest, deadline_s=20)
        arrived = {r["name"]: r["arrived_at"] for r in by_digest["replicas"]}
        assert done.complete and done.arrivals == {
            "eastus": sorted(arrived[f"eastus-{z}"] for z in "123")[1],
            "westeurope": arrived["westeurope"], "brazilsouth": arrived["brazilsouth"]}, done

        code, out = await cli("app/web:v1", "--node", n["westeurope"].url, "--authfile", str(cluster.authfile))
        assert code == 0, out
        assert all(name in out for name in NAMES) and "present" in out, out
        code, out = await cli("app/web:v1", "--node", n["eastus-3"].url, "--json", "--authfile", str(cluster.authfile))
        assert code == 0 and json.loads(out)["complete"] is True, out

        # pending: westeurope can be asked, but cannot fetch (one-way partition).
        cluster.partition("westeurope", "eastus", one_way=True)
        cluster.partition("westeurope", "brazilsouth", one_way=True)
        second = layered_image(rng, False)
        await push_image(http, n["eastus-2"].url, "app/web", second, tag="v2")

        async def v2_pending_only_in_westeurope() -> bool:
            got = states(await status(http, n["eastus-1"], "app/web", "v2"))
            return got == {**dict.fromkeys(NAMES, "present"), "westeurope": "pending"}

        await eventually(v2_pending_only_in_westeurope, timeout=20, what="v2 pending in westeurope")
        answer = await status(http, n["brazilsouth"], "app/web", "v2")
        assert answer["complete"] is False and answer["digest"] == second.digest
        # westeurope itself reaches nobody: it can only say so.
        answer = await status(http, n["westeurope"], "app/web", "v2")
        assert set(states(answer).values()) == {"unreachable", "pending"}, answer
        code, out = await cli("app/web:v2", "--node", n["eastus-1"].url, "--authfile", str(cluster.authfile))
        assert code == 1 and "pending" in out, out

        # stale: v1 pushed again in eastus; westeurope still serves the old v1.
        newer = layered_image(rng, False)
        await push_image(http, n["eastus-3"].url, "app/web", newer, tag="v1")

        async def v1_stale_in_westeurope() -> bool:
            answer = await status(http, n["brazilsouth"], "app/web", "v1")
            return answer["digest"] == newer.digest and states(answer) == {
                **dict.fromkeys(NAMES, "present"), "westeurope": "stale"}

        await eventually(v1_stale_in_westeurope, timeout=20, what="v1 stale in westeurope only")
        answer = await status(http, n["eastus-1"], "app/web", "v1")
        stale = next(r for r in answer["replicas"] if r["name"] == "westeurope")
        assert stale["digest"] == first.digest and stale["reason"]
        assert answer["complete"] is False

        # unreachable: a crashed zone.
        cluster.heal()
        await cluster.crash("eastus-3")
        answer = await status(http, n["eastus-1"], "app/web", "v2")
        down = next(r for r in answer["replicas"] if r["name"] == "eastus-3")
        assert down["state"] == "unreachable" and down["reason"], down
        assert answer["complete"] is False
        code, out = await cli("app/web:v2", "--node", n["eastus-1"].url, "--authfile", str(cluster.authfile))
        assert code == 1 and "unreachable" in out, out
        await cluster.restart("eastus-3")
        await eventually(lambda: _complete(http, n["eastus-1"], "app/web", "v1"), timeout=20,
                         what="everything back and caught up")

        # excluded: pushed in brazilsouth, it may reach no other replica.
        confined = layered_image(rng, True)
        await push_image(http, n["brazilsouth"].url, "br/payroll", confined, tag="v1")
        for asked in ("brazilsouth", "westeurope"):
            answer = await status(http, n[asked], "br/payroll", "v1")
            assert states(answer) == {**dict.fromkeys(NAMES, "excluded"),
                                      "brazilsouth": "present"}, (asked, answer)
            assert answer["complete"] is True and answer["origin"]["region"] == "brazilsouth"
            for replica in answer["replicas"]:
                if replica["state"] == "excluded":
                    assert "residency" in replica["reason"]
        code, out = await cli("br/payroll:v1", "--node", n["eastus-2"].url, "--authfile", str(cluster.authfile))
        assert code == 0 and "excluded" in out, out
    finally:
        await stop_cluster(cluster)


async def _complete(http, node, repo: str, reference: str) -> bool:
    return (await status(http, node, repo, reference))["complete"]


async def test_status_failed_when_the_only_copy_is_corrupt(tmp_path, http):
    """The only copy of a layer rots on the source's disk: its blob file no
    longer authenticates, so FetchBlob answers DATA_LOSS. No retry can help —
    the replica must say failed (and why), and keep replicating everything else."""
    cluster = await start_auth_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    itself = aiohttp.ClientSession(headers=cluster.internal)   # the cluster's own reads
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        cluster.partition("westeurope", "eastus", one_way=True)
        image = layered_image(random.Random(2), False, layers=1)
        await push_image(http, east.url, "app/rot", image, tag="v1")
        path = east.registry.blobs.path(_digest(image.layers[0]))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF                      # one flipped bit, mid-segment
        path.write_bytes(bytes(data))
        cluster.heal()

        async def failed_in_westeurope() -> bool:
            return states(await status(http, east, "app/rot", "v1")).get("westeurope") == "failed"

        await eventually(failed_in_westeurope, timeout=30, what="westeurope to report failed")
        answer = await status(http, west, "app/rot", "v1")
        failed = next(r for r in answer["replicas"] if r["name"] == "westeurope")
        assert "DATA_LOSS" in failed["reason"] or "corrupt" in failed["reason"].lower(), failed
        assert answer["complete"] is False
        code, out = await cli("app/rot:v1", "--node", east.url, "--authfile", str(cluster.authfile))
        assert code == 1 and "failed" in out, out
        text = await metrics_text(itself, west)
        assert metric_sum(text, "georeg_replication_transfer_failures_total", peer="eastus",
                          outcome="permanent") > 0
        # The subscription moved on: later pushes still arrive.
        after = layered_image(random.Random(3), False)
        await push_image(http, east.url, "app/next", after, tag="v1")
        await eventually(lambda: _complete(http, west, "app/next", "v1"), timeout=20,
                         what="a later image to replicate past the failure")
    finally:
        await itself.close()
        await stop_cluster(cluster)


def _digest(data: bytes) -> str:
    from .helpers import digest_of

    return digest_of(data)


async def test_metrics_lag_queue_depth_bytes_and_failures(tmp_path, http):
    cluster = await start_auth_cluster(tmp_path, [("eastus", "1"), ("eastus", "2"), ("eastus", "3"),
                                             ("westeurope", "")])
    itself = aiohttp.ClientSession(headers=cluster.internal)   # the cluster's own reads
    try:
        east, west = cluster.nodes["eastus-1"], cluster.nodes["westeurope"]
        lag = "georeg_replication_lag_seconds_count"
        assert metric_sum(await metrics_text(itself, west), lag) == 0
        small = layered_image(random.Random(4), False)
        await push_image(http, east.url, "m/app", small, tag="v1")
        await eventually(lambda: _complete(http, west, "m/app", "v1"), timeout=20)

        # The lag histogram, by origin and destination region.
        text = await metrics_text(itself, west)
        series = [labels for labels, value in metric_samples(text, lag) if value > 0]
        assert {"origin_region": "eastus", "destination_region": "westeurope"}.items() <= \
            series[0].items(), series
        zone2 = await metrics_text(itself, cluster.nodes["eastus-2"])
        assert metric_sum(zone2, lag, origin_region="eastus", destination_region="eastus") > 0
        buckets = [v for labels, v in metric_samples(text, "georeg_replication_lag_seconds_bucket")
                   if labels.get("le") == "+Inf"]
        assert sum(buckets) == metric_sum(text, lag)
        # Bytes: what westeurope received is what eastus sent it, and all of the image.
        received = metric_sum(text, "georeg_replication_bytes_total", direction="in")
        assert received == sum(len(b) for b in small.blobs)
        # Where the node's memory is (an in-process node: the test process's).
        async with itself.get(f"{west.url}/georeg/v1/node") as r:
            memory = (await r.json())["memory"]
        assert memory["rocksdb_bytes"] > 0                  # the image's records, in the memtable
        assert 0 < memory["heap_in_use_bytes"] < memory["rss_bytes"]
        assert memory["heap_free_bytes"] >= 0 and memory["python_blocks"] > 0

        # Queue depth per peer: events westeurope knows of and has not applied,
        # held up behind a large layer crossing a slow link.
        link = cluster.links[("westeurope", "eastus-1")]
        for other in ("eastus-2", "eastus-3"):   # only eastus-1 may serve westeurope now
            cluster.links[("westeurope", other)].cut()
        link.set_faults(LinkFaults(bandwidth_mbps=64))
        big, layer = big_image(9, 32 << 20)
        await push_image(http, east.url, "m/big", big, tag="v1")
        await push_image(http, east.url, "m/after", layered_image(random.Random(5), False), tag="v1")

        async def queued() -> bool:
            text = await metrics_text(itself, west)
            return metric_sum(text, "georeg_replication_queue_depth", peer="eastus-1") > 0

        await eventually(queued, timeout=20, what="a queue behind the slow layer")
        text = await metrics_text(itself, west)
        assert {labels["peer"] for labels, _ in
                metric_samples(text, "georeg_replication_queue_depth")} >= {"eastus-1", "eastus-2"}
        link.cut()                                       # and a failure while it crosses

        async def failed_once() -> bool:
            text = await metrics_text(itself, west)
            return metric_sum(text, "georeg_replication_transfer_failures_total",
                              peer="eastus-1") > 0

        await eventually(failed_once, timeout=20, what="a transfer failure to be counted")
        cluster.heal()
        await eventually(lambda: _complete(http, west, "m/after", "v1"), timeout=60,
                         what="the queue to drain")

        async def drained() -> bool:
            text = await metrics_text(itself, west)
            return metric_sum(text, "georeg_replication_queue_depth") == 0

        await eventually(drained, timeout=20, what="queue depth back to 0")
        text = await metrics_text(itself, west)
        assert metric_sum(text, "georeg_replication_bytes_total", direction="in") >= len(layer)
        sent = sum([metric_sum(await metrics_text(itself, n), "georeg_replication_bytes_total",
                               direction="out", peer="westeurope") for n in cluster.running()])
        assert sent >= len(layer)
    finally:
        await itself.close()
        await stop_cluster(cluster)
