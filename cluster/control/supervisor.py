"""The supervisor: runs a whole cluster from its plan and stops it cleanly.

It starts one ``georeg node`` process per node (each in its own process
group, and killed by the kernel if the supervisor dies, so nothing is ever
orphaned), the WAN links between them and the routing endpoints in its own
event loop, and watches every node's health. Node processes log to
``<data dir>/logs/<node>.log``.

Health: a node is healthy when its process runs and ``GET /georeg/v1/node``
answers within a second; it is checked every half second, and marked down at
once when its process exits or a router fails to connect to it.

Access: on a cluster with auth, each node is given the files its plan names
(``NodeAccess``: CA, its key and certificate, the login server, the internal
credential) as paths on its command line — never a secret, which anyone may
read there (``ps``) — and the health checks carry the internal credential.
On a TLS cluster each node is also given its certificate (``NodeTls``) and
the health checks speak HTTPS, trusting the cluster CA only.

Pausing (``pause_node``, the grey failure of ``georeg fault pause``): SIGSTOP
to the node's process group; its sockets stay open and nothing answers, so
health checks notice it only by their timeouts. ``resume_node`` sends
SIGCONT. A paused node is never left behind: stopping it (a fault, a
restart, the cluster stopping) sends SIGCONT after its signal, so a SIGTERM
is acted on and the process exits as any other.

Hosts (docs/multihost.md): every node starts through its host
(``cluster.control.hosts``: this machine unless the plan places the node on
a host of its own, which the cluster is given by address); the files its
command line names are put there through the host before it starts (its
view whenever the view changes, ``put_view``), never read back from it.
Health checks, links and endpoints reach a node at its own address.

Ports come from the plan. One found in use — by a link here, or by a node
process, which exits with ``EXIT_ADDRESS_IN_USE`` — raises ``PortInUse``.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import ctypes
import errno
import importlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from registry_node import broken_build
from registry_node.server import EXIT_ADDRESS_IN_USE
from replicator.topology import ClusterView, ReplicationSettings

from ..network.links import Link
from .errors import PortInUse
from .hosts import LOCAL, NodeHost
from .plan import ClusterPlan, NodePlan, node_arguments
from .tls import client_context

log = structlog.get_logger("georeg.supervisor")

HEALTH_INTERVAL_S = 1.0     # a dead process is seen at once (_watch_exit); this is for hung ones
HEALTH_SETTLING_INTERVAL_S = 0.2   # while some live node is not healthy yet
HEALTH_TIMEOUT_S = 1.0
HEALTH_FAILURES = 2          # consecutive failed checks before a live process is unhealthy
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
# A node process sets its own allocator (registry_node.allocator); a
# MALLOC_* variable in the environment would override it.
NODE_ENV = {"PYTHONUNBUFFERED": "1"}


def node_environment(inherited: Mapping[str, str], asked: Mapping[str, str]) -> dict[str, str]:
    """A node's environment: this process's without its test-only variables
    (``GEOREG_TEST_*``: a user who once exported one must not get broken
    nodes, registry_node.broken_build), then ``NODE_ENV``, then what the
    caller (a test harness, never a spec or the CLI) asked for."""
    kept = {k: v for k, v in inherited.items() if not k.startswith(broken_build.TEST_PREFIX)}
    return {**kept, **NODE_ENV, **asked}
PAIR_COPY_NICE = 10


# What a node process imports of this project (the rest is installed compiled).
NODE_PACKAGES = ("registry_node", "replicator", "cluster")


def ensure_bytecode() -> None:
    """Compile the packages a node imports, once, before many nodes start.
    Where ``PYTHONDONTWRITEBYTECODE`` is set (CI images, containers) or the
    sources changed since they were last compiled, every node process would
    otherwise compile every module at every start and throw the result away:
    0.35 CPU-s per node here, 3.5 s of a 2-core machine for the default
    cluster. Up to date, this only compares timestamps (~20 ms); where the
    sources are read-only it changes nothing."""
    for package in NODE_PACKAGES:
        directory = Path(importlib.import_module(package).__file__).parent
        with contextlib.suppress(OSError):
            compileall.compile_dir(directory, quiet=2, workers=1)


def dies_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for a child process that must not outlive this one: the
    kernel sends it ``signum`` when the thread that started it ends (so start
    children from a thread that lives as long as they should). Where prctl is
    missing, the child simply does not get the guard."""

    def in_child() -> None:  # runs in the child between fork and exec
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)

    return in_child


_die_with_parent = dies_with_parent(signal.SIGKILL)


def _storage_copy_child() -> None:
    """A paired-region copy is storage, not a registry anyone waits on: its
    process yields the CPU to the serving nodes (on two cores, an image's
    copies all arrive at once and compete)."""
    _die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(PAIR_COPY_NICE)


class NodeStartError(RuntimeError):
    pass


@dataclass
class NodeRuntime:
    """A node as the supervisor sees it."""

    plan: NodePlan
    process: asyncio.subprocess.Process | None = None
    state: str = "stopped"          # starting | healthy | unhealthy | stopped | crashed
    reason: str = ""
    info: dict = field(default_factory=dict)
    last_ok: float = 0.0
    failures: int = 0
    started_at: float = 0.0
    intended_down: bool = False     # stopped on purpose (fault or command): not a failure
    paused: bool = False            # SIGSTOPped (a pause fault) until resumed or stopped

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def url(self) -> str:
        scheme = "https" if self.plan.tls is not None else "http"
        return f"{scheme}://{self.plan.host}:{self.plan.http_port}"

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None


class Supervisor:
    def __init__(self, plan: ClusterPlan, *, settings: ReplicationSettings | None = None,
                 extra_node_args: tuple[str, ...] = (),
                 internal_headers: dict[str, str] | None = None,
                 node_env: Mapping[str, str] | None = None,
                 hosts: Mapping[str, NodeHost] | None = None) -> None:
        self.plan = plan
        self.hosts = dict(hosts or {})           # by address: where placed nodes run
        self.node_env = dict(node_env or {})     # test harnesses only (node_environment)
        self.settings = settings or ReplicationSettings()
        self.extra_node_args = extra_node_args
        self.internal_headers = internal_headers or {}
        self.nodes: dict[str, NodeRuntime] = {n.name: NodeRuntime(n) for n in plan.all_nodes}
        self.links: dict[tuple[str, str], Link] = {}
        self._health_task: asyncio.Task | None = None
        self._watchers: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self._listeners: list[Callable[[NodeRuntime], None]] = []

    def on_health_change(self, listener: Callable[[NodeRuntime], None]) -> Callable[[], None]:
        """Call ``listener`` on every change of a node's state; returns what
        unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _set_state(self, node: NodeRuntime, state: str, reason: str = "") -> None:
        if node.state != state:
            log.info("node_state", node=node.name, state=state, reason=reason or None)
            node.state, node.reason = state, reason
            for listener in self._listeners:
                listener(node)

    # -- lifecycle -------------------------------------------------------------------

    async def open_links(self) -> None:
        """Every link of the plan listening (the first sockets a cluster binds:
        a port in use fails here, before anything is written)."""
        for link_plan in (*self.plan.links, *self.plan.management_links):
            if (link_plan.source, link_plan.target) not in self.links:
                await self.add_link(link_plan)

    async def start(self) -> None:
        plan = self.plan
        await self.open_links()
        for sub in ("nodes", "views", "logs"):
            (plan.data_dir / sub).mkdir(parents=True, exist_ok=True)
        # On a TLS cluster the CA exists by now (the cluster provisions it first).
        tls = client_context(plan.ca_file) if plan.spec.tls else None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S),
                                              headers=self.internal_headers,
                                              connector=aiohttp.TCPConnector(ssl=tls or True))
        for node in plan.all_nodes:
            self.put_view(node, plan.view(node, self.settings))
        await asyncio.get_running_loop().run_in_executor(None, ensure_bytecode)
        try:
            await asyncio.gather(*(self.start_node(n) for n in self.nodes))
        except BaseException:
            await self.stop()
            raise
        self._health_task = asyncio.create_task(self._watch_health(), name="health")

    def host(self, node: NodePlan) -> NodeHost:
        """Where ``node`` runs: this machine, or the host given for its address."""
        if node.host_root is None:
            return LOCAL
        host = self.hosts.get(node.host)
        if host is None:
            raise NodeStartError(
                f"node {node.name} is placed on {node.host} ([network.hosts]), but the cluster "
                f"was given no way to run it there: start a multi-host cluster from Python with "
                f"Cluster.start(spec, hosts={{address: host}}) (docs/multihost.md)")
        if host.sees(self.plan.data_dir):
            raise NodeStartError(
                f"node {node.name}'s host {node.host} sees this cluster's data dir "
                f"{self.plan.data_dir} (the CA key, every node's key, the credentials): keep "
                f"the data dir out of what the host is given of this machine")
        return host

    def put_files(self, node: NodePlan) -> None:
        """The files the cluster made for ``node`` (access, TLS, configuration
        key) put on its own host (a node on this one reads them in place).
        A few small files, put before every start of the node."""
        if node.host_root is None:
            return
        host = self.host(node)
        for path in node.given_files:
            host.put(path, self.plan.control_copy(node, path).read_bytes())

    def put_view(self, node: NodePlan, view: ClusterView) -> None:
        """``node``'s view where it reads it (it reloads it when it changes)."""
        self.host(node).put(node.view_file, view.encode())

    def remove_data(self, name: str) -> None:
        """Node ``name``'s data dir gone, on its host."""
        node = self.plan.node(name)
        self.host(node).remove(node.data_dir)

    async def add_link(self, link_plan) -> Link:
        link = Link(link_plan.name, (link_plan.target_host, link_plan.target_port),
                    link_plan.model, listen_host=link_plan.listen_host,
                    listen_port=link_plan.port, rng=random.Random(link_plan.seed))
        try:
            await link.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"port {link_plan.port} (link {link_plan.name}) is in use") \
                    from None
            raise
        self.links[(link_plan.source, link_plan.target)] = link
        return link

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        await asyncio.gather(*(self.stop_node(name, graceful=True) for name in self.nodes),
                             return_exceptions=True)
        for link in self.links.values():
            await link.stop()
        self.links.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- nodes -----------------------------------------------------------------------

    def node_command(self, node: NodePlan) -> list[str]:
        return self.host(node).command(
            [sys.executable, "-m", "cluster.cli", "node",
             *node_arguments(node, f"{node.host}:{node.http_port}"), *self.extra_node_args])

    async def start_node(self, name: str) -> NodeRuntime:
        node = self.nodes[name]
        if node.pid is not None:
            return node
        node.intended_down = False
        node.paused = False             # a new process: never stopped by us yet
        self._set_state(node, "starting")
        node.plan.log_file.parent.mkdir(parents=True, exist_ok=True)
        # At every start (a new replica's node, a host that lost them); through
        # the host, which may be another machine: off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self.put_files, node.plan)
        env = node_environment(os.environ, self.node_env)
        with open(node.plan.log_file, "ab") as log_file:  # noqa: ASYNC230 - a local append, microseconds
            node.process = await asyncio.create_subprocess_exec(
                *self.node_command(node.plan), stdout=asyncio.subprocess.PIPE, stderr=log_file,
                stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True,
                preexec_fn=_storage_copy_child if node.plan.copy_of else _die_with_parent)
        node.started_at = time.monotonic()
        try:
            line = await asyncio.wait_for(self._ready_line(node), START_TIMEOUT_S)
        except (TimeoutError, NodeStartError) as exc:
            await self.stop_node(name, graceful=False)
            if node.process.returncode == EXIT_ADDRESS_IN_USE:
                raise PortInUse(f"port {node.plan.http_port} or {node.plan.grpc_port} (node {name}, "
                                f"HTTP and replication) is in use\n{_tail(node.plan.log_file, 2)}") \
                    from None
            tail = _tail(node.plan.log_file)
            raise NodeStartError(f"node {name} did not start: {exc or 'timed out'}\n{tail}") from None
        log.info("node_started", node=name, pid=node.process.pid, line=line)
        self._watchers[name] = asyncio.create_task(self._watch_exit(node), name=f"exit:{name}")
        await self._check(node)
        return node

    async def _ready_line(self, node: NodeRuntime) -> str:
        assert node.process and node.process.stdout
        while True:
            raw = await node.process.stdout.readline()
            if not raw:
                code = await node.process.wait()
                raise NodeStartError(f"exited with status {code}")
            line = raw.decode(errors="replace").strip()
            if "listening on" in line:
                return line

    async def _watch_exit(self, node: NodeRuntime) -> None:
        process = node.process
        assert process is not None
        code = await process.wait()
        if node.process is process:
            if node.intended_down:
                self._set_state(node, "stopped", f"exit status {code}")
            else:
                self._set_state(node, "crashed", f"exit status {code}")

    async def stop_node(self, name: str, *, graceful: bool = True) -> None:
        """Stop a node: SIGTERM and wait (graceful), or SIGKILL (a crash)."""
        node = self.nodes[name]
        process = node.process
        if process is None or process.returncode is not None:
            return
        node.intended_down = True
        self._set_state(node, "stopping" if graceful else "crashed",
                        "stopped" if graceful else "killed (SIGKILL)")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        if node.paused:                 # a stopped process acts on SIGTERM only once continued
            self._continue(node)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S if graceful else 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()
        node.paused = False             # its process is gone
        self._set_state(node, "stopped" if graceful else "crashed",
                        "stopped" if graceful else "killed (SIGKILL)")

    def pause_node(self, name: str) -> bool:
        """SIGSTOP the node's process group: it keeps its sockets and answers
        nothing (health checks see timeouts). False if it is not running, or
        is being stopped (a stop under way must finish: SIGSTOP now would hold
        it mid-shutdown until the stop's timeout kills it)."""
        node = self.nodes[name]
        if node.pid is None or node.intended_down or node.state == "stopping":
            return False
        try:
            os.killpg(node.pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        node.paused = True
        log.info("node_paused", node=name, pid=node.pid)
        return True

    def resume_node(self, name: str) -> None:
        """SIGCONT a paused node (nothing if it is not paused)."""
        node = self.nodes[name]
        if node.paused:
            self._continue(node)
            log.info("node_resumed", node=name)

    def _continue(self, node: NodeRuntime) -> None:
        node.paused = False
        if node.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGCONT)

    async def restart_node(self, name: str) -> NodeRuntime:
        await self.stop_node(name, graceful=True)
        return await self.start_node(name)

    # -- health ----------------------------------------------------------------------

    # A check round lasts as long as its slowest check: while a node is
    # paused, HEALTH_TIMEOUT_S, so the rounds of every node stretch from
    # ~HEALTH_INTERVAL_S to ~HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S, and a second
    # node failing then is found up to ~HEALTH_TIMEOUT_S later than the bound
    # in docs/faults.md (its own clients move when it is found: the bound for
    # a first failure is unchanged). One round for all keeps the checks to
    # one task; docs/faults.md says the same.
    async def _watch_health(self) -> None:
        while True:
            live = [n for n in self.nodes.values() if n.pid is not None]
            await asyncio.gather(*(self._check(n) for n in live))
            # Quickly while a node is on its way up (start-up, a restart, a
            # recovery), at rest once every live node is healthy.
            settling = any(n.state != "healthy" for n in live)
            await asyncio.sleep(HEALTH_SETTLING_INTERVAL_S if settling else HEALTH_INTERVAL_S)

    async def _check(self, node: NodeRuntime) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"{node.url}/georeg/v1/node") as r:
                if r.status == 200:
                    node.info = await r.json()
                    node.last_ok = time.monotonic()
                    # A (re)starting node joins routing once it can take writes (its
                    # zone quorum formed); a running one stays in for reads regardless.
                    ready = node.state != "starting" or node.info.get("writable", True)
                    node.failures = 0
                    if node.pid is not None and ready:
                        self._set_state(node, "healthy")
                    return
                reason = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        node.failures += 1
        # One slow answer on a loaded machine is not an outage; a dead process is
        # noticed at once by _watch_exit, and routers mark refused nodes down.
        if node.pid is not None and node.state != "starting" and node.failures >= HEALTH_FAILURES:
            self._set_state(node, "unhealthy", reason)

    def mark_down(self, name: str, reason: str) -> None:
        """A router could not reach the node: take it out of rotation until the
        next successful health check."""
        node = self.nodes.get(name)
        if node is not None and node.state == "healthy":
            self._set_state(node, "unhealthy", reason)

    async def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not all(n.healthy for n in self.nodes.values() if not n.intended_down):
            if time.monotonic() > deadline:
                bad = {n.name: f"{n.state} {n.reason}" for n in self.nodes.values() if not n.healthy}
                raise NodeStartError(f"nodes not healthy after {timeout:g}s: {bad}")
            await asyncio.sleep(0.05)


def _tail(path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)
