"""A routing proxy in a process of its own, for measurements that must not
share a process with the client or the nodes (peak memory, throughput).

    python -m tests.proxy_process --backend NAME=HOST:PORT [--backend ...] [--copy] [--redirect]
                                  [--relay]

Runs a global endpoint (under uvloop) for clients in region ``local`` over
one replica in region ``local`` holding the given nodes, prints
``proxy listening on PORT`` once it serves, and stops on SIGTERM or SIGINT.
With ``--copy`` bodies are copied through the event loop, never spliced;
with ``--redirect`` blob downloads get a 307 to the node; with ``--relay`` they
are relayed, never handed over to the node (``cluster.routing.handoff``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from cluster.control.supervisor import dies_with_parent
from cluster.routing.policy import NodeEndpoint, NodeHealth, ReplicaGroup, Replicas
from cluster.routing.proxy import RoutingProxy


def _backend(value: str) -> NodeEndpoint:
    name, _, address = value.partition("=")
    host, _, port = address.rpartition(":")
    return NodeEndpoint(name, "local", "", host or "127.0.0.1", int(port))


async def _serve(backends: list[NodeEndpoint], copy: bool, redirect: bool, relay: bool) -> None:
    health = NodeHealth()
    proxy = RoutingProxy.global_endpoint(
        "local", Replicas([ReplicaGroup("local", tuple(backends))]), lambda a, b: 0.0, health,
        redirect_blobs=redirect, handoff_blobs=not relay,
        **({"splice_min": None} if copy else {}))
    port = await proxy.start("127.0.0.1", 0)
    print(f"proxy listening on {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", type=_backend, action="append", required=True)
    parser.add_argument("--copy", action="store_true",
                        help="copy bodies through the event loop instead of splicing them")
    parser.add_argument("--redirect", action="store_true",
                        help="answer blob downloads with a 307 to the node")
    parser.add_argument("--relay", action="store_true",
                        help="relay blob downloads, never hand them over to the node")
    args = parser.parse_args()
    import uvloop

    from registry_node import logs

    logs.configure("json", "warning", stream=sys.stderr)   # stdout carries the port line only

    uvloop.run(_serve(args.backend, args.copy, args.redirect, args.relay))


@dataclass
class ProxyProcess:
    """Starts ``main`` as a child process; ``url``, ``pid``, ``close()``."""

    backends: list[str]
    copy: bool = False
    redirect: bool = False
    relay: bool = False
    proc: subprocess.Popen | None = None
    url: str = ""

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        args = ([a for b in self.backends for a in ("--backend", b)] + ["--copy"] * self.copy
                + ["--redirect"] * self.redirect + ["--relay"] * self.relay)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.proxy_process", *args],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True,
                                     preexec_fn=dies_with_parent())
        deadline = time.monotonic() + timeout
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("proxy process did not start")
                if sel.select(remaining):
                    line = self.proc.stdout.readline()
                    if line.startswith("proxy listening on "):
                        self.url = f"http://127.0.0.1:{int(line.split()[-1])}"
                        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


if __name__ == "__main__":
    main()
