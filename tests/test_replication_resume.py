"""Large blob transfers that break resume from their offset, not from zero.

(a) A WAN link slowed to a trickle is cut halfway through a 32 MiB layer and
    healed: the destination asks the source for the rest only.
(b) The destination, a real `georeg node` process, is SIGKILLed halfway; its
    partial transfer is on disk (``uploads/``, named by an ``xfer`` key), and
    after a restart on the same data dir it fetches the rest only.
(c) The source process is SIGKILLed halfway: the destination finishes from
    another peer that holds the blob, from where it stopped.

Every transfer is slowed by a ``cluster.network.links.Link`` with a bandwidth cap, in
the test's event loop, between the destination and its source(s), so "halfway"
is a state the test can wait for rather than a sleep. The bytes that crossed
are counted twice: by the destination's ``georeg_replication_bytes_total`` and
by the links themselves (which also see gRPC framing — an upper bound).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp

from cluster.network.links import Link, LinkFaults
from registry_node import keys
from registry_node.metastore import MetadataStore
from replicator.topology import ClusterView, Peer, ReplicationSettings

from .helpers import Image, NodeProcess, digest_of, eventually
from .replication_harness import free_port
from .replication_invariants import (
    big_image,
    metric_sum,
    metrics_text,
    start_cluster,
    stop_cluster,
)

SIZE = 32 << 20
SLOW_MBPS = 64.0           # 8 MB/s: 32 MiB takes ~4 s, so "halfway" lasts a while


async def push(http: aiohttp.ClientSession, url: str, repo: str, image: Image, tag: str) -> None:
    for blob in image.blobs:
        async with http.post(f"{url}/v2/{repo}/blobs/uploads/", params={"digest": digest_of(blob)},
                             data=blob) as r:
            assert r.status == 201, await r.text()
    async with http.put(f"{url}/v2/{repo}/manifests/{tag}", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status == 201, await r.text()


async def received(http: aiohttp.ClientSession, url: str, peer: str | None = None) -> float:
    """Replication bytes a node has received (from ``peer``, or from anyone)."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    labels = {"direction": "in"} | ({"peer": peer} if peer else {})
    return metric_sum(text, "georeg_replication_bytes_total", **labels)


async def blob_intact(http: aiohttp.ClientSession, url: str, repo: str, layer: bytes) -> bool:
    async with http.get(f"{url}/v2/{repo}/blobs/{digest_of(layer)}") as r:
        if r.status != 200:
            return False
        h = hashlib.sha256()
        async for chunk in r.content.iter_chunked(1 << 20):
            h.update(chunk)
        assert "sha256:" + h.hexdigest() == digest_of(layer), "blob arrived corrupted"
        return True


# -- (a) a cut link --------------------------------------------------------------------


async def test_transfer_cut_halfway_resumes_from_its_offset(tmp_path, http):
    settings = ReplicationSettings(anti_entropy_interval_s=1.0, quorum_timeout_s=5.0)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")], settings=settings)
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        link = cluster.links[("westeurope", "eastus")]          # westeurope fetches through it
        link.set_faults(LinkFaults(bandwidth_mbps=SLOW_MBPS))
        image, layer = big_image(1, SIZE)
        await push(http, east.url, "big/app", image, "v1")

        await eventually(lambda: _at_least(http, west.url, "eastus", SIZE // 2), timeout=30,
                         interval=0.05, what="half of the layer to cross")
        link.cut()
        failures = "georeg_replication_transfer_failures_total"
        await eventually(lambda: _metric_above(http, west, failures, 0, peer="eastus"),
                         timeout=15, what="westeurope to notice the cut")
        cut_at = await received(http, west.url, "eastus")
        assert cut_at < SIZE, "the transfer finished before the cut"
        link.set_faults(LinkFaults(bandwidth_mbps=SLOW_MBPS))   # healed, still slow
        await eventually(lambda: blob_intact(http, west.url, "big/app", layer), timeout=60,
                         interval=0.1, what="the layer to arrive")
        total = await received(http, west.url)
        assert total < 1.3 * SIZE, f"received {total / SIZE:.2f}× the layer: it started over"
        assert total >= SIZE
        async with http.get(f"{west.url}/v2/big/app/manifests/v1") as r:
            assert r.status == 200 and await r.read() == image.manifest
        assert not list((west.data_dir / "uploads").iterdir()), "partial transfer left behind"
    finally:
        await stop_cluster(cluster)


async def _at_least(http, url: str, peer: str, count: int) -> bool:
    return await received(http, url, peer) >= count


async def _metric_above(http, node, name: str, value: float, **labels: str) -> bool:
    return metric_sum(await metrics_text(http, node), name, **labels) > value


# -- real processes ----------------------------------------------------------------------


class ProcessCluster:
    """`georeg node --cluster FILE` processes; the peers a node fetches from
    may sit behind a ``Link`` in the test's loop, the others are reached directly."""

    def __init__(self, root: Path, names: list[tuple[str, str]]) -> None:
        self.root = root
        self.regions = dict(names)                              # name → region
        self.grpc = {name: free_port() for name, _ in names}
        self.links: dict[tuple[str, str], Link] = {}
        self.nodes: dict[str, NodeProcess] = {}

    async def add_link(self, src: str, dst: str) -> Link:
        link = await Link(f"{src}->{dst}", ("127.0.0.1", self.grpc[dst])).start()
        self.links[(src, dst)] = link
        return link

    def start(self, name: str) -> NodeProcess:
        peers = tuple(
            Peer(name=other, region=region,
                 grpc=self.links[(name, other)].address if (name, other) in self.links
                 else f"127.0.0.1:{self.grpc[other]}")
            for other, region in self.regions.items() if other != name)
        view = ClusterView(name=name, region=self.regions[name],
                           grpc_listen=f"127.0.0.1:{self.grpc[name]}", peers=peers,
                           replication=ReplicationSettings(anti_entropy_interval_s=1.0))
        path = self.root / f"{name}.json"
        view.dump(path)
        node = NodeProcess(self.root / name, ["--cluster", str(path)])
        self.nodes[name] = node
        return node.start()

    async def stop(self) -> None:
        for node in self.nodes.values():
            node.close()
        for link in self.links.values():
            await link.stop()


def partial_transfer_size(data_dir: Path, digest: str) -> int:
    """With the node down: size of the upload file its ``xfer`` key names (0: none)."""
    meta = MetadataStore(data_dir / "meta")
    try:
        raw = meta.get(keys.transfer(digest))
    finally:
        meta.close()
    if raw is None:
        return 0
    path = data_dir / "uploads" / raw.decode()
    return path.stat().st_size if path.exists() else 0


async def in_thread(fn, *args):
    """Blocking process control (start waits for the node's first line) off the loop,
    so the links in this loop keep forwarding meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# -- (b) the destination killed --------------------------------------------------------


async def test_destination_killed_midway_resumes_after_restart(tmp_path, http):
    procs = ProcessCluster(tmp_path, [("source", "eastus"), ("dest", "westeurope")])
    try:
        link = await procs.add_link("dest", "source")
        link.set_faults(LinkFaults(bandwidth_mbps=SLOW_MBPS))
        source = await in_thread(procs.start, "source")
        dest = await in_thread(procs.start, "dest")
        image, layer = big_image(2, SIZE)
        await push(http, source.url, "big/app", image, "v1")

        await eventually(lambda: _at_least(http, dest.url, "source", SIZE // 2), timeout=30,
                         interval=0.05, what="half of the layer to cross")
        dest.kill()                                                # SIGKILL
        before = link.bytes_forwarded
        assert before < SIZE, "the transfer finished before the kill"
        on_disk = partial_transfer_size(dest.data_dir, digest_of(layer))
        # Encrypted segments add a little; what matters is that half is kept.
        assert on_disk >= SIZE // 3, f"only {on_disk} bytes of the transfer survived the kill"

        await in_thread(dest.start)
        await eventually(lambda: blob_intact(http, dest.url, "big/app", layer), timeout=60,
                         interval=0.1, what="the layer to arrive after the restart")
        after_restart = await received(http, dest.url)             # metrics restarted at 0
        assert after_restart < SIZE - SIZE // 3, \
            f"after the restart {after_restart / SIZE:.2f}× the layer came again"
        assert link.bytes_forwarded < 1.5 * SIZE, \
            f"{link.bytes_forwarded / SIZE:.2f}× the layer crossed the link"
    finally:
        await procs.stop()


# -- (c) the source killed -------------------------------------------------------------


async def test_source_killed_midway_destination_finishes_from_another_peer(tmp_path, http):
    procs = ProcessCluster(tmp_path, [("source", "eastus"), ("other", "westus"),
                                      ("dest", "westeurope")])
    try:
        to_source = await procs.add_link("dest", "source")
        to_other = await procs.add_link("dest", "other")
        to_source.cut()
        to_other.cut()                  # dest hears nothing until the other peer has it all
        source = await in_thread(procs.start, "source")
        other = await in_thread(procs.start, "other")
        dest = await in_thread(procs.start, "dest")
        image, layer = big_image(3, SIZE)
        await push(http, source.url, "big/app", image, "v1")
        await eventually(lambda: blob_intact(http, other.url, "big/app", layer), timeout=30,
                         what="the other peer to hold the layer")

        to_source.set_faults(LinkFaults(bandwidth_mbps=SLOW_MBPS))     # dest ← source, slowly
        await eventually(lambda: _at_least(http, dest.url, "source", SIZE // 2), timeout=30,
                         interval=0.05, what="half of the layer to cross from the source")
        source.kill()                                              # SIGKILL
        from_source = await received(http, dest.url, "source")
        assert from_source < SIZE, "the transfer finished before the kill"
        to_other.set_faults(LinkFaults(bandwidth_mbps=SLOW_MBPS))      # dest ← other, slowly
        await eventually(lambda: blob_intact(http, dest.url, "big/app", layer), timeout=60,
                         interval=0.1, what="the layer to arrive from the other peer")
        from_other = await received(http, dest.url, "other")
        assert from_other > 0, "the other peer sent nothing"
        total = await received(http, dest.url)
        assert total < 1.3 * SIZE, \
            f"received {total / SIZE:.2f}× the layer ({from_source} from the source, " \
            f"{from_other} from the other peer): it started over"
        async with http.get(f"{dest.url}/v2/big/app/manifests/v1") as r:
            assert r.status == 200 and await r.read() == image.manifest
    finally:
        await procs.stop()


# -- a subscription whose stream dies while its batch waits on a transfer ------------


async def test_subscription_survives_its_stream_dying_while_a_shared_transfer_finishes(
        tmp_path, http):
    """westeurope fetches a large layer from westus (which relayed it) when its
    subscription to eastus, the origin, delivers the same layer and waits on
    that transfer. The eastus stream then dies (link cut); the transfer from
    westus still completes, the batch is applied — and acknowledging it on the
    dead stream must end that session, to be resumed, not the subscription."""
    settings = ReplicationSettings(anti_entropy_interval_s=1.0, quorum_timeout_s=5.0)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westus", ""), ("westeurope", "")],
                                  settings=settings)
    try:
        east, relay, west = (cluster.nodes[n] for n in ("eastus", "westus", "westeurope"))
        to_east = cluster.links[("westeurope", "eastus")]
        to_relay = cluster.links[("westeurope", "westus")]
        to_east.cut()
        to_relay.set_faults(LinkFaults(bandwidth_mbps=SLOW_MBPS))
        image, layer = big_image(4, SIZE)
        await push(http, east.url, "big/app", image, "v1")
        await eventually(lambda: _at_least(http, west.url, "westus", SIZE // 8), timeout=30,
                         interval=0.05, what="the layer to start crossing from westus")
        sub = next(s for s in west.replication.subscriptions if s.peer.name == "eastus")
        to_east.heal()
        await eventually(lambda: sub.connected, timeout=10, what="the subscription to eastus")
        to_east.cut()                                   # its stream dies mid-batch
        await eventually(lambda: west.registry.blobs.exists(digest_of(layer)), timeout=60,
                         interval=0.1, what="the layer to arrive from westus")
        to_east.heal()
        await eventually(lambda: sub.connected and sub.cursor().seq == east.registry.meta.last_seq,
                         timeout=15, what="westeurope's subscription to eastus to resume")
    finally:
        await stop_cluster(cluster)
