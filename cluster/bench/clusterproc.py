"""A georeg cluster for the cluster benchmarks, in a process of its own.

``ClusterProcess.start`` writes the spec into a fresh data dir and runs
``georeg up`` there as a child process (which calls ``Cluster.start``); it is
ready once the cluster has written its state file, which ``Cluster`` does only
after every node is healthy, subscribed to every peer and writable.
``ClusterProcess.attach`` uses a cluster already running from a data dir.

Why a child process rather than ``Cluster.start`` in the benchmark's own
process: the WAN links are asyncio proxies in the supervisor, and the
benchmark's client (pushing, hashing, polling) would otherwise share their
event loop or their GIL, adding delay to exactly what is being measured.

Everything the benchmark needs comes from the spec (``cluster.control.plan``: node
ports and names, the WAN model) and the management API (node pids, faults). A
spec that leaves its ports open (``port_base = 0``) is planned once the cluster
has started, from the spec it saved with the range it got.
On a cluster with auth (``auth = "token"``) the benchmark is the cluster's
owner, as ``georeg`` commands run from its data dir are: management calls
carry the owner credential, its registry clients the admin user's
(``registry_headers``: asked of the management API), its reads of a node's
internal routes the internal credential (``internal_headers``), and its gRPC
channels to a node present that node's own certificate from the cluster CA
(``grpc_channel``: nodes accept nothing else, and a node asked with its own
identity answers as it would itself, residency included).
Only a cluster this class started is stopped by it: SIGTERM to the supervisor,
which stops its nodes; should it not exit in time, it and the node pids it
reported are killed, one by one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc

from replicator.peer_identity import PeerCredentials

from ..control import spec as specs
from ..control.access import (
    AdminLogin,
    CredentialMissing,
    authorization,
    read_internal_credential,
    read_owner_credential,
)
from ..control.management_client import ManagementError, request
from ..control.plan import ClusterPlan, NodePlan, plan
from ..control.state import running_state, save_spec, saved_spec
from ..control.tls import client_context

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


class ClusterStartError(RuntimeError):
    pass


class ClusterProcess:
    def __init__(self, spec: specs.ClusterSpec, data_dir: Path,
                 process: subprocess.Popen | None = None) -> None:
        self.spec = spec = spec.seeded()
        self.data_dir = data_dir.resolve()
        self.process = process
        self.plan: ClusterPlan | None = None
        if spec.network.port_base != specs.ANY_PORT_BASE:
            self.plan = plan(spec, self.data_dir)
        self.management = ""
        self.pids: dict[str, int] = {}
        self._registry_headers: dict[str, str] | None = None

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def start(cls, spec: specs.ClusterSpec, data_dir: Path,
              timeout_s: float = START_TIMEOUT_S) -> ClusterProcess:
        data_dir.mkdir(parents=True, exist_ok=True)
        spec = spec.seeded()          # decided here, so this plan and the child's agree
        save_spec(data_dir, spec)
        (data_dir / "logs").mkdir(exist_ok=True)
        log_path = data_dir / "logs" / "supervisor.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cluster.cli", "up", "--data-dir", str(data_dir),
                 "--log-format", "json"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        cluster = cls(spec, data_dir, process)
        try:
            cluster._wait_ready(time.monotonic() + timeout_s, log_path)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def attach(cls, data_dir: Path) -> ClusterProcess:
        spec = saved_spec(data_dir)
        if spec is None or running_state(data_dir) is None:
            raise ClusterStartError(f"no georeg cluster is running from {data_dir}")
        cluster = cls(spec, data_dir)
        cluster._wait_ready(time.monotonic() + 30, None)
        return cluster

    def _wait_ready(self, deadline: float, log_path: Path | None) -> None:
        while True:
            if self.process is not None and self.process.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-20:] if log_path else []
                raise ClusterStartError("the cluster did not start:\n" + "\n".join(tail))
            state = running_state(self.data_dir)
            if state is not None and state.get("management"):
                self.management = state["management"]
                started = saved_spec(self.data_dir)   # with the ports the cluster got
                if started is not None and started != self.spec:
                    self.spec, self.plan = started, plan(started, self.data_dir)
                status = self.call("GET", "/georeg/v1/cluster")
                self.pids = {n["name"]: n["pid"] for n in status["nodes"] if n.get("pid")}
                if all(n["healthy"] for n in status["nodes"]):
                    return
            if time.monotonic() > deadline:
                raise ClusterStartError(f"the cluster in {self.data_dir} was not ready in time; "
                                        f"see {self.data_dir / 'logs'}")
            time.sleep(0.1)  # poll interval, bounded by the deadline above

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in self.pids.values():  # nodes die with their supervisor; make sure
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # -- what the benchmarks use -----------------------------------------------------------

    @property
    def nodes(self) -> tuple[NodePlan, ...]:
        """The serving nodes (not paired-region copies), in plan order."""
        return self.plan.nodes

    def node(self, name: str) -> NodePlan:
        return self.plan.node(name)

    def http(self, name: str) -> str:
        node = self.node(name)          # at its own host (loopback unless placed)
        return f"{self.plan.scheme}://{node.host}:{node.http_port}"

    @property
    def tls(self) -> ssl.SSLContext | None:
        """What verifies the nodes' certificates on a TLS cluster (its CA)."""
        return client_context(self.plan.ca_file) if self.spec.tls else None

    def grpc(self, name: str) -> str:
        node = self.node(name)
        return f"{node.host}:{node.grpc_port}"

    @property
    def supervisor_pid(self) -> int | None:
        state = running_state(self.data_dir)
        return state["pid"] if state else None

    def all_pids(self) -> list[int]:
        pids = list(self.pids.values())
        if self.supervisor_pid:
            pids.append(self.supervisor_pid)
        return pids

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> object:
        try:
            return request(self.management, method, path, body, timeout,
                           headers=self._credential(read_owner_credential),
                           tls=client_context(self.plan.ca_file)
                           if self.management.startswith("https:") else None)
        except ManagementError as exc:
            raise ClusterStartError(str(exc)) from None

    def _credential(self, read) -> dict[str, str]:
        """``read``'s credential from the data dir as a header ({} without auth)."""
        if not self.spec.auth_enabled:
            return {}
        try:
            return authorization(read(self.data_dir))
        except CredentialMissing as exc:
            raise ClusterStartError(str(exc)) from None

    def internal_headers(self) -> dict[str, str]:
        """What a node's internal routes (``/metrics``, ...) need ({} without auth)."""
        return self._credential(read_internal_credential)

    def registry_headers(self) -> dict[str, str]:
        """A registry client's credentials: the admin user's ({} without auth)."""
        if self._registry_headers is None:
            self._registry_headers = {}
            if self.spec.auth_enabled:
                login = AdminLogin.from_shown(self.call("GET", "/georeg/v1/registry/credentials"))
                if login is None:
                    raise ClusterStartError("the benchmark's client logs in as the admin user, "
                                            "and no admin password works; enable it with "
                                            "`georeg registry update --admin-enabled true`")
                self._registry_headers = login.headers()
        return self._registry_headers

    def grpc_channel(self, name: str) -> grpc.aio.Channel:
        """A channel to node ``name``'s replication port, as the node itself would
        open it (mutual TLS with its certificate on a cluster with auth or TLS)."""
        node, target = self.node(name), self.grpc(name)
        files = node.access or node.tls
        if files is None:
            return grpc.aio.insecure_channel(target)
        identity = PeerCredentials.load(files.ca_file, files.key_file, files.cert_file)
        return grpc.aio.secure_channel(target, identity.channel())

    def inject(self, kind: str, **target) -> dict:
        return self.call("POST", "/georeg/v1/faults", {"kind": kind, **target})

    def heal_all(self) -> None:
        self.call("DELETE", "/georeg/v1/faults")

    def resolve_node(self, name: str) -> NodePlan:
        """A node by name, or a region's first node."""
        for node in self.nodes:
            if node.name == name:
                return node
        for node in self.nodes:
            if node.region == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ClusterStartError(f"{name!r} is neither a node nor a region of this cluster "
                                f"(nodes: {known})")
