"""An in-process cluster for replication tests: real nodes (aiohttp + gRPC
servers on loopback sockets, real encrypted storage) in this event loop, with
a real TCP link (``cluster.network.links.Link``) for every ordered pair of nodes, so a
test can partition any pair in either direction.

Node names are the region, or ``region-zone`` for zones of a zone-redundant
region. A region listed with zones is zone redundant across exactly those
zones, with the spec's write quorum, and each node's view says so (as the
plan's would). ``crash`` stops a node abruptly (its servers vanish, nothing is
flushed beyond what each commit already synced); ``restart`` brings it back on
the same data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from cluster.control.spec import ZONE_WRITE_QUORUM
from cluster.network.links import Link
from registry_node.app import NODE, init_app
from registry_node.config import NodeConfig
from replicator.residency import ResidencyPolicy
from replicator.runtime import Replication
from replicator.topology import ClusterView, Peer, ReplicationSettings, ZoneRedundancy

# Ports handed to node *processes* that bind them later (test_replication_resume's
# ProcessCluster: peers there name each other's ports in their views before
# they start, and keep them across a restart). A check, then a bind later: the
# race this leaves is narrowed, not closed, by staying below the kernel's
# ephemeral range (32768-60999 here) and below the ranges clusters on any
# ports draw from (20000 up). In-process nodes bind port 0 instead.
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
    data_dir: Path
    grpc_port: int
    view: ClusterView
    url: str = ""
    runner: web.AppRunner | None = None
    replication: Replication | None = None

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
    http_ports: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def node_name(region: str, zone: str) -> str:
        return f"{region}-{zone}" if zone else region

    async def start(self) -> InProcessCluster:
        names = [(self.node_name(r, z), r, z) for r, z in self.topology]
        # Each node's gRPC server binds port 0; the links to it are pointed at
        # the port it got whenever it (re)starts (``restart``).
        for src, _, _ in names:
            for dst, _, _ in names:
                if src != dst:
                    link = Link(f"{src}->{dst}", ("127.0.0.1", 0))
                    self.links[(src, dst)] = await link.start()
        for name, region, zone in names:
            peers = tuple(Peer(name=other, region=r, zone=z,
                               grpc=self.links[(name, other)].address)
                          for other, r, z in names if other != name)
            view = ClusterView(name=name, region=region, zone=zone,
                               grpc_listen="127.0.0.1:0", peers=peers,
                               zone_redundancy=self.zone_redundancy(region),
                               residency=self.residency, replication=self.settings)
            self.nodes[name] = TestNode(name, region, zone, self.root / name, 0, view)
        await asyncio.gather(*(self.restart(name) for name in self.nodes))
        return self

    def zone_redundancy(self, region: str) -> ZoneRedundancy:
        zones = tuple(z for r, z in self.topology if r == region and z)
        if not zones:
            return ZoneRedundancy()
        return ZoneRedundancy(enabled=True, zones=zones,
                              write_quorum=min(ZONE_WRITE_QUORUM, len(zones)))

    async def restart(self, name: str) -> TestNode:
        node = self.nodes[name]
        if node.running:
            await self.crash(name)
        node.replication = Replication(node.view)
        config = NodeConfig(data_dir=node.data_dir, port=0, region=node.region, zone=node.zone,
                            gc_interval_s=3600)
        runner = web.AppRunner(init_app(config, [node.replication]), handle_signals=False,
                               shutdown_timeout=0.5)
        await runner.setup()
        node.grpc_port = int(node.replication.grpc_address.rpartition(":")[2])
        for (_, dst), link in self.links.items():
            if dst == name:
                link.target = ("127.0.0.1", node.grpc_port)
        port = self.http_ports.get(name, 0)
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.http_ports[name] = site._server.sockets[0].getsockname()[1]
        node.url = f"http://127.0.0.1:{self.http_ports[name]}"
        node.runner = runner
        return node

    async def crash(self, name: str) -> None:
        node = self.nodes[name]
        if node.runner is not None:
            runner, node.runner = node.runner, None
            await runner.cleanup()

    async def stop(self) -> None:
        for name in list(self.nodes):
            with contextlib.suppress(Exception):
                await self.crash(name)
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
