"""georeg's OCI image (``make image``, ``cluster/image``): pushed to a real node
with skopeo and pulled back unchanged, then run from the pulled root filesystem
as pid 1 of its own network, pid and mount namespaces, answering ``/v2/`` as
the image's unprivileged user; and packed twice from the same stages (one of
them freshly touched, as a new checkout would be) to the same digest.

The Debian and wheel stages come from the build cache (``rootfs.py``): the
first run on a machine pays for mmdebstrap and pip, later ones only pack.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from cluster.image import __main__ as image_cli
from cluster.image import layout, rootfs

from .helpers import Skopeo, eventually, require_program

PROJECT = Path(__file__).resolve().parents[1]
TAG = "test"

# A cold cache builds the Debian stage (mmdebstrap) and fetches the wheels.
pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def built():
    """The image's layout, and georeg's stage, in a temporary directory removed after."""
    require_program("mmdebstrap", "mmdebstrap")
    require_program("unshare", "util-linux")
    with tempfile.TemporaryDirectory(prefix="georeg-image-") as tmp:
        app, out = Path(tmp, "app"), Path(tmp, "layout")
        rootfs.app(PROJECT, app)
        digest, _ = image_cli.assemble(PROJECT, app, out, rootfs.default_cache(), TAG)
        yield {"tmp": Path(tmp), "app": app, "out": out, "digest": digest}


def test_packing_again_from_fresh_files_gives_the_same_digest_and_a_registry_node_config(built):
    # georeg's stage copied anew, every file newer than the epoch and made in
    # another order, as a fresh checkout's would be; the cached stages' layers
    # are reused as packed (their packing is the same code, tested below).
    app = built["tmp"] / "app-again"
    shutil.copytree(built["app"], app)
    now = time.time()
    for path in [app, *app.rglob("*")]:
        os.utime(path, (now, now), follow_symlinks=False)
    again = built["tmp"] / "layout-again"
    digest, _ = image_cli.assemble(PROJECT, app, again, rootfs.default_cache(), TAG)
    assert digest == built["digest"]
    shutil.rmtree(again)
    _, manifest = layout.manifest_of(built["out"], TAG)
    config = json.loads((built["out"] / "blobs" / "sha256" /
                         manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/georeg", "node"]
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["ExposedPorts"] == {"5000/tcp": {}}
    assert manifest["annotations"]["org.opencontainers.image.title"] == "georeg"
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 3


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


def _namespaced_node(root: Path, log) -> subprocess.Popen:
    """``georeg node`` from ``root`` as pid 1 of new net, pid and mount
    namespaces (loopback up, a private /proc), as the image's user, in a
    session of its own: killing its process group ends it and its namespaces
    (``--kill-child`` cannot: the switch of user clears the parent-death signal)."""
    user = f"{rootfs.USER.uid}:{rootfs.USER.gid}"
    script = (f"ip link set lo up && mount -t proc proc {root}/proc && "
              f"exec chroot --userspec={user} {root} /usr/local/bin/georeg node "
              "--data-dir /data --listen 127.0.0.1:5000")
    return subprocess.Popen(
        ["unshare", "--net", "--pid", "--mount", "--fork", "sh", "-c", script],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/data"},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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


async def test_image_pushed_to_a_node_pulls_back_unchanged_and_runs_georeg_node(
        built, node, tmp_path):
    skopeo = Skopeo(tmp_path / "skopeo", node.url.removeprefix("http://"))
    ref = skopeo.ref("georeg/image:test")
    await skopeo.copy(f"oci:{built['out']}:{TAG}", ref, "--preserve-digests")
    pulled = built["tmp"] / "pulled"
    await skopeo.copy(ref, f"oci:{pulled}:{TAG}", "--preserve-digests")
    digest, manifest = layout.manifest_of(pulled, TAG)
    assert digest == built["digest"]
    assert manifest == layout.manifest_of(built["out"], TAG)[1]

    root = built["tmp"] / "rootfs"
    layout.unpack(pulled, TAG, root)
    log_path = built["tmp"] / "node.log"
    with log_path.open("wb") as log:
        proc = _namespaced_node(root, log)
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
