"""A georeg cluster for tests, from synchronous or asynchronous code alike.

``RunningCluster`` runs a ``Cluster`` (node processes, links, endpoints,
management API) on an event loop of its own, in a background thread, and
exposes plain methods: a test can push with skopeo or ``requests``, break a
region, and assert, without caring about event loops. The pytest plugin
(``cluster.pytest_plugin``) hands one to tests as the ``georeg_cluster``
fixture.

Clusters require credentials by default (``auth = "token"``, as ACR), and a
``RunningCluster`` hands its clients the admin user's: ``credentials``
(username, password), ``auth_headers()`` for raw HTTP clients, ``http()`` for
an aiohttp session that sends them, ``login(path)`` for an auth file that
skopeo, podman, docker and oras read. A test that plays the owner or the
cluster itself has ``owner_headers()`` (the management API) and
``internal_headers()`` (nodes' internal routes). On an open cluster
(``auth = "none"``) the same calls give no credentials, no headers, a plain
session and an auth file with no entries, so a test reads the same either way.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec

from .control import management_client
from .control import spec as specs
from .control.access import AdminLogin, authorization
from .control.cluster import Cluster
from .control.management import ManagementServer
from .control.private_files import write_private
from .control.tls import client_context
from .faults.controller import Fault
from .faults.verify import VerifyReport

T = TypeVar("T")

# A small cluster that still shows routing, zones and residency.
SMALL_SPEC = specs.ClusterSpec(
    registry="georegtest", tier="Premium", home_region="eastus", home_zone_redundant=True,
    replicas=(specs.ReplicaSpec("westeurope"), specs.ReplicaSpec("brazilsouth")),
)


def on_any_ports(spec: specs.ClusterSpec) -> specs.ClusterSpec:
    """``spec`` on whatever range of ports is free when it starts (its management
    API's included): ``Cluster.start`` picks one, and another if a port of it
    turns out to be taken."""
    return msgspec.structs.replace(spec, network=msgspec.structs.replace(
        spec.network, port_base=specs.ANY_PORT_BASE, management_port=None))


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class RunningCluster:
    """A started cluster driven from any thread."""

    def __init__(self, spec: specs.ClusterSpec, data_dir: Path, **options) -> None:
        self.spec = on_any_ports(spec)       # the range it got, once started
        self.data_dir = data_dir
        self._options = options
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="georeg-cluster",
                                        daemon=True)
        self.cluster: Cluster | None = None
        self.management: ManagementServer | None = None
        self._credentials: AdminLogin | None = None

    def start(self, timeout: float = 60.0) -> RunningCluster:
        self._thread.start()
        self.cluster = self.run(lambda: Cluster.start(self.spec, self.data_dir, **self._options),
                                timeout)
        self.spec = self.cluster.spec
        self.management = ManagementServer(self.cluster)
        try:
            self.run(self.management.start)
            if self.spec.auth_enabled:
                self._credentials = self.run(self.cluster.access.admin_login)
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, coroutine: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
        """Run a coroutine on the cluster's loop and return its result."""
        async def call():
            return await coroutine()
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def stop(self) -> None:
        if self.management is not None:
            self.run(self.management.stop)
            self.management = None
        if self.cluster is not None:
            self.run(self.cluster.stop, 60)
            self.cluster = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> RunningCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use ----------------------------------------------------------

    @property
    def credentials(self) -> AdminLogin | None:
        """The admin user's login (``username``, ``password``), as ``georeg up``
        prints it: it pushes, pulls and deletes on every endpoint and node.
        None on an open cluster (``auth = "none"``), or if the admin user was
        disabled before this cluster started; ``refresh_credentials`` after
        ``credential renew`` or enabling it."""
        return self._credentials

    def refresh_credentials(self) -> AdminLogin | None:
        """Ask the running cluster again which admin password works (after a
        renewal, or the admin user enabled or disabled)."""
        if self.spec.auth_enabled:
            self._credentials = self.run(self.cluster.access.admin_login)
        return self._credentials

    def auth_headers(self) -> dict[str, str]:
        """Headers that present ``credentials`` (HTTP Basic, which every node
        accepts on registry routes, as ACR does); empty on an open cluster."""
        return self._credentials.headers() if self._credentials is not None else {}

    def http(self, **options) -> aiohttp.ClientSession:
        """An aiohttp session (for the caller's event loop; the caller closes
        it, e.g. ``async with running.http() as http:``) that sends
        ``credentials`` with every request, unless a request passes its own
        ``Authorization`` header, and on a TLS cluster trusts the cluster CA;
        ``options`` go to ``aiohttp.ClientSession``."""
        headers = {**self.auth_headers(), **options.pop("headers", {})}
        if self.spec.tls and "connector" not in options:
            options["connector"] = aiohttp.TCPConnector(ssl=client_context(self.ca_file))
        return aiohttp.ClientSession(headers=headers, **options)

    def owner_headers(self) -> dict[str, str]:
        """What the management API (``management_url``) wants: the cluster
        owner's credential, which the ``georeg`` CLI reads from the data dir;
        empty on an open cluster."""
        secrets = self.cluster.secrets
        return authorization(secrets.owner) if secrets is not None else {}

    def internal_headers(self) -> dict[str, str]:
        """What the cluster's own requests to its nodes carry (the internal
        credential; empty on an open cluster): for a test that plays the
        cluster itself on a node's internal routes (``/metrics``,
        ``/georeg/v1/...``), which no registry credential opens."""
        return self.cluster.internal_headers()

    def addresses(self) -> list[str]:
        """``HOST:PORT`` of every global and regional endpoint and every node
        (``localhost`` beside ``127.0.0.1``): where a client may log in."""
        return self.cluster.plan.client_addresses()

    def login(self, path: Path) -> Path:
        """Write ``credentials`` for every address of the cluster into the auth
        file at ``path`` (containers-auth.json(5): skopeo, podman, docker and
        oras read it), as ``georeg login --authfile PATH`` does, keeping what
        it holds for other registries. On an open cluster it holds no entry
        for this one. Returns ``path``."""
        path = Path(path)
        doc = json.loads(path.read_text()) if path.exists() else {}
        auths = doc.setdefault("auths", {})
        login = self._credentials
        if login is not None:
            auth = base64.b64encode(f"{login.username}:{login.password}".encode()).decode()
            for address in self.addresses():
                auths[address] = {**(auths.get(address) or {}), "auth": auth}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, (json.dumps(doc, indent=2) + "\n").encode())
        return path

    def endpoint(self, client_region: str) -> str:
        """The global endpoint as seen by a client in ``client_region``."""
        return self.cluster.global_endpoint(client_region)

    def regional_endpoint(self, region: str) -> str:
        return self.cluster.regional_endpoint(region)

    def node_url(self, name: str) -> str:
        return self.cluster.node_url(name)

    @property
    def ca_file(self) -> Path | None:
        """The cluster CA's certificate (PEM): what a client trusts when the spec
        says ``tls = true`` (every URL here is then https); None without a CA."""
        return self.cluster.ca_file

    @property
    def management_url(self) -> str | None:
        """The management REST API (``cluster.control.management``) serving this cluster."""
        return self.management.url if self.management else None

    def status(self) -> dict:
        return self.run(self._status)

    def management_api(self, method: str, path: str,
                       body: dict | None = None) -> tuple[int, dict]:
        """One request to the management API as its owner: (status, JSON
        answer), refusals included."""
        request = urllib.request.Request(
            f"{self.management_url}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={**self.owner_headers(), "Content-Type": "application/json"})
        try:
            with management_client.open_direct(request, 60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    async def _status(self) -> dict:
        return {**self.cluster.status(), "management": self.management_url}

    def verify(self, timeout: float = 60.0, scrub: bool = False) -> VerifyReport:
        """``georeg verify`` on this cluster (``cluster.faults.verify``)."""
        return self.run(lambda: self.cluster.verify(timeout, scrub=scrub), timeout + 30)

    def crash(self, node: str) -> None:
        """SIGKILL one node."""
        self.run(lambda: self.cluster.supervisor.stop_node(node, graceful=False))

    def restart(self, node: str) -> None:
        """Start a node that is down. Faults in effect on it (a pause, stalled
        bodies, a throttle, a disk fault, a clock skew from its fault's start)
        apply to the new process again, as when the fault controller restarts a node."""
        async def start() -> None:
            await self.cluster.supervisor.start_node(node)
            await self.cluster.faults.restarted([node])
        self.run(start)

    def inject(self, kind: str, **arguments) -> Fault:
        """Inject a fault (``cluster.faults.controller``), as ``georeg fault``
        does: ``inject("pause", region="eastus")``, ``inject("link", a="eastus",
        b="westeurope", stall=True, flap="2/3")``. Returns it (``.id`` to heal)."""
        return self.run(lambda: self.cluster.faults.inject(kind, **arguments))

    def heal(self, fault_id: str | None = None) -> None:
        """Heal one fault by id, or every active one."""
        faults = self.cluster.faults
        self.run(faults.heal_all if fault_id is None else lambda: faults.heal(fault_id))

    def inject_fault(self, kind: str, duration_s: float | None = None, **target) -> dict:
        """``inject``, the fault returned as ``georeg fault list --json`` shows it:
        e.g. ``inject_fault("http", endpoint="global", status=503, probability=0.5,
        method="PUT")`` or ``inject_fault("link", a="eastus", b="westeurope",
        corrupt=0.01, seed=7)``."""
        return self.inject(kind, duration_s=duration_s, **target).as_dict()

    def heal_fault(self, fault_id: str | None = None) -> None:
        """``heal``: one fault by id, or (no id) every fault."""
        self.heal(fault_id)

    def set_routing(self, region: str, enabled: bool) -> None:
        self.run(lambda: self.cluster.update_replication(region, global_routing=enabled))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0,
                 what: str = "condition") -> None:
        """Poll ``predicate`` (from the calling thread) until true or fail."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.05)

    @contextmanager
    def clock_skewed(self, node: str, offset_s: float = 0.0, drift: float = 1.0) -> Iterator:
        """A clock fault on ``node`` (a node's name, a region's only node, or
        ``region/zone``) for the block, as ``georeg fault clock``: its wall
        clock runs ``offset_s`` off and/or ``drift`` times as fast; healed on
        leaving. Yields the fault (``cluster.faults.controller.Fault``)."""
        fault = self.run(lambda: self.cluster.faults.inject(
            "clock", node=node, offset_s=offset_s, drift=drift))
        try:
            yield fault
        finally:
            self.run(lambda: self.cluster.faults.heal(fault.id))

    def node_clock(self, node: str) -> dict:
        """What ``node`` says of its clock (``registry_node.clock``): its skew,
        its peers' measured offsets, and whether it refuses writes for it."""
        async def get() -> dict:
            url = self.cluster.node_url(node) + "/georeg/v1/faults/clock"
            async with self.cluster.http().get(url) as r:
                r.raise_for_status()
                return await r.json()

        return self.run(get)
