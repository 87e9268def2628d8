"""`georeg bench node` end to end in its smallest form, against both registries.

Only the shape of the results is checked: every metric is there with a
positive number for georeg and for the reference registry, and no server
outlives the run. Performance is reported by the benchmark, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.bench.reference import find_binary
from cluster.cli.main import main

from .helpers import require_program


@pytest.fixture(autouse=True)
def reference_registry_installed() -> None:
    require_program("docker-registry", "docker-registry", found=find_binary())

METRICS = {
    "push_mb_s", "pull_mb_s",
    "head_blob_ops_s", "head_blob_p99_ms",
    "get_manifest_ops_s", "get_manifest_p99_ms",
    "tags_list_ops_s", "tags_list_p99_ms",
    "big_upload_mb_s", "big_download_mb_s", "big_peak_rss_mib",
}


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def test_bench_node_reports_every_metric_for_both_registries(tmp_path):
    out, workdir = tmp_path / "bench.json", tmp_path / "work"
    status = main(["bench", "node", "--layers", "4", "--layer-kib", "64", "--images", "2",
                   "--small-ops", "20", "--big-mib", "2", "--repeat", "1", "--no-warmup", "--quiet-wait", "0",
                   "--workdir", str(workdir), "--json", str(out)])

    assert status == 0
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == METRICS
    for key, metric in results["metrics"].items():
        for side in ("georeg", "reference"):
            assert metric[side] is not None and metric[side] > 0, (key, side, metric)
    assert results["repeat"] == 1
    assert results["machine"]["cores"] > 0
    assert _processes_mentioning(str(workdir)) == []
