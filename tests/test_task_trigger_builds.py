"""Base-image triggers with real buildah on a real two-region cluster with
auth (``cluster.control.triggers``): a three-level chain, base → runtime →
app, each task run once by hand; then a patched base is pushed in the *other*
region, so it reaches the tasks' region by replication; the runtime and then
the app are rebuilt exactly once each, as the admin user, with the trigger
recorded, and the new app arrives in every region.

It runs buildah four times (~25 s here), so it is ``soak``; one trigger
without the chain runs in ``make test`` (``test_builds``). The logic
(coalescing, order, restart) is ``test_task_triggers``' (in process).
"""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from cluster.control import spec as specs
from cluster.testing import RunningCluster

from .helpers import Image, push_image, require_program
from .test_builds import FINAL, api, busybox_image, login_header, patched

SPEC = specs.ClusterSpec(registry="georegchain", home_region="eastus", paired_copies=False,
                         replicas=(specs.ReplicaSpec("westeurope"),))


def task_runs(running, task: str) -> list[dict]:
    return api(running, "GET", f"/georeg/v1/runs?task={task}")[1]


@pytest.mark.soak
def test_a_patched_base_rebuilds_runtime_then_app_once_each_in_every_region(tmp_path_factory):
    require_program("buildah", "buildah")
    sources = tmp_path_factory.mktemp("sources")
    spec = msgspec.structs.replace(SPEC, tasks=specs.TasksSpec(context_roots=(str(sources),)))
    with RunningCluster(spec, tmp_path_factory.mktemp("chain")) as running:
        def push(region: str, repo: str, image: Image) -> str:
            async def go():
                async with running.http() as http:
                    return await push_image(http, running.regional_endpoint(region), repo,
                                            image, "1")
            return running.run(go)

        def head(region: str, repo: str) -> str | None:
            async def go():
                async with running.http() as http, http.head(
                        f"{running.regional_endpoint(region)}/v2/{repo}/manifests/1",
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
                    return r.headers.get("Docker-Content-Digest") if r.status == 200 else None
            return running.run(go)

        push("eastus", "base", patched(busybox_image(), "0"))
        login = login_header(running.credentials.username, running.credentials.password)
        for name, base in (("runtime", "base"), ("app", "runtime")):
            context = sources / name
            context.mkdir()
            (context / "Containerfile").write_text(
                f"FROM {{{{.Run.Registry}}}}/{base}:1\nRUN echo {name} > /{name}\n")
            body = {"name": name, "image": f"{name}:1", "contextPath": str(context)}
            assert api(running, "POST", "/georeg/v1/tasks", json.dumps(body).encode())[0] == 201
            status, run = api(running, "POST", f"/georeg/v1/tasks/{name}/runs", b"", login)
            assert status == 202, run
            running.wait_for(lambda r=run: api(running, "GET", f"/georeg/v1/runs/{r['runId']}")
                             [1]["status"] in FINAL, 120, what=f"{name}'s first run")
        first = {name: task_runs(running, name)[0] for name in ("runtime", "app")}
        assert [r["status"] for r in first.values()] == ["Succeeded", "Succeeded"], \
            [(r["error"], api(running, "GET", f"/georeg/v1/runs/{r['runId']}/log")[1][-1500:])
             for r in first.values()]

        # The patch is pushed in westeurope: the tasks' region gets it by replication.
        pushed = time.monotonic()
        new_base = push("westeurope", "base", patched(busybox_image(), "1"))

        def rebuilt() -> bool:
            app = task_runs(running, "app")
            return len(app) == 2 and app[0]["status"] in FINAL
        running.wait_for(rebuilt, 180, what="the app rebuilt")
        app_digest = task_runs(running, "app")[0]["outputImages"][0]["digest"]
        running.wait_for(lambda: head("westeurope", "app") == app_digest, 60,
                         what="the rebuilt app in westeurope")
        print(f"\nbase pushed in westeurope -> app rebuilt in eastus and replicated back: "
              f"{time.monotonic() - pushed:.1f}s")

        runtime, app = task_runs(running, "runtime"), task_runs(running, "app")
        assert len(runtime) == 2 and len(app) == 2          # exactly once each
        for run, base, digest in ((runtime[0], "base", new_base),
                                  (app[0], "runtime", runtime[0]["outputImages"][0]["digest"])):
            assert run["status"] == "Succeeded" and run["trigger"] == "Image Update", run
            [image] = run["imageUpdateTrigger"]["images"]
            assert (image["repository"], image["tag"], image["digest"]) == (base, "1", digest)
            assert [b["digest"] for b in run["baseImages"]] == [digest]
        assert app[0]["createTime"] > runtime[0]["finishTime"]      # in order
        assert head("eastus", "app") == app_digest != first["app"]["outputImages"][0]["digest"]
        # Nothing more comes of it: the app's own push triggers no one.
        assert len(task_runs(running, "runtime")) == 2
