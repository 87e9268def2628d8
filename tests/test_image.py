"""georeg's OCI image (``make image``, ``cluster/image``).

In ``make test``: a layer packs to the same bytes whatever the order, times and
umask its files were made with (the invariant of ``layout.py``).

Under the ``image`` marker (``make image-test``, not ``make test``: a cold
cache costs mmdebstrap, and even a warm build takes about 30 s): the build
``make image`` runs (``python -m cluster.image``, with its cache) pushes the
image to a real node with skopeo; it pulls back unchanged; it runs from the
pulled root filesystem as its config says (entrypoint, command, user,
environment, working directory), in its own network, pid and mount namespaces,
answering ``/v2/`` as the image's unprivileged user; and a second build from a
fresh copy of the checkout gives the same digest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cluster.image import __main__ as image_cli
from cluster.image import layout, rootfs

from .helpers import Skopeo, eventually, require_program

PROJECT = Path(__file__).resolve().parents[1]
TAG = "test"


def _tree(root: Path, names: list[str], mtime: float) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (root / "link").symlink_to("a/b")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return root


def test_a_layer_is_sorted_clamped_and_owned_by_root_whatever_order_and_times_its_files_have(tmp_path):
    names = ["a/b", "a/c/d", "e", "a/c/f"]
    epoch = 1_700_000_000
    first = _tree(tmp_path / "first", names, epoch + 10)
    second = _tree(tmp_path / "second", names[::-1], time.time())
    layers = [layout.pack_layer(root, tmp_path / "blobs", epoch, "test") for root in (first, second)]
    assert layers[0] == layers[1]
    blob = tmp_path / "blobs" / layers[0].digest.removeprefix("sha256:")
    with tarfile.open(blob) as tar:
        entries = [(info.name, info.mtime, info.uname) for info in tar]
    assert [name for name, _, _ in entries] == sorted(
        (name for name, _, _ in entries), key=lambda name: name.split("/"))
    assert {(mtime, uname) for _, mtime, uname in entries} == {(epoch, "root")}
    (second / "e").write_text("changed")
    assert layout.pack_layer(second, tmp_path / "blobs", epoch, "test").digest != layers[0].digest


def _tree_under_umask(root: Path, umask: int) -> Path:
    old = os.umask(umask)
    try:
        _tree(root, ["a/b", "a/c/d", "e"], 1_700_000_000)
        (root / "tool").write_text("#!/bin/sh\n")
        (root / "tool").chmod(0o777 & ~umask)
        (root / "tmp").mkdir()
        (root / "tmp").chmod(0o1777)
    finally:
        os.umask(old)
    return root


def test_a_layer_has_the_same_modes_and_digest_whatever_umask_built_its_files(tmp_path):
    packed = [layout.pack_layer(_tree_under_umask(tmp_path / f"u{umask:o}", umask),
                                tmp_path / "blobs", 1_700_000_000, "test")
              for umask in (0o022, 0o077, 0o002)]
    assert packed[0] == packed[1] == packed[2]
    with tarfile.open(tmp_path / "blobs" / packed[0].digest.removeprefix("sha256:")) as tar:
        modes = {info.name: info.mode for info in tar}
    assert (modes["a"], modes["a/b"], modes["tool"], modes["tmp"]) == (0o755, 0o644, 0o755, 0o1777)



def test_make_image_refuses_an_out_dir_it_did_not_write_and_names_a_missing_program(
        tmp_path, monkeypatch, capsys):
    (tmp_path / "keep.txt").write_text("not an image")
    assert image_cli.main(["--out", str(tmp_path), "--cache", str(tmp_path / "cache")]) == 1
    assert (tmp_path / "keep.txt").read_text() == "not an image"
    assert "refusing to delete it" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert image_cli.main(["--out", str(tmp_path / "new"), "--push", "h/r:t"]) == 1
    assert "git is not installed (Debian package git;" in capsys.readouterr().err


# Runs in the host's Python between the namespaces' set-up and the image: what a
# runtime does with the config (root, working directory, user, environment), then
# the entrypoint and command in place of itself.
LAUNCH = """
import json, os, sys
root, user, workdir, env, argv = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
uid, gid = (int(part) for part in user.split(":"))
os.chroot(root)
os.chdir(workdir or "/")
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
os.execve(argv[0], argv, dict(item.split("=", 1) for item in env))
"""
# The devices a runtime gives a container, bound from the host's.
DEVICES = ["null", "zero", "random", "urandom"]


def _run_image(root: Path, config: dict, log) -> subprocess.Popen:
    """The image unpacked in ``root`` run as its ``config`` says, in new net, pid
    and mount namespaces (loopback up, a private /proc, a minimal /dev). ``sh``
    stays pid 1 as root (it runs the node, not ``exec``s it): ``--kill-child``
    kills it when ``unshare`` dies, ``setpriv --pdeathsig`` kills ``unshare``
    when this test's process dies, and pid 1's death ends the namespace, so no
    node outlives a killed test run."""
    argv = [*config["Entrypoint"], *config["Cmd"]]
    launch = [sys.executable, "-c", LAUNCH, str(root), config["User"],
              config.get("WorkingDir", ""), json.dumps(config["Env"]), *argv]
    devices = " && ".join(f"touch {root}/dev/{dev} && mount --bind /dev/{dev} {root}/dev/{dev}"
                          for dev in DEVICES)
    script = (f"ip link set lo up && mount -t proc proc {root}/proc && "
              f"mount -t tmpfs -o mode=755,size=64k dev {root}/dev && {devices} && "
              f"{' '.join(map(_quote, launch))}; echo \"node exited: $?\"")
    return subprocess.Popen(
        ["setpriv", "--pdeathsig", "KILL", "unshare", "--net", "--pid", "--mount", "--fork",
         "--kill-child", "sh", "-c", script],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


PROBE = """
import sys, urllib.request
try:
    with urllib.request.urlopen("http://127.0.0.1:5000/v2/", timeout=2) as r:
        print(r.status, r.headers.get("Docker-Distribution-API-Version"))
except OSError as e:
    print("down", e)
"""


def _probe(pid: int) -> str:
    """GET /v2/ from inside the network namespace of ``pid`` (the host's Python)."""
    return subprocess.run(["nsenter", f"--target={pid}", "--net", sys.executable, "-c", PROBE],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def _blob(out: Path, digest: str) -> bytes:
    return (out / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


@pytest.mark.image
@pytest.mark.interop
@pytest.mark.timeout(900)  # a cold cache runs mmdebstrap
async def test_make_image_pushes_an_image_that_pulls_back_unchanged_runs_as_configured_and_rebuilds_the_same(
        node, tmp_path):
    require_program("mmdebstrap", "mmdebstrap")
    require_program("unshare", "util-linux")
    skopeo = Skopeo(tmp_path / "skopeo", node.url.removeprefix("http://"))
    ref = skopeo.ref("georeg/image:test")
    out = tmp_path / "layout"
    # What `make image PUSH=… PUSH_FLAGS=…` runs (in a thread: the node serves on this loop).
    assert await asyncio.to_thread(image_cli.main, [
        "--out", str(out), "--tag", TAG, "--push", ref,
        "--push-flags=--dest-tls-verify=false"]) == 0
    digest, manifest = layout.manifest_of(out, TAG)

    pulled = tmp_path / "pulled"
    await skopeo.copy(ref, f"oci:{pulled}:{TAG}", "--preserve-digests")
    assert layout.manifest_of(pulled, TAG) == (digest, manifest)
    config = json.loads(_blob(pulled, manifest["config"]["digest"]))
    assert config["architecture"] == "amd64"
    assert manifest["annotations"]["org.opencontainers.image.title"] == "georeg"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 3

    root = tmp_path / "rootfs"
    layout.unpack(pulled, TAG, root)
    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        proc = _run_image(root, config["config"], log)
    seen = []
    try:
        async def answers() -> bool:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            seen.append(await asyncio.to_thread(_probe, proc.pid))
            return seen[-1].startswith("200")
        await eventually(answers, timeout=60, interval=0.2,
                         what=lambda: f"/v2/: {seen[-1:]}; log: {log_path.read_text()[-3000:]}")
        assert seen[-1] == "200 registry/2.0"
        # The node wrote its data as the image's user, not as root.
        owners = {path.stat().st_uid for path in (root / "data").rglob("*")}
        assert owners == {rootfs.USER.uid}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # The namespaces died with the node: nothing of them is mounted on the host.
    assert str(root) not in await asyncio.to_thread(Path("/proc/self/mounts").read_text)

    # Again from a fresh copy of the checkout: georeg's wheel built anew, the same image.
    again, _ = await asyncio.to_thread(image_cli.build, PROJECT, tmp_path / "again",
                                       rootfs.default_cache(), TAG)
    assert again == digest
