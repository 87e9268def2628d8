"""Quick builds (``georeg build``, ``cluster.control.builds``) with real buildah
on a real cluster with auth: the base image is a static busybox root
filesystem the test pushes into georeg itself (nothing comes from the
internet), so a ``RUN`` step runs. The built image is pulled back with skopeo
and its layer read; the caller's push right is checked before a run exists;
bad contexts, a task's context outside the allowed roots, and a queue of
runs whose base is missing each end as the API says. Hostile archives are
``test_build_contexts``' (pure, no cluster).

One single-region cluster serves the module, and two tests run buildah (the
CLI's ``georeg build``, and one base-image trigger: a task rebuilt when its
base is pushed again); a git task's commit trigger runs without it (its base
is missing). A failing ``RUN`` step and a cancel are ``soak`` (each runs
buildah again); so is the three-level trigger chain (``test_task_trigger_builds``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import pytest

from cluster.control import spec as specs
from cluster.testing import RunningCluster

from .helpers import (
    OCI_CONFIG,
    OCI_LAYER,
    Image,
    Skopeo,
    digest_of,
    push_image,
    require_program,
)
from .test_cluster import georeg

SPEC = specs.ClusterSpec(registry="georegbuild", home_region="eastus", replicas=())
FINAL = ("Succeeded", "Failed", "Canceled", "Timeout")


def busybox_image() -> Image:
    """A one-layer image: a static busybox as /bin/busybox, /bin/sh linking to it."""
    busybox = Path(require_program("busybox", "busybox-static"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bin", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "sleep", "false", "setsid"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    layer = buf.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}],
    }).encode()
    return Image(config, [layer], manifest)


def patched(image: Image, patch: str) -> Image:
    """``image`` with another config (an Env naming the patch): a new digest, the same
    layer. Its history names the layer: buildah, building on an image built on
    this one, counts the layers against the history (busybox_image has none)."""
    config = json.loads(image.config)
    config["config"]["Env"].append(f"PATCH={patch}")
    config["history"] = [{"created_by": f"busybox, patch {patch}"}]
    raw = json.dumps(config).encode()
    manifest = json.loads(image.manifest)
    manifest["config"].update(digest=digest_of(raw), size=len(raw))
    return Image(raw, image.layers, json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    require_program("buildah", "buildah")
    sources = tmp_path_factory.mktemp("sources")
    spec = msgspec.structs.replace(SPEC, tasks=specs.TasksSpec(context_roots=(str(sources),),
                                                               commit_poll_seconds=0.2))
    with RunningCluster(spec, tmp_path_factory.mktemp("builds")) as c:
        c.sources = sources
        async def push_base():
            async with c.http() as http:
                return await push_image(http, c.regional_endpoint("eastus"), "base",
                                        busybox_image(), "latest")
        c.base_digest = c.run(push_base)
        yield c


def context_archive(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def login_header(username: str, password: str) -> dict[str, str]:
    value = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"X-Registry-Authorization": f"Basic {value}"}


def api(running, method: str, path: str, data: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, object]:
    request = urllib.request.Request(running.management_url + path, data=data, method=method,
                                     headers={**running.owner_headers(), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def start_build(running, files: dict, image: str = "app:v1", login=None):
    login = login or running.credentials
    return api(running, "POST", f"/georeg/v1/builds?image={image}", context_archive(files),
               login_header(login.username, login.password))


def finished(running, run_id: str, timeout: float = 60) -> dict:
    """The run's record once it has ended."""
    answer: dict = {}

    def ended() -> bool:
        answer.update(api(running, "GET", f"/georeg/v1/runs/{run_id}")[1])
        return answer["status"] in FINAL
    running.wait_for(ended, timeout, what=f"run {run_id} to end")
    return answer


def test_a_quick_build_runs_its_steps_on_a_base_from_this_registry_and_pushes(
        running, tmp_path):
    context = tmp_path / "src"
    context.mkdir()
    (context / "Containerfile").write_text(
        "FROM {{.Run.Registry}}/base\nCOPY message /message\n"
        "RUN echo built-by-{{.Run.ID}} > /greeting\n")
    (context / "message").write_text("copied\n")
    done = georeg("build", "-t", "app:{{.Run.ID}}", str(context),
                  data_dir=running.data_dir, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    run_id = done.stderr.split("run ID: ")[1].split()[0]
    assert "STEP" in done.stdout and f"run {run_id} succeeded" in done.stdout

    run = api(running, "GET", f"/georeg/v1/runs/{run_id}")[1]
    assert run["status"] == "Succeeded" and run["runType"] == "QuickRun"
    assert [(b["repository"], b["tag"], b["digest"], b["runtime"]) for b in run["baseImages"]] \
        == [("base", "latest", running.base_digest, True)]
    [output] = run["outputImages"]
    assert (output["repository"], output["tag"]) == ("app", run_id)

    skopeo = Skopeo(tmp_path / "skopeo", running.regional_endpoint("eastus")
                    .removeprefix("http://"), cluster=running)
    layout = tmp_path / "pulled"
    running.run(lambda: skopeo.copy(skopeo.ref(f"app:{run_id}"), f"oci:{layout}:app"))
    # (skopeo's copy into a layout rewrites the manifest: its digest is not the pushed one)
    raw = running.run(lambda: skopeo.inspect_raw(skopeo.ref(f"app:{run_id}")))
    assert digest_of(raw) == output["digest"]
    pulled = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / pulled.split(":")[1]).read_bytes())
    files = {}
    for layer in manifest["layers"]:
        blob = (layout / "blobs/sha256" / layer["digest"].split(":")[1]).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            files.update({m.name.lstrip("./"): tar.extractfile(m).read()
                          for m in tar if m.isfile()})
    assert files["greeting"] == f"built-by-{run_id}\n".encode()
    assert files["message"] == b"copied\n"
    assert "bin/busybox" in files                # the base's layer came along

    log = api(running, "GET", f"/georeg/v1/runs/{run_id}/log")[1]
    assert f"is {running.base_digest}" in log and "STEP" in log
    assert running.credentials.password not in log
    scratch = running.data_dir / "tasks" / "scratch"
    assert not (scratch / run_id).exists()
    record = running.data_dir / "tasks" / "runs" / f"{run_id}.json"
    assert record.stat().st_mode & 0o777 == 0o600


def test_a_caller_without_push_is_refused_before_any_run(running):
    token = running.run(lambda: running.cluster.access.create_token(
        "reader", repositories=[["app", "content/read"], ["base", "content/read"]]))
    password = token["credentials"]["passwords"][0]["value"]
    runs_before = api(running, "GET", "/georeg/v1/runs")[1]
    status, answer = api(running, "POST", "/georeg/v1/builds?image=app:denied",
                         context_archive({"Containerfile": "FROM {{.Run.Registry}}/base\n"}),
                         login_header("reader", password))
    assert status == 403 and answer["error"]["code"] == "DENIED", answer
    assert "requested access to the resource is denied" in answer["error"]["message"]
    status, answer = api(running, "POST", "/georeg/v1/builds?image=app:denied",
                         context_archive({"Containerfile": "FROM {{.Run.Registry}}/base\n"}),
                         login_header("reader", "wrong"))
    assert status == 401, answer
    # Push on the target but no pull on the base: refused up front too.
    token = running.run(lambda: running.cluster.access.create_token(
        "pusher", repositories=[["app", "content/write"], ["app", "content/read"]]))
    password = token["credentials"]["passwords"][0]["value"]
    status, answer = api(running, "POST", "/georeg/v1/builds?image=app:denied",
                         context_archive({"Containerfile": "FROM {{.Run.Registry}}/base\n"}),
                         login_header("pusher", password))
    assert status == 403 and "may not pull the base image repository base" in \
        answer["error"]["message"], answer
    assert api(running, "GET", "/georeg/v1/runs")[1] == runs_before


def test_runs_uploaded_together_queue_with_their_own_ids_and_a_missing_base_fails(running):
    # Both uploaded at once: each gets its own run id, and they queue for the one agent.
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda tag: start_build(running, {
            "Containerfile": "FROM {{.Run.Registry}}/nothere:1\n"}, f"app:{tag}"), ["m1", "m2"])
    assert first[0] == second[0] == 202, (first, second)
    assert first[1]["runId"] != second[1]["runId"]
    for answer in (first, second):
        run = finished(running, answer[1]["runId"])
        assert run["status"] == "Failed" and "is not in this registry" in run["error"], run


@pytest.mark.soak
def test_a_failing_step_fails_the_run_with_its_log(running):
    status, run = start_build(running, {"Containerfile": "FROM {{.Run.Registry}}/base\n"
                                                         "RUN echo about-to-fail && false\n"})
    assert status == 202, run
    run = finished(running, run["runId"])
    assert run["status"] == "Failed" and "the build failed" in run["error"]
    log = api(running, "GET", f"/georeg/v1/runs/{run['runId']}/log")[1]
    assert "about-to-fail" in log and "exited with status" in log


@pytest.mark.parametrize("files, status, words", [
    ({"src/main.c": "int main;"}, 400, "no Containerfile or Dockerfile"),
    ({"Containerfile": "FROM docker.io/library/alpine\n"}, 400, "must be in this registry"),
    ({"../escape": "x", "Containerfile": "FROM scratch\n"}, 400, "'..' component"),
])
def test_a_bad_context_is_refused_with_a_4xx(running, files, status, words):
    got, answer = start_build(running, files)
    assert got == status and words in answer["error"]["message"], answer
    assert not list((running.data_dir / "tasks" / "scratch").iterdir())


def test_a_context_that_is_not_a_tar_or_too_large_is_refused(running):
    login = running.credentials
    got, answer = api(running, "POST", "/georeg/v1/builds?image=app:x", b"not a tar" * 10,
                      login_header(login.username, login.password))
    assert got == 400 and "not a readable tar" in answer["error"]["message"], answer
    builds = running.management.builds
    limit, builds.max_context_bytes = builds.max_context_bytes, 1000
    try:
        got, answer = start_build(running, {"Containerfile": "FROM scratch\n",
                                            "big": os.urandom(5000)})
    finally:
        builds.max_context_bytes = limit
    assert got == 413 and answer["error"]["code"] == "ContextTooLarge", answer
    assert not list((running.data_dir / "tasks" / "scratch").iterdir())


def _sleepers(marker: str) -> list[int]:
    """Processes whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes().replace(b"\0", b" "):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.soak
def test_a_run_can_be_canceled_and_its_processes_die(running):
    marker = f"sleep {600 + os.getpid() % 97}"      # this test's own, not another's
    escaped = f"sleep {700 + os.getpid() % 97}"     # in a session of its own
    status, run = start_build(running, {"Containerfile": "FROM {{.Run.Registry}}/base\n"
                                        f"RUN setsid {escaped} & echo mark-$((6*7)) && "
                                        f"{marker}\n"})
    assert status == 202, run
    run_id = run["runId"]
    log = lambda: api(running, "GET", f"/georeg/v1/runs/{run_id}/log")[1]  # noqa: E731
    # Only the shell prints mark-42 (buildah's STEP line shows $((6*7))): the RUN runs.
    running.wait_for(lambda: "mark-42" in log(), 60, what="the RUN step to start")
    running.wait_for(lambda: bool(_sleepers(marker) and _sleepers(escaped)), 10,
                     what="the step's sleeps")
    status, canceled = api(running, "POST", f"/georeg/v1/runs/{run_id}/cancel")
    assert status == 200 and canceled["status"] == "Canceled", canceled
    running.wait_for(lambda: not _sleepers(marker) and not _sleepers(escaped), 10,
                     what="the step's sleeps to die")
    assert not (running.data_dir / "tasks" / "scratch" / run_id).exists()
    status, again = api(running, "POST", f"/georeg/v1/runs/{run_id}/cancel")
    assert status == 409 and "Canceled" in again["error"]["message"]


def test_a_task_is_kept_as_configuration_its_context_confined_and_run(running):
    context = running.sources / "task-src"
    context.mkdir()
    # No such base: the run fails when it resolves it, before buildah (the one
    # real build is the quick build's); the context is archived and unpacked first.
    (context / "Dockerfile").write_text("FROM {{.Run.Registry}}/nothere:{{.Run.ID}}\n")
    body = {"name": "hello", "image": "hello:{{.Run.ID}}", "contextPath": str(context)}
    status, task = api(running, "POST", "/georeg/v1/tasks", json.dumps(body).encode())
    assert status == 201 and task["image"] == "hello:{{.Run.ID}}", task
    status, again = api(running, "POST", "/georeg/v1/tasks", json.dumps(body).encode())
    assert status == 409, again
    for bad, words in [({"contextPath": "src"}, "absolute"),
                       ({"contextPath": str(running.data_dir)}, "data dir"),
                       ({"contextPath": "/etc"}, "must lie under one of"),
                       ({"region": ["eastus"]}, "Expected `str`")]:
        status, answer = api(running, "POST", "/georeg/v1/tasks",
                             json.dumps({**body, "name": "bad", **bad}).encode())
        assert status == 400 and words in answer["error"]["message"], (bad, answer)
    # The generic configuration route makes the same check.
    status, answer = api(running, "PUT", "/georeg/v1/configuration/task/sneaky",
                         json.dumps({"image": "x:1", "context": str(running.data_dir)}).encode())
    assert status == 400 and "data dir" in answer["error"]["message"], answer
    assert [t["name"] for t in api(running, "GET", "/georeg/v1/tasks")[1]] == ["hello"]

    login = running.credentials
    status, run = api(running, "POST", "/georeg/v1/tasks/hello/runs", b"",
                      login_header(login.username, login.password))
    assert status == 202 and run["task"] == "hello" and run["runType"] == "TaskRun", run
    assert run["image"].endswith(f"/hello:{run['runId']}")
    run = finished(running, run["runId"])
    assert run["status"] == "Failed" and f"nothere:{run['runId']} is not in" in run["error"]
    assert [r["runId"] for r in api(running, "GET", "/georeg/v1/runs?task=hello")[1]] == \
        [run["runId"]]

    assert api(running, "DELETE", "/georeg/v1/tasks/hello")[0] == 204
    assert api(running, "GET", "/georeg/v1/tasks/hello")[0] == 404


def test_a_run_the_supervisor_stopped_in_is_failed_not_left_running(tmp_path):
    from types import SimpleNamespace

    from cluster.control.builds import BuildRuns
    runs = tmp_path / "tasks" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "tasks" / "scratch" / "ca7").mkdir(parents=True)
    (tmp_path / "tasks" / "scratch" / "ca7" / "auth.json").write_text("{}")
    (runs / "ca7.json").write_text(json.dumps({"runId": "ca7", "number": 7,
                                               "status": "Running", "error": None}))
    builds = BuildRuns(SimpleNamespace(data_dir=tmp_path))
    builds.recover()                            # as the management API starts
    assert not (tmp_path / "tasks" / "scratch").exists()
    [run] = builds.list()
    assert run["status"] == "Failed" and "stopped while this run was running" in run["error"]
    assert "stopped" in builds.log_path("ca7").read_text()
    assert not (tmp_path / "tasks" / "scratch").exists()
    assert (runs / "ca7.json").stat().st_mode & 0o777 == 0o600


def test_a_run_whose_login_expired_in_the_queue_fails_saying_so(tmp_path, clock):
    import asyncio
    from types import SimpleNamespace

    from multidict import MultiDict

    from cluster.control.builds import MAX_TIMEOUT_S, BuildRuns, _Grant, _Live, _Work, build_request
    from cluster.control.errors import ClusterError

    with pytest.raises(ClusterError, match="3-hour login"):
        build_request(MultiDict(image="a:b", timeout=str(MAX_TIMEOUT_S + 1)), None)
    builds = BuildRuns(SimpleNamespace(data_dir=tmp_path), clock=clock.monotonic)
    grant = _Grant("refresh", expires_at=clock.monotonic() + MAX_TIMEOUT_S)
    clock.advance(MAX_TIMEOUT_S)                    # waited that long behind other runs
    record = {"runId": "ca1", "number": 1, "status": "Queued", "region": "eastus",
              "timeoutSeconds": 60, "error": None}
    scratch = tmp_path / "tasks" / "scratch" / "ca1"
    scratch.mkdir(parents=True)
    builds._live["ca1"] = _Live()
    asyncio.run(builds._run(_Work(record, scratch, scratch, [], [], "http://x", "x", (), grant)))
    run = builds.show("ca1")
    assert run["status"] == "Failed" and "login" in run["error"] and "queued" in run["error"]
    assert not scratch.exists()


def test_a_run_the_supervisor_stops_is_failed_not_canceled(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from cluster.control.builds import BuildRuns, _Grant, _Live, _Work
    from cluster.control.containerfile import BaseImage

    async def scenario():
        # An endpoint that accepts and never answers: the run waits resolving its base.
        asked = asyncio.Event()
        server = await asyncio.start_server(lambda r, w: asked.set(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        builds = BuildRuns(SimpleNamespace(data_dir=tmp_path, scheme="http", ca_file=None))
        scratch = tmp_path / "tasks" / "scratch" / "ca1"
        scratch.mkdir(parents=True)
        record = {"runId": "ca1", "number": 1, "status": "Queued", "region": "eastus",
                  "timeoutSeconds": 60, "error": None, "image": "x/a:b", "baseImages": []}
        builds._live["ca1"] = live = _Live()
        builds._save(record)
        work = _Work(record, scratch, scratch, ["FROM x/base"], [BaseImage(0, "x/base", "base",
                     "latest")], f"http://127.0.0.1:{port}", "x", (), _Grant(None))
        live.task = asyncio.create_task(builds._run(work))
        await asked.wait()                     # bounded by the wait_for below
        assert builds.show("ca1")["status"] == "Running"
        await builds.stop()
        server.close()
        return builds.show("ca1")

    run = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert run["status"] == "Failed" and "the cluster stopped while this run was" in run["error"]


def test_runs_per_region_and_a_runs_log_are_bounded(running, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cluster.control import builds as builds_module
    from cluster.control.builds import BuildRuns, _Live

    monkeypatch.setattr(builds_module, "RUNS_PER_REGION", 0)
    status, answer = start_build(running, {"Containerfile": "FROM scratch\n"})
    assert status == 429 and "already holds 0 runs" in answer["error"]["message"], answer
    monkeypatch.setattr(builds_module, "MAX_LOG_BYTES", 10)
    builds = BuildRuns(SimpleNamespace(data_dir=tmp_path))
    builds._live["ca1"] = _Live()
    for _ in range(3):
        builds._log("ca1", b"12345678")
    text = builds.log_path("ca1").read_text()
    assert text.startswith("1234567812\n") and text.count("the log is cut at") == 1


def test_a_base_image_push_rebuilds_the_task_built_on_it(running):
    """One base-image trigger with buildah (the chain is test_task_trigger_builds',
    soak). The task's first run resolves its base and stops at buildah's parse
    of the Containerfile, which is enough: a dependency is known once a run has
    resolved it (ACR: run it once first), and it saves a build."""
    token = running.run(lambda: running.cluster.access.create_token(
        "trigpusher", repositories=[["trigbase", "content/read", "content/write"]]))
    pusher = base64.b64encode(
        f"trigpusher:{token['credentials']['passwords'][0]['value']}".encode()).decode()

    async def push(image):                 # not as admin: the admin user is disabled below
        async with running.http(headers={"Authorization": f"Basic {pusher}"}) as http:
            return await push_image(http, running.regional_endpoint("eastus"), "trigbase",
                                    image, "1")
    old = running.run(lambda: push(patched(busybox_image(), "0")))
    context = running.sources / "rebuilt"
    context.mkdir()
    (context / "Containerfile").write_text("FROM {{.Run.Registry}}/trigbase:1\nNOT-AN-INSTRUCTION\n")
    body = {"name": "rebuilt", "image": "rebuilt:1", "contextPath": str(context)}
    assert api(running, "POST", "/georeg/v1/tasks", json.dumps(body).encode())[0] == 201
    login = running.credentials
    run = api(running, "POST", "/georeg/v1/tasks/rebuilt/runs", b"",
              login_header(login.username, login.password))[1]
    first = finished(running, run["runId"])
    assert first["status"] == "Failed" and first["baseImages"][0]["digest"] == old, first
    (context / "Containerfile").write_text("FROM {{.Run.Registry}}/trigbase:1\n"
                                           "RUN echo rebuilt > /rebuilt\n")
    done = georeg("task", "update", "--name", "rebuilt", "--timeout", "600",
                  data_dir=running.data_dir)
    task = json.loads(done.stdout)
    assert task["timeout"] == 600 and task["baseImageTriggerEnabled"], done.stderr
    assert task["image"] == "rebuilt:1"                  # what was not given stays

    # The manual run's grant gave the task its identity; the triggered run acts
    # as it, so disabling the admin user does not stop the trigger.
    kept = running.data_dir / "auth" / "task-identities.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    assert api(running, "PATCH", "/georeg/v1/registry",
               b'{"adminUserEnabled": false}')[0] == 200
    try:
        new = running.run(lambda: push(patched(busybox_image(), "1")))
        running.wait_for(lambda: len(api(running, "GET", "/georeg/v1/runs?task=rebuilt")[1])
                         == 2, 30, what="a run triggered by the base image's push")
        run = finished(running, api(running, "GET",
                                    "/georeg/v1/runs?task=rebuilt")[1][0]["runId"])
    finally:
        assert api(running, "PATCH", "/georeg/v1/registry",
                   b'{"adminUserEnabled": true}')[0] == 200
    assert run["status"] == "Succeeded" and run["trigger"] == "Image Update", run
    assert run["identity"] == "task-rebuilt" and first["identity"] == login.username
    status, scope_map = api(running, "GET", "/georeg/v1/scope-maps/task-rebuilt")
    assert sorted(scope_map["actions"]) == ["repositories/rebuilt/content/read",
                                            "repositories/rebuilt/content/write",
                                            "repositories/trigbase/content/read"], scope_map
    password = json.loads(kept.read_text())["rebuilt"]
    assert password not in api(running, "GET", f"/georeg/v1/runs/{run['runId']}/log")[1]
    assert run["timeoutSeconds"] == 600
    assert [(i["repository"], i["digest"]) for i in run["imageUpdateTrigger"]["images"]] == \
        [("trigbase", new)]
    assert [b["digest"] for b in run["baseImages"]] == [new]
    listed = georeg("task", "list-runs", "--name", "rebuilt", data_dir=running.data_dir)
    assert "Image Update  eastus" in listed.stdout and f"trigbase:1@{new[:19]}" in listed.stdout


def test_a_commit_on_a_git_tasks_branch_runs_it_on_the_committed_tree(running):
    """No buildah: the committed Containerfile names a base that is not here,
    so the run ends when it resolves it, after the commit was archived."""
    from .test_task_triggers import commit, git

    repo = running.sources / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "FROM {{.Run.Registry}}/first:1\n")
    body = {"name": "fromgit", "image": "fromgit:1", "contextPath": str(repo),
            "branch": "main", "commitTriggerEnabled": True}
    status, task = api(running, "POST", "/georeg/v1/tasks", json.dumps(body).encode())
    assert status == 201 and task["branch"] == "main", task
    status, answer = api(running, "PATCH", "/georeg/v1/tasks/fromgit",
                         json.dumps({"branch": "nosuch"}).encode())
    assert status == 400 and "branch 'nosuch'" in answer["error"]["message"], answer
    seen = running.data_dir / "tasks" / "commits.json"
    running.wait_for(lambda: seen.exists() and "fromgit" in seen.read_text(), 10,
                     what="the branch's first look")
    # Run by hand once: the caller's grant gives the task its identity.
    login = running.credentials
    run = api(running, "POST", "/georeg/v1/tasks/fromgit/runs", b"",
              login_header(login.username, login.password))[1]
    assert "first:1 is not in" in finished(running, run["runId"])["error"]
    sha = commit(repo, "FROM {{.Run.Registry}}/first:committed\n")
    (repo / "Containerfile").write_text("FROM {{.Run.Registry}}/uncommitted:1\n")

    def triggered() -> list[dict]:
        return api(running, "GET", "/georeg/v1/runs?task=fromgit")[1][:-1]   # not the manual run
    running.wait_for(lambda: len(triggered()) == 1, 10, what="a run for the commit")
    run = finished(running, triggered()[0]["runId"])
    assert run["trigger"] == "Commit" and run["sourceTrigger"]["commitId"] == sha, run
    assert run["source"] == {"repositoryUrl": str(repo), "branchName": "main", "commitId": sha}
    assert "first:committed is not in" in run["error"], run
    assert len(triggered()) == 1                  # once: the tip is seen
    # A commit naming a repository the task was not given: its identity may not
    # read it (a committer gets no more than the task's last manual run showed).
    commit(repo, "FROM {{.Run.Registry}}/trigbase:1\n")
    running.wait_for(lambda: len(triggered()) == 2, 10, what="a run for the second commit")
    run = finished(running, triggered()[0]["runId"])
    assert "task-fromgit may not pull the base image repository trigbase" in run["error"], run
