"""`georeg bench scale` end to end at a small size, on all three registries.

Correctness, not speed: every manifest pushed is counted back (the largest
repository's tag list, every catalog page), every georeg side pages its tag
list, the default cluster (auth on, pushed through a global endpoint as its
admin user) has the last manifest on every node, a region isolated during
pushes lists none of them until the heal and all of them after, the new
region synced everything, the standalone node's churn ran every operation
and left the content as it was, and no process outlives the run. Timings are the benchmark's to report.
"""

from __future__ import annotations

import json

import pytest

from cluster.bench.reference import find_binary
from cluster.cli.main import main

from .helpers import require_program
from .test_bench_smoke import _processes_mentioning

MANIFESTS, REPOSITORIES, LARGEST = 120, 6, 40   # pages of 4: every listing takes several


@pytest.fixture(autouse=True)
def reference_registry_installed() -> None:
    require_program("docker-registry", "docker-registry", found=find_binary())


def test_bench_scale_counts_back_everything_it_pushed(tmp_path):
    out, workdir = tmp_path / "scale.json", tmp_path / "work"
    status = main(["bench", "scale", "--quick", "-n", str(MANIFESTS), "-r", str(REPOSITORIES),
                   "--largest", str(LARGEST), "--reads", "20", "--page", "4", "--idle", "0.5",
                   "--workdir", str(workdir), "--json", str(out)])

    assert status == 0
    results = json.loads(out.read_text())
    assert results["workload"]["manifests"] == MANIFESTS
    assert set(results["sides"]) == {"standalone", "reference", "cluster"}
    for name, side in results["sides"].items():
        assert side["push"]["pushed"] == MANIFESTS, name
        assert side["push"]["per_s"] > 0, name
        assert side["counts"] == {"tags_at_largest": LARGEST,
                                  "catalog_repositories": REPOSITORIES}, name
        for read in ("tags", "tags_page", "catalog", "manifest"):
            assert side[read]["count"] > 0 and side[read]["p50_ms"] > 0, (name, read)
    assert results["sides"]["standalone"]["tags_page"]["paged"]
    churn = results["sides"]["standalone"]["churn"]  # --quick: 400 operations
    assert churn["operations"] == 400 and churn["tags_at_largest"] == LARGEST
    assert churn["metadata_bytes_before"] > 0 and churn["metadata_bytes_after"] > 0
    assert "churn" not in results["sides"]["reference"]
    cluster = results["sides"]["cluster"]
    assert cluster["tags_page"]["paged"]
    assert cluster["auth"] is True
    assert cluster["replicated"]["holding"] == cluster["replicated"]["nodes"] == cluster["nodes"]
    assert {"supervisor", *cluster["rss_after_push_mib"]} <= set(cluster["push"]["cpu_ms_per_manifest"])
    assert set(cluster["rss_after_push_mib"]) and len(cluster["rss_after_push_mib"]) == cluster["nodes"]
    for idle in ("idle_empty", "idle_after_push", "idle_after_new_region"):
        assert cluster[idle]["processes"] >= cluster["nodes"] + 1, idle  # the supervisor too
        assert {"supervisor", *cluster["rss_after_push_mib"]} <= set(cluster[idle]["per_process"])
    assert cluster["idle_after_new_region"]["processes"] > cluster["idle_after_push"]["processes"]
    # the push's tail ends: a cluster whose links never go back to their empty rate loops
    assert cluster["quiet_after_push"]["seconds"] is not None
    catch_up = cluster["catch_up"]   # --quick: 100 manifests pushed while a region is isolated
    assert cluster["new_region"]["images"] == [MANIFESTS + 100] * 2    # created after it
    assert catch_up["pushed"] == 100
    assert catch_up["held_while_isolated"] == 0       # the isolation held
    assert catch_up["held"] == 100 and catch_up["seconds_after_heal"] is not None
    # the figure's resolution and how often the timed node was asked for its full tag list
    assert catch_up["poll_s"] > 0 and catch_up["tag_lists_read"] >= 1
    assert _processes_mentioning(str(workdir)) == []
