"""An in-process cluster for replication tests: real nodes (aiohttp + gRPC
servers on loopback sockets, real encrypted storage) in this event loop, with
a real TCP link (``cluster.network.links.Link``) for every ordered pair of nodes, so a
test can partition any pair in either direction.

Node names are the region, or ``region-zone`` for zones of a zone-redundant
region. A region listed with zones is zone redundant across exactly those
zones, with the spec's write quorum, and each node's view says so (as the
plan's would).

Stopping a node, three ways:

* ``stop`` — graceful, as SIGTERM: requests end, the node closes its storage.
* ``crash`` — what SIGKILL leaves. In one instant (one event-loop step) every
  socket of the node goes (HTTP connections reset, its listener closed, every
  connection through its links reset and the links refusing until the node
  is gone) and its disk is frozen as the kernel holds it: the data dir is
  copied, RocksDB's background work waited out first, so the copy is a
  moment of the disk. Committed writes are in that copy even when never
  fsynced (``MetadataStore.commit`` hands them to the OS), and the WAL is
  replayed from there, not closed cleanly; an upload holds what reached its
  file; anything only in memory (open upload sessions, cursors not yet
  persisted, the HLC's last stamp) is gone. The next ``restart`` opens the
  copy.
* ``power_cut`` — ``crash``, and the machine loses power: of every WAL file,
  the bytes written since the node last fsynced it may be lost (a seeded
  draw keeps a prefix between what was fsynced and everything). Which bytes
  were fsynced is recorded around the node's own WAL syncs
  (``MetadataStore._sync``): sizes taken before the sync are durable once it
  returns. Blob and upload files are kept as written — a blob is fsynced
  before it is renamed into place and its directory before the WAL, so
  losing an unsynced rename (not modelled) can only lose a blob nothing
  durable names yet.

Why a copy: the dead node's code runs in this process, and Python cannot end
a coroutine without running its ``finally`` blocks, nor RocksDB release a
database without closing it. So the node is cut off from everything first
(nothing it does afterwards can reach a client, a peer or the disk the next
incarnation opens), then shut down in that isolation, and its old data dir
deleted. ``restart`` brings a stopped or crashed node back on its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web

from cluster.control.private_files import write_private
from cluster.control.spec import ZONE_WRITE_QUORUM
from cluster.network.links import Link, LinkFaults
from registry_node.app import NODE, init_app
from registry_node.config import NodeConfig
from replicator.residency import ResidencyPolicy
from replicator.runtime import Replication
from replicator.topology import ClusterView, Peer, ReplicationSettings, ZoneRedundancy

# Ports handed to node *processes* that bind them later (test_replication_resume's
# ProcessCluster: peers there name each other's ports in their views before
# they start, and keep them across a restart), and to the links of an
# in-process cluster, which bind theirs again after every cut. A check, then a
# bind later: the race this leaves is narrowed, not closed, by staying below
# the kernel's ephemeral range (32768-60999 here) and below the ranges
# clusters on any ports draw from (20000 up). In-process nodes bind port 0.
_PORTS = itertools.count(random.Random(os.getpid()).randrange(10000))


def free_port() -> int:
    """A loopback port outside the ephemeral range, free now, not handed out
    before by this process."""
    for _ in range(10000):
        port = 10000 + next(_PORTS) % 10000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port between 10000 and 19999")


@dataclass
class TestNode:
    name: str
    region: str
    zone: str
    data_dir: Path               # the disk the node runs on, or starts on next
    grpc_port: int
    view: ClusterView
    url: str = ""
    runner: web.AppRunner | None = None
    replication: Replication | None = None
    incarnation: int = 0         # data dirs left behind by crashes: one each
    # WAL file name → bytes known to be fsynced (what a power cut keeps at least).
    wal_synced: dict[str, int] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.runner is not None

    @property
    def registry(self):
        return self.runner.app[NODE].registry

    @property
    def node(self):
        return self.runner.app[NODE]


@dataclass
class InProcessCluster:
    root: Path
    topology: list[tuple[str, str]]              # (region, zone) per node
    residency: ResidencyPolicy = field(default_factory=ResidencyPolicy)
    settings: ReplicationSettings = field(default_factory=lambda: ReplicationSettings(
        anti_entropy_interval_s=1.0, quorum_timeout_s=5.0))
    nodes: dict[str, TestNode] = field(default_factory=dict)
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    # More NodeConfig settings for some nodes, by name (auth on, for one).
    node_settings: dict[str, dict] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)
    # Replicate over mutual TLS, as an auth cluster does (each node's auth
    # files then come in ``node_settings``).
    mutual_tls: bool = False

    @staticmethod
    def node_name(region: str, zone: str) -> str:
        return f"{region}-{zone}" if zone else region

    async def start(self) -> InProcessCluster:
        names = [(self.node_name(r, z), r, z) for r, z in self.topology]
        # Each node's gRPC server binds port 0; the links to it are pointed at
        # the port it got whenever it (re)starts (``restart``). A link listens
        # outside the ephemeral range (``free_port``): a cut closes its
        # listener and a heal binds the port again, and in between any
        # outgoing connection on the machine (gRPC reconnecting through other
        # links, every 100-500 ms) may take an ephemeral port as its own,
        # and the heal fails with EADDRINUSE.
        for src, _, _ in names:
            for dst, _, _ in names:
                if src != dst:
                    link = Link(f"{src}->{dst}", ("127.0.0.1", 0), listen_port=free_port())
                    self.links[(src, dst)] = await link.start()
        for name, region, zone in names:
            peers = tuple(Peer(name=other, region=r, zone=z,
                               grpc=self.links[(name, other)].address)
                          for other, r, z in names if other != name)
            view = ClusterView(name=name, region=region, zone=zone,
                               grpc_listen="127.0.0.1:0", peers=peers,
                               zone_redundancy=self.zone_redundancy(region),
                               remote_zones={r: self.zone_redundancy(r).zones
                                             for _, r, _ in names
                                             if r != region and self.zone_redundancy(r).enabled},
                               residency=self.residency, replication=self.settings,
                               mutual_tls=self.mutual_tls)
            self.nodes[name] = TestNode(name, region, zone, self.root / name, 0, view)
        await asyncio.gather(*(self.restart(name) for name in self.nodes))
        return self

    def configuration_key_file(self) -> Path:
        """The cluster's configuration key, made at the first node's start."""
        path = self.root / "configuration.key"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            write_private(path, os.urandom(32))
        return path

    def zone_redundancy(self, region: str) -> ZoneRedundancy:
        zones = tuple(z for r, z in self.topology if r == region and z)
        if not zones:
            return ZoneRedundancy()
        return ZoneRedundancy(enabled=True, zones=zones,
                              write_quorum=min(ZONE_WRITE_QUORUM, len(zones)))

    async def restart(self, name: str) -> TestNode:
        """Start a stopped or crashed node again, on what its disk holds."""
        node = self.nodes[name]
        if node.running:
            raise RuntimeError(f"{name} is running: crash or stop it first")
        node.replication = Replication(node.view)
        # As ``georeg node --cluster`` does: the view says whether it delivers
        # webhooks; and as ``georeg up`` does, one configuration key for all.
        settings = {"webhooks": node.view.webhook_settings,
                    "configuration_key_file": self.configuration_key_file(),
                    **self.node_settings.get(name, {})}
        config = NodeConfig(data_dir=node.data_dir, port=0, region=node.region, zone=node.zone,
                            gc_interval_s=3600, **settings)
        runner = web.AppRunner(init_app(config, [node.replication]), handle_signals=False,
                               shutdown_timeout=0.5)
        await runner.setup()
        node.grpc_port = int(node.replication.grpc_address.rpartition(":")[2])
        for (_, dst), link in self.links.items():
            if dst == name:
                link.target = ("127.0.0.1", node.grpc_port)
        _record_wal_syncs(node, runner.app[NODE].meta)
        port = self.http_ports.get(name, 0)
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.http_ports[name] = site._server.sockets[0].getsockname()[1]
        node.url = f"http://127.0.0.1:{self.http_ports[name]}"
        node.runner = runner
        return node

    async def stop(self, name: str) -> None:
        """A graceful stop (SIGTERM): requests finish, storage closes cleanly."""
        node = self.nodes[name]
        if node.runner is not None:
            runner, node.runner = node.runner, None
            await runner.cleanup()

    async def crash(self, name: str) -> None:
        """SIGKILL (see the module docstring): every committed write survives,
        nothing else the node held does."""
        await self._die(name, None)

    async def power_cut(self, name: str, rng: random.Random) -> None:
        """SIGKILL and a lost disk cache: ``rng`` draws how much of each WAL
        file's unsynced tail is lost."""
        await self._die(name, rng)

    async def _die(self, name: str, power_cut: random.Random | None) -> None:
        node = self.nodes[name]
        if node.runner is None:
            raise RuntimeError(f"{name} is not running")
        runner, old_dir = node.runner, node.data_dir
        # The instant of death: no await from here until the disk is frozen.
        cut = self._sever(name, runner)
        node.data_dir = _freeze_disk(node, runner.app[NODE].meta, power_cut)
        node.runner = None
        try:
            # What is left runs on in isolation (see the module docstring).
            await runner.cleanup()
        finally:
            for link, (faults, during) in cut.items():
                if link.faults == during:      # unless a test changed them meanwhile
                    link.set_faults(faults)
            shutil.rmtree(old_dir, ignore_errors=True)

    def _sever(self, name: str, runner: web.AppRunner) -> dict[Link, tuple[LinkFaults, LinkFaults]]:
        """Every socket of ``name`` gone at once, as the kernel does for a killed
        process; returns each link cut with its faults before and during."""
        for site in runner.sites:
            if site._server is not None:
                site._server.close()               # the listener: connections refused
        for handler in runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()          # clients see a reset
        cut = {}
        for (src, dst), link in self.links.items():
            if name in (src, dst):
                before = link.faults
                link.cut()                         # resets its connections, refuses new ones
                cut[link] = (before, link.faults)
        return cut

    async def __aenter__(self) -> InProcessCluster:
        """Started, every node subscribed to every peer; ``close`` on the way out
        (``async with InProcessCluster(...) as cluster`` in a fixture)."""
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every node (gracefully, at once), then the links."""
        await asyncio.gather(*(self.stop(n) for n in self.nodes), return_exceptions=True)
        for link in self.links.values():
            await link.stop()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Until every running node is subscribed to every running peer."""
        from .helpers import eventually

        def ready() -> bool:
            running = {n.name for n in self.running()}
            return all(s.connected for n in self.running() for s in n.replication.subscriptions
                       if s.peer.name in running)

        await eventually(ready, timeout=timeout, what="all subscriptions connected")

    # -- faults --------------------------------------------------------------------

    def names_in(self, region: str) -> list[str]:
        return [n for n, node in self.nodes.items() if node.region == region]

    def partition(self, a: str, b: str, one_way: bool = False) -> None:
        """Cut every link from region ``a`` to region ``b`` (and back unless one-way)."""
        for src in self.names_in(a):
            for dst in self.names_in(b):
                self.links[(src, dst)].cut()
                if not one_way:
                    self.links[(dst, src)].cut()

    def degrade(self, a: str, b: str, one_way: bool = False, **faults) -> None:
        """Set ``faults`` (``LinkFaults`` fields: latency, stall, resets…) on every
        link from region ``a`` to region ``b`` (and back unless one-way), keeping
        what else is broken on them; ``a == b`` degrades the links between its zones."""
        for src in self.names_in(a):
            for dst in self.names_in(b):
                for pair in [(src, dst)] + ([] if one_way else [(dst, src)]):
                    if pair[0] != pair[1]:
                        link = self.links[pair]
                        link.set_faults(dataclasses.replace(link.faults, **faults))

    def isolate(self, name: str) -> None:
        for (src, dst), link in self.links.items():
            if name in (src, dst):
                link.cut()

    def heal(self) -> None:
        for link in self.links.values():
            if link.faults.any:
                link.heal()

    # -- observations ----------------------------------------------------------------

    def running(self) -> list[TestNode]:
        return [n for n in self.nodes.values() if n.running]

    async def tags(self, session: aiohttp.ClientSession, node: TestNode, repo: str) -> dict[str, str]:
        """tag → digest as served by ``node`` (empty if the repository is unknown there)."""
        async with session.get(f"{node.url}/v2/{repo}/tags/list") as r:
            if r.status == 404:
                return {}
            tags = (await r.json())["tags"]
        out = {}
        for tag in tags:
            async with session.head(f"{node.url}/v2/{repo}/manifests/{tag}") as r:
                if r.status == 200:
                    out[tag] = r.headers["Docker-Content-Digest"]
        return out


# -- the disk a dead node leaves -----------------------------------------------------


def _wal_sizes(db_dir: Path) -> dict[str, int]:
    sizes = {}
    for path in db_dir.glob("*.log"):          # RocksDB's WAL files (its own log is LOG)
        with contextlib.suppress(FileNotFoundError):
            sizes[path.name] = path.stat().st_size
    return sizes


def _record_wal_syncs(node: TestNode, meta) -> None:
    """Track, in ``node.wal_synced``, how much of each WAL file the node has
    fsynced: the sizes before each of its syncs, once that sync returns. The
    disk it started on counts as durable (it is what survived)."""
    db_dir = node.data_dir / "meta"
    synced = node.wal_synced = _wal_sizes(db_dir)
    sync = meta._sync

    def recorded_sync(directories):
        before = _wal_sizes(db_dir)
        sync(directories)
        for name, size in before.items():
            synced[name] = max(synced.get(name, 0), size)

    meta._sync = recorded_sync


def _freeze_disk(node: TestNode, meta, power_cut: random.Random | None) -> Path:
    """Copy ``node``'s data dir as the disk holds it at this instant (minus, on a
    power cut, part of each WAL's unsynced tail); returns the copy."""
    # A flush or compaction half done would make a copy no disk ever held:
    # wait for the running one, and start none (the node is dead anyway).
    meta._db.cancel_all_background(True)
    # RocksDB then refuses a clean close ("Shutdown in progress"), which the
    # dead node's teardown would attempt: its handle goes with its objects.
    close = meta.close

    def close_dead() -> None:
        with contextlib.suppress(Exception):
            close()

    meta.close = close_dead
    node.incarnation += 1
    copy = node.data_dir.parent / f"{node.name}@{node.incarnation}"
    _copy_tree(node.data_dir, copy)
    if power_cut is not None:
        for name, size in _wal_sizes(copy / "meta").items():
            durable = min(node.wal_synced.get(name, 0), size)
            keep = power_cut.choice([durable, power_cut.randint(durable, size)])
            os.truncate(copy / "meta" / name, keep)
    return copy


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a directory a node's IO threads may still be writing: a file or
    directory gone before it is read (an upload renamed into place, a temp file
    dropped) is simply not in the copy, as if the kill came just before."""
    dst.mkdir(mode=0o700)
    try:
        entries = list(os.scandir(src))
    except FileNotFoundError:
        return
    for entry in entries:
        target = dst / entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                _copy_tree(Path(entry.path), target)
            else:
                shutil.copy2(entry.path, target)
        except FileNotFoundError:
            continue


def module_cluster(name: str, topology, settings: ReplicationSettings):
    """A test module's ``cluster`` (in-process, started once for the module)
    and ``http`` (a client session that leaves bodies as sent) fixtures:
    ``cluster, http = module_cluster("name", TOPOLOGY, SETTINGS)``."""
    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def cluster(tmp_path_factory):
        async with InProcessCluster(tmp_path_factory.mktemp(name), topology,
                                    settings=settings) as c:
            yield c

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def http():
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            yield session

    return cluster, http
