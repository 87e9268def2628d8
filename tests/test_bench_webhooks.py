"""`georeg bench webhooks` end to end at a tiny size, on a two-region cluster
with auth on (the benchmark is the owner; its receiver is a real aiohttp
server in the benchmark's process).

Correctness, not speed: every expected delivery arrived once per event id, no
delivery beat its WAN floor (one clock: the client's 201 and the receiver's
arrival are both read in the benchmark), the hanging receiver was reached and
its events piled up in the outbox while pushes went on, the bulk step got a
delivery per webhook per push, and no process outlives the run. Timings are
the benchmark's to report.
"""

from __future__ import annotations

import json

from cluster.cli.main import main

from .test_bench_smoke import _processes_mentioning

SPEC = """\
registry = "georegtest"
home_region = "eastus"
paired_copies = false
auth = "token"

[[replicas]]
region = "westeurope"
"""
IMAGES, MANIFESTS, WEBHOOKS, PUSHES = 2, 20, 5, 2


def test_bench_webhooks_delivers_every_event_and_none_beats_its_floor(tmp_path):
    config, out, workdir = tmp_path / "spec.toml", tmp_path / "webhooks.json", tmp_path / "work"
    config.write_text(SPEC)
    status = main(["bench", "webhooks", "--config", str(config), "--images", str(IMAGES),
                   "--rate", "4", "--layers", "1", "--layer-size", "64KiB",
                   "--manifests", str(MANIFESTS), "--pairs", "1", "--webhooks", str(WEBHOOKS),
                   "--bulk-pushes", str(PUSHES), "--quiet-wait", "0", "--timeout", "60",
                   "--workdir", str(workdir), "--json", str(out)])

    assert status == 0
    results = json.loads(out.read_text())
    assert results["cluster"]["auth"] is True and results["cluster"]["wan"] is True
    latency = results["steps"]["latency"]
    # a push webhook per region and a replicated one: every image, every webhook
    assert latency["expected"] == IMAGES * 3
    assert latency["missing"] == 0 and latency["duplicates"] == 0
    assert {(h["region"], h["action"]) for h in latency["webhooks"].values()} == {
        ("eastus", "push"), ("westeurope", "push"), ("eastus", "replicated")}
    for name, hook in latency["webhooks"].items():
        assert hook["count"] == IMAGES, name
        assert hook["below_floor"] == 0, (name, hook)
        assert hook["after_held"]["count"] == IMAGES, name
    # the same images' floors: West Europe's copy is an Atlantic crossing (39.2 ms
    # one way, less jitter) behind East US's push, and "every region has it", fired in
    # East US, another crossing behind West Europe's copy
    floor = {name: hook["floor_p50_ms"] for name, hook in latency["webhooks"].items()}
    assert floor["pushwesteurope"] - floor["pusheastus"] > 35
    assert floor["replicatedeastus"] - floor["pushwesteurope"] > 35
    hanging = results["steps"]["hanging"]
    assert [r["round"] for r in hanging["rounds"]] == ["A0", "B0", "A1"]
    assert all(r["manifests"] == MANIFESTS and r["per_s"] > 0 for r in hanging["rounds"])
    assert hanging["hanging_requests"] >= 1           # the receiver was reached, and hung
    events = hanging["hanging_webhook_events"]
    assert events["states"].get("pending", 0) >= MANIFESTS   # piled up, none delivered
    assert "delivered" not in events["states"]
    bulk = results["steps"]["bulk"]
    assert bulk["expected"] == bulk["delivered"] == WEBHOOKS * PUSHES
    assert bulk["duplicates"] == 0 and bulk["per_s"] > 0
    # The delivering node was measured; at this size its CPU can be under one
    # clock tick (10 ms), so no lower bound.
    assert bulk["cpu"]["cpu_s"]["eastus"] >= 0
    assert _processes_mentioning(str(workdir)) == []
