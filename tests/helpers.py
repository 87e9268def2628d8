"""Shared test machinery: real nodes (in-process servers and child processes),
waiting for conditions, and building OCI content.

Nodes here are real: aiohttp servers on loopback sockets with real storage in
a temp dir, or `georeg node` child processes that tests can SIGKILL.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cluster.control.supervisor import dies_with_parent
from cluster.control.tls import client_context
from registry_node.app import NODE, init_app
from registry_node.config import NodeConfig
from registry_node.node import Node

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0,
                     interval: float = 0.02, what: str | Callable[[], str] = "condition") -> None:
    """Wait until ``predicate()`` is true; fail with ``what`` after ``timeout``
    seconds (a callable: called then, so it can tell what was last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for "
                                 f"{what() if callable(what) else what}")
        await asyncio.sleep(interval)


def verified_clean(running, timeout: float = 60.0, what: str = "a clean verify") -> None:
    """Run ``georeg verify`` on a ``RunningCluster`` (from a thread other than
    its loop) until it is clean; fail with the last report after ``timeout``."""
    deadline = time.monotonic() + timeout
    report = None
    while time.monotonic() < deadline:
        report = running.verify(timeout=30)
        if report.ok:
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {report.as_dict()}")


# Tests reach their nodes and clusters directly, whatever http_proxy says, as
# aiohttp (no trust_env) and skopeo (NO_PROXY) already do; urllib would send
# even loopback requests to the proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(url: str | urllib.request.Request, timeout: float = 30.0):
    """``urllib.request.urlopen``, never through a proxy."""
    return _DIRECT.open(url, timeout=timeout)


def flip(path: Path, offset: int) -> None:
    """Flip one bit of a stored file at ``offset`` (bit rot, tampering)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


# -- in-process node ---------------------------------------------------------


@dataclass
class RunningNode:
    url: str                     # http://127.0.0.1:PORT
    config: NodeConfig
    runner: web.AppRunner

    @property
    def node(self) -> Node:
        return self.runner.app[NODE]

    @property
    def registry(self):
        return self.node.registry

    async def stop(self) -> None:
        await self.runner.cleanup()


class ManualClock:
    """A node's clocks (``init_app``'s ``wall_ns`` and ``monotonic``), moved only
    by the test: a window such as GC's grace or an upload's TTL passes when the
    test calls ``advance``, never because the machine was slow. The wall clock
    starts at the real time, so that ages against file times make sense."""

    def __init__(self) -> None:
        self._wall_ns = time.time_ns()
        self._monotonic = 1000.0

    def wall_ns(self) -> int:
        return self._wall_ns

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._wall_ns += int(seconds * 1e9)
        self._monotonic += seconds


async def start_node(config: NodeConfig, clock: ManualClock | None = None) -> RunningNode:
    clocks = {} if clock is None else {"wall_ns": clock.wall_ns, "monotonic": clock.monotonic}
    runner = web.AppRunner(init_app(config, **clocks), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return RunningNode(f"http://127.0.0.1:{port}", config, runner)


@asynccontextmanager
async def started_node(config: NodeConfig, clock: ManualClock | None = None
                       ) -> AsyncIterator[RunningNode]:
    """``start_node``, stopped on leaving the block however it is left (what a
    node fixture yields)."""
    running = await start_node(config, clock)
    try:
        yield running
    finally:
        await running.stop()


# -- child-process node ------------------------------------------------------


@dataclass
class NodeProcess:
    """A `georeg node` child process; `kill()` is SIGKILL, `restart()` reuses the data dir."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    url: str = ""
    log_path: Path | None = None

    def start(self, timeout: float = 15.0) -> NodeProcess:
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "node", "--data-dir", str(self.data_dir),
             "--listen", "127.0.0.1:0", "--log-format", "json", *self.args],
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
            preexec_fn=dies_with_parent(),     # never outlives a killed test run
        )
        log.close()
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), True)
        # The node prints one line once it is serving; read it (bounded by the timeout).
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"node did not start; log: {self.log_path.read_text()[-2000:]}")
            if sel.select(remaining):
                line = self.proc.stdout.readline()
                if "listening on " in line:
                    self.url = line.split("listening on ", 1)[1].split("/v2/", 1)[0]
                    break
        sel.close()
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self) -> NodeProcess:
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()


# -- OCI content -------------------------------------------------------------


@dataclass
class Image:
    """An OCI image in memory: its blobs (config first) and its manifest bytes."""

    config: bytes
    layers: list[bytes]
    manifest: bytes
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]


def make_image(layer_sizes: list[int] = (1024, 2048), *, seed: int | None = None,
               subject: dict | None = None, artifact_type: str | None = None,
               annotations: dict | None = None) -> Image:
    rng = __import__("random").Random(seed)
    layers = [rng.randbytes(n) for n in layer_sizes]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest_of(x) for x in layers]},
                         "nonce": rng.random()}).encode()
    doc: dict = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(x), "size": len(x)} for x in layers],
    }
    if subject is not None:
        doc["subject"] = subject
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    if annotations is not None:
        doc["annotations"] = annotations
    return Image(config, layers, json.dumps(doc).encode())


def descriptor(data: bytes, media_type: str) -> dict:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


async def push_blob(session: aiohttp.ClientSession, base: str, repo: str, data: bytes) -> str:
    digest = digest_of(data)
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest},
                            data=data, headers={"Content-Type": "application/octet-stream"}) as r:
        assert r.status == 201, await r.text()
    return digest


async def push_image(session: aiohttp.ClientSession, base: str, repo: str, image: Image,
                     tag: str | None = None) -> str:
    for blob in image.blobs:
        await push_blob(session, base, repo, blob)
    ref = tag or image.digest
    async with session.put(f"{base}/v2/{repo}/manifests/{ref}", data=image.manifest,
                           headers={"Content-Type": image.media_type}) as r:
        assert r.status == 201, await r.text()
        return r.headers["Docker-Content-Digest"]


async def push_index_and_signed_image(session: aiohttp.ClientSession, base: str, repo: str, *,
                                      seed: int, index_tag: str | None, subject_tag: str,
                                      signature_layers: tuple[int, ...] = (8,)) -> dict[str, str]:
    """What retention and purge must keep apart, pushed to ``repo``: an image by
    digest under an index (tagged ``index_tag``, or by digest), and an image
    tagged ``subject_tag`` with a signature naming it as subject (images from
    ``seed``, ``seed + 1``, ``seed + 2``). Their digests by role: ``child``,
    ``index``, ``subject``, ``signature``."""
    child = make_image(seed=seed)
    child_digest = await push_image(session, base, repo, child)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [descriptor(child.manifest, child.media_type)]}).encode()
    async with session.put(f"{base}/v2/{repo}/manifests/{index_tag or digest_of(index)}",
                           data=index, headers={"Content-Type": OCI_INDEX}) as r:
        assert r.status == 201
    subject = make_image(seed=seed + 1)
    subject_digest = await push_image(session, base, repo, subject, tag=subject_tag)
    signature = make_image(list(signature_layers), seed=seed + 2,
                           subject=descriptor(subject.manifest, subject.media_type),
                           artifact_type="application/vnd.example.signature")
    return {"child": child_digest, "index": digest_of(index), "subject": subject_digest,
            "signature": await push_image(session, base, repo, signature)}


async def cluster_http(cluster, **options) -> aiohttp.ClientSession:
    """A session that sends the admin login of a started ``Cluster`` (what
    ``georeg up`` prints; nothing on an open cluster) and trusts its CA on a TLS
    cluster, as ``RunningCluster.http`` does for a cluster driven from another
    thread."""
    login = await cluster.access.admin_login() if cluster.spec.auth_enabled else None
    headers = login.headers() if login is not None else {}
    if cluster.spec.tls and "connector" not in options:
        options["connector"] = aiohttp.TCPConnector(ssl=client_context(cluster.ca_file))
    return aiohttp.ClientSession(headers={**headers, **options.pop("headers", {})}, **options)


def write_oci_layout(path: Path, image: Image, tag: str = "latest") -> None:
    """An OCI image layout directory, as skopeo's `oci:` transport reads it."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in [*image.blobs, image.manifest]:
        (blobs / digest_of(data).split(":")[1]).write_bytes(data)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        **descriptor(image.manifest, image.media_type),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


def tar_layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- OCI error bodies ----------------------------------------------------------

SPEC_ERROR_CODES = frozenset({
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
})


async def assert_error(response: aiohttp.ClientResponse, status: int, code: str | None = None) -> dict:
    """Check ``response`` is an OCI error: ``status`` and a ``{"errors": [{code, message}]}``
    body whose first code is ``code`` (when given). Returns the first error entry."""
    body = await response.read()
    assert response.status == status, (response.status, body[:500])
    if response.method == "HEAD":
        return {}
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    doc = json.loads(body)
    errors = doc["errors"]
    assert isinstance(errors, list) and errors, doc
    for entry in errors:
        assert isinstance(entry["code"], str) and isinstance(entry["message"], str), entry
    if code is not None:
        assert errors[0]["code"] == code, doc
    return errors[0]


# -- skopeo ------------------------------------------------------------------------

SKOPEO_TIMEOUT_S = 90


def require_program(name: str, package: str, found: str | None = None) -> str:
    """The path of a program a test needs. Missing, a local run skips the test;
    in CI (``CI=true``) it fails it: a skip there would turn a broken install
    green."""
    path = found if found is not None else shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian package {package}; `make install` installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class Skopeo:
    """skopeo with a sandboxed configuration; ``run`` fails the test on a non-zero exit."""

    def __init__(self, root: Path, host: str, cluster=None, cert_dir: Path | None = None) -> None:
        """``cluster``: a ``RunningCluster`` whose admin login (none on an open
        cluster) goes into this skopeo's auth file, for every address of it."""
        self.program = require_program("skopeo", "skopeo")
        self.host = host
        # With a cert dir (holding the registry's CA as ca.crt), TLS is verified
        # against it; without, skopeo is told not to verify (plain HTTP registries).
        self.cert_dir = cert_dir
        root.mkdir()
        (root / "tmp").mkdir()
        (root / "registries.d").mkdir()
        self.auth = root / "auth.json"
        self.auth.write_text('{"auths": {}}')
        if cluster is not None:
            cluster.login(self.auth)
        self.policy = root / "policy.json"
        self.policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        registries = root / "registries.conf"
        registries.write_text("unqualified-search-registries = []\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
            "XDG_RUNTIME_DIR": str(root), "XDG_CONFIG_HOME": str(root / "config"),
            "CONTAINERS_REGISTRIES_CONF": str(registries), "TMPDIR": str(root / "tmp"),
            "NO_PROXY": "*", "no_proxy": "*",
        }
        self.globals = ["--policy", str(self.policy), "--registries.d", str(root / "registries.d"),
                        "--tmpdir", str(root / "tmp"), "--command-timeout", f"{SKOPEO_TIMEOUT_S}s"]

    def ref(self, repo_and_tag: str) -> str:
        return f"docker://{self.host}/{repo_and_tag}"

    async def run(self, *args: str, check: bool = True,
                  stdin: bytes | None = None) -> tuple[int, bytes, str]:
        """``stdin``: what skopeo reads (``--password-stdin``: never a secret in argv)."""
        proc = await asyncio.create_subprocess_exec(
            self.program, *self.globals, *args, env=self.env,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), SKOPEO_TIMEOUT_S + 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"skopeo {' '.join(args)} timed out") from None
        if check:
            assert proc.returncode == 0, f"skopeo {' '.join(args)}: {err.decode()[-3000:]}"
        return proc.returncode, out, err.decode()

    def _tls(self, side: str) -> list[str]:
        if self.cert_dir is not None:
            return [f"--{side}cert-dir", str(self.cert_dir)]
        return [f"--{side}tls-verify=false"]

    async def copy(self, src: str, dst: str, *flags: str) -> None:
        tls = []
        if src.startswith("docker://"):
            tls += self._tls("src-")
        if dst.startswith("docker://"):
            tls += self._tls("dest-")
        await self.run("copy", "--quiet", "--authfile", str(self.auth), *tls, *flags, src, dst)

    async def inspect_raw(self, ref: str) -> bytes:
        _, out, _ = await self.run("inspect", "--raw", *self._tls(""),
                                   "--authfile", str(self.auth), ref)
        return out

    async def inspect(self, ref: str) -> dict:
        _, out, _ = await self.run("inspect", *self._tls(""), "--authfile", str(self.auth), ref)
        return json.loads(out)

    async def list_tags(self, repo: str) -> list[str]:
        _, out, _ = await self.run("list-tags", *self._tls(""), "--authfile", str(self.auth),
                                   self.ref(repo))
        return json.loads(out)["Tags"]

    async def delete(self, ref: str) -> None:
        await self.run("delete", *self._tls(""), "--authfile", str(self.auth), ref)
