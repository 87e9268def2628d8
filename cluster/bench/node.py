"""``georeg bench node``: one georeg node against the reference registry, side by side.

Owns the benchmark's run: it starts a georeg node (``python -m cluster.cli
node``, encryption on as always, JSON logs to a file) and the reference
registry, each on loopback in a temp dir; warms both up; then for each repeat
drives both with the identical workload (``workload``), step by step, and
collects the samples into ``Results``.

Invariants
    * Both registries get the same client, the same bytes and the same order of
      steps; which registry goes first alternates from one repeat to the next,
      and dirty pages are written back before every measured step, so neither
      pays for the other's writes.
    * Before each step the run waits (boundedly) for other processes on the
      machine to go quiet; what they used anyway is recorded in every sample.
    * Every server started here is stopped on the way out, whatever happens
      (``ExitStack``, also on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from . import procfs
from .procfs import MIB
from .profile import FORMATS, Profile
from .reference import ReferenceRegistry
from .report import GEOREG, REFERENCE, Results
from .server import ServerProcess, ServerStartError
from .workload import SMALL_OPS, Client, RandomBytes, Sample, flush_page_cache_writes, open_session


class GeoregNode(ServerProcess):
    """``georeg node`` as a child process, on a free loopback port."""

    name = "georeg node"

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "node.log")
        self.data_dir = workdir / "data"
        self.extra_args = extra_args

    def start(self, timeout_s: float = 30.0) -> GeoregNode:
        proc = self._spawn([sys.executable, "-m", "cluster.cli", "node",
                            "--data-dir", str(self.data_dir), "--listen", "127.0.0.1:0",
                            "--log-format", "json", *self.extra_args], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        # The node prints one line once it serves: "… listening on http://HOST:PORT/v2/ …".
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not self.url:
                remaining = deadline - time.monotonic()
                if proc.poll() is not None:
                    raise self._failed(f"exited with status {proc.returncode} before serving")
                if remaining <= 0:
                    raise self._failed("did not announce its address in time")
                if sel.select(remaining):
                    line = proc.stdout.readline().decode(errors="replace")
                    if not line and proc.poll() is not None:
                        continue
                    if "listening on " in line:
                        self.url = line.split("listening on ", 1)[1].split("/v2/", 1)[0]
        self.wait_until_answering(deadline)
        return self


@dataclass(frozen=True)
class NodeBenchOptions:
    layers: int = 256
    layer_bytes: int = MIB
    concurrency: int = 8
    images: int = 32              # tagged images the small operations read
    small_ops: int = 3000         # requests per small operation per run
    big_bytes: int = 512 * MIB
    repeat: int = 3
    warmup: bool = True
    targets: tuple[str, ...] = (GEOREG, REFERENCE)
    node_args: tuple[str, ...] = ()
    reference_binary: str | None = None
    workdir: Path | None = None   # kept when given; a temp dir removed afterwards otherwise
    profile_dir: Path | None = None
    profile_format: str = "raw"
    profile_native: bool = False
    seed: int = 1
    quiet_wait_s: float = 30.0    # before each step, wait up to this long for other work to stop

    def quick(self) -> NodeBenchOptions:
        """The smoke version: every step once, at sizes that run in well under 30 s."""
        return replace(self, layers=64, images=8, small_ops=1000, big_bytes=128 * MIB, repeat=1)

    def workload(self) -> dict[str, int | bool | str]:
        return {"layers": self.layers, "layer_bytes": self.layer_bytes,
                "concurrency": self.concurrency, "images": self.images,
                "small_ops": self.small_ops, "big_bytes": self.big_bytes, "warmup": self.warmup,
                "node_args": " ".join(self.node_args), "seed": self.seed,
                "quiet_wait_s": self.quiet_wait_s,
                "client": "one process, aiohttp on uvloop, one session per registry"}


Report = Callable[[str], None]


async def run(options: NodeBenchOptions, console: Console | None = None) -> Results:
    console = console or Console(stderr=True)
    say: Report = lambda text: console.print(f"[dim]{text}[/dim]")  # noqa: E731
    with contextlib.ExitStack() as stack:
        if options.workdir is not None:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="georeg-bench-")))
        servers: dict[str, ServerProcess] = {}
        for name in options.targets:
            server: ServerProcess
            if name == GEOREG:
                server = GeoregNode(workdir / "georeg", options.node_args)
            else:
                server = ReferenceRegistry(workdir / "reference", options.reference_binary)
            stack.callback(server.stop)   # registered before start: stopped even if start fails
            server.start()
            servers[name] = server
            say(f"{name}: {server.url} (pid {server.pid}, log {server.log_path})")
        reference_binary = getattr(servers.get(REFERENCE), "binary", options.reference_binary
                                   or "/usr/bin/docker-registry")
        results = Results(procfs.machine(reference_binary), options.workload(), options.repeat,
                          list(servers), profiled=options.profile_dir is not None)
        async with contextlib.AsyncExitStack() as sessions:
            clients = {name: Client(server, await sessions.enter_async_context(
                           open_session(options.concurrency)), options.concurrency)
                       for name, server in servers.items()}
            await _drive(options, clients, results, say)
        return results


async def _drive(options: NodeBenchOptions, clients: dict[str, Client], results: Results,
                 say: Report) -> None:
    content = RandomBytes(options.seed)
    small_repo = "bench/small"
    warm = content.layers(min(options.layers, 16), options.layer_bytes)
    digests = [digest for digest, _ in warm.blobs]
    tags: list[str] = []
    for name, client in clients.items():
        say(f"{name}: warming up and pushing {options.images} images for small operations")
        await client.push_layers(small_repo, warm)
        await client.pull_layers(small_repo, warm)
        tags = await client.push_images(small_repo, warm, options.images)
        if options.warmup:
            for kind in SMALL_OPS:
                await client.small_ops(kind, small_repo, digests, tags, max(50, options.small_ops // 10))
    del warm

    names = list(clients)
    for run_index in range(options.repeat):
        order = names if run_index % 2 == 0 else names[::-1]
        run = _Run(options, clients, results, say, run_index)
        await run.all_steps(order, content, small_repo, digests, tags)


@dataclass
class _Run:
    """One repeat: measures a step against one registry and records the sample."""

    options: NodeBenchOptions
    clients: dict[str, Client]
    results: Results
    say: Report
    index: int

    async def step(self, step: str, name: str,
                   measure: Callable[[Client], Awaitable[Sample]]) -> Sample:
        client = self.clients[name]
        flush_page_cache_writes()
        if self.options.quiet_wait_s > 0:
            pids = [c.target.pid for c in self.clients.values()]
            load = await procfs.wait_for_quiet(pids, self.options.quiet_wait_s)
            if load >= 0.1:
                self.say(f"other processes still use {load:.0%} of a core; measuring {step} anyway")
        profile = _profile(self.options, client, step, self.index)
        with profile or contextlib.nullcontext():
            sample = await measure(client)
        self.results.add(step, name, sample)
        unit = "ops/s" if step in SMALL_OPS else "MB/s"
        extra = f", p99 {sample.p99_ms:.1f} ms" if sample.p99_ms is not None else ""
        if sample.peak_rss is not None:
            extra += f", server peak RSS {sample.peak_rss / MIB:.0f} MiB"
        self.say(f"run {self.index + 1}/{self.options.repeat} {step:<12} {name:<9} "
                 f"{sample.value:9.1f} {unit}{extra}")
        return sample

    async def all_steps(self, order: list[str], content: RandomBytes, small_repo: str,
                        digests: list[str], tags: list[str]) -> None:
        options = self.options
        await self._layer_steps(order, content)
        for kind in SMALL_OPS:
            for name in order:
                await self.step(kind, name, lambda c, k=kind: c.small_ops(
                    k, small_repo, digests, tags, options.small_ops))
        big_repo = f"bench/big-{self.index}"
        for name in order:
            uploaded: list[str] = []

            async def up(c: Client, out: list[str] = uploaded) -> Sample:
                sample, digest = await c.upload_big(big_repo, options.big_bytes, content,
                                                    stream=self.index)
                out.append(digest)
                return sample

            await self.step("big_upload", name, up)
            await self.step("big_download", name, lambda c, d=uploaded: c.download_big(
                big_repo, d[0], options.big_bytes))


    async def _layer_steps(self, order: list[str], content: RandomBytes) -> None:
        """Push then pull the run's layers (held only while this runs)."""
        repo = f"bench/layers-{self.index}"
        layers = content.layers(self.options.layers, self.options.layer_bytes)
        for name in order:
            await self.step("push", name, lambda c: c.push_layers(repo, layers))
        for name in order:
            await self.step("pull", name, lambda c: c.pull_layers(repo, layers))


def _profile(options: NodeBenchOptions, client: Client, step: str, run_index: int) -> Profile | None:
    """py-spy on the georeg node during the first run of each step, if asked."""
    if options.profile_dir is None or run_index != 0 or not isinstance(client.target, GeoregNode):
        return None
    options.profile_dir.mkdir(parents=True, exist_ok=True)
    path = options.profile_dir / f"profile-{step}.{FORMATS[options.profile_format]}"
    return Profile(client.target.pid, path, options.profile_format, native=options.profile_native)


__all__ = ["GeoregNode", "NodeBenchOptions", "ServerStartError", "run"]
