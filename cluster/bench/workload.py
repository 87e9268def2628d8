"""The benchmark's client: one workload, driven identically against any registry.

What a run does to a registry (each step is one ``Sample``):

    push      N distinct layers, POST → PATCH (whole body) → PUT ?digest=,
              as docker and containerd push, at concurrency c        → MB/s
    pull      the same layers back at concurrency c, sha256 checked  → MB/s
    small     HEAD blob, GET manifest by tag, GET tags list, each its
              own run of a fixed op count at concurrency c           → ops/s, p99
    big       one large blob streamed up (generated in 1 MiB pieces,
              hashed on the way) then streamed down (hash checked),
              with the server's peak RSS over both                   → MB/s, bytes

Invariants
    * Nothing holds a large blob in memory: the big blob is produced and
      consumed in pieces; only the 1 MiB layers of one run are kept, so the
      same bytes can be pushed to every registry.
    * Every byte pulled is hashed and compared with its digest; a wrong status,
      size or digest fails the run (a fast wrong answer is not a result).
    * Each sample records the server's and the client's CPU seconds beside its
      wall time, so a client that saturates its core shows in the results, and
      the CPU everything else on the machine used meanwhile, so a run disturbed
      by other work says so.

MB is 10^6 bytes. The client is an aiohttp session per registry with the same
settings for all; it does not know which registry it drives.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiohttp
from yarl import URL

from .procfs import (
    MIB,
    PeakRss,
    cpu_seconds,
    machine_user_seconds,
    own_cpu_seconds,
    own_user_seconds,
    user_seconds,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ACCEPT_MANIFESTS = ", ".join([OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                              "application/vnd.docker.distribution.manifest.v2+json",
                              "application/vnd.docker.distribution.manifest.list.v2+json"])
SMALL_OPS = ("head_blob", "get_manifest", "tags_list")
PIECE = MIB          # the big blob travels in pieces of this size
_POOL_SIZE = 64 * MIB

T = TypeVar("T")


class Target(Protocol):
    """A registry under benchmark: where it serves, and its process (for RSS and CPU)."""

    name: str
    url: str

    @property
    def pid(self) -> int: ...


class WorkloadError(RuntimeError):
    """A registry answered wrongly (status, size or digest); the benchmark stops."""


@dataclass(frozen=True)
class Sample:
    """One measured run of one step against one registry."""

    value: float                 # MB/s or ops/s
    seconds: float
    server_cpu_s: float
    client_cpu_s: float
    count: int = 0               # requests (small ops) or bytes (transfers)
    p99_ms: float | None = None
    peak_rss: int | None = None  # server's peak resident set, bytes (big blob only)
    other_cpu_s: float = 0.0     # user CPU used meanwhile by processes other than server and client


@dataclass
class Layers:
    """Distinct random blobs of one run, as (digest, bytes)."""

    blobs: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return sum(len(data) for _, data in self.blobs)


class RandomBytes:
    """Incompressible, never-repeating content, made fast: a random prefix of 16
    bytes (so every blob is distinct) in front of a slice of a random pool."""

    def __init__(self, seed: int) -> None:
        import random

        self._rng = random.Random(seed)
        self._pool = self._rng.randbytes(_POOL_SIZE)

    def blob(self, size: int) -> bytes:
        head = self._rng.randbytes(min(16, size))
        rest = size - len(head)
        start = self._rng.randrange(0, _POOL_SIZE - rest + 1)
        return head + self._pool[start:start + rest]

    def layers(self, count: int, size: int) -> Layers:
        blobs = [self.blob(size) for _ in range(count)]
        return Layers([(sha256_digest(b), b) for b in blobs])

    def pieces(self, size: int, stream: int) -> Iterable[memoryview]:
        """``size`` bytes in ``PIECE``-sized views: a first piece made from ``stream``
        (so streams differ, and one stream is the same bytes every time), then the
        pool, zero-copy."""
        import random

        first = random.Random(stream).randbytes(min(PIECE, size))
        yield memoryview(first)
        view = memoryview(self._pool)
        sent, offset = len(first), 0
        while sent < size:
            n = min(PIECE, size - sent, _POOL_SIZE - offset)
            yield view[offset:offset + n]
            sent += n
            offset = (offset + n) % _POOL_SIZE


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def p99(latencies_s: list[float]) -> float:
    ordered = sorted(latencies_s)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] * 1000


async def run_concurrently(items: Iterable[T], concurrency: int,
                           step: Callable[[T], Awaitable[None]]) -> None:
    """Run ``step`` over ``items`` with at most ``concurrency`` in flight."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:  # one shared iterator: each item is taken once
            await step(item)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())


class Measured:
    """``async with Measured(pid) as m:`` → wall ``seconds`` and the CPU seconds of
    the server, of this client and of everything else on the machine meanwhile."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    async def __aenter__(self) -> Measured:
        self._cpu = cpu_seconds(self.pid)
        self._own = own_cpu_seconds()
        self._users = machine_user_seconds() - user_seconds(self.pid) - own_user_seconds()
        self._t0 = time.perf_counter()
        return self

    async def __aexit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.server_cpu_s = cpu_seconds(self.pid) - self._cpu
        self.client_cpu_s = own_cpu_seconds() - self._own
        others = machine_user_seconds() - user_seconds(self.pid) - own_user_seconds()
        # User-space time only (see procfs); tick granularity can make it slightly negative.
        self.other_cpu_s = max(0.0, others - self._users)


def open_session(concurrency: int, tls: ssl.SSLContext | None = None,
                 headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """The one client configuration every registry gets; ``tls``: what verifies a
    TLS cluster's certificates (its CA); ``headers`` go with every request (a
    registry's credentials)."""
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency,
                                     ssl=tls or True)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        read_bufsize=PIECE, timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
        headers=headers)


async def _check(response: aiohttp.ClientResponse, expected: int, what: str,
                 target: Target) -> None:
    if response.status != expected:
        body = (await response.read())[:300].decode(errors="replace")
        raise WorkloadError(f"{target.name}: {what} answered {response.status}, expected "
                            f"{expected}: {body}")


@dataclass
class Client:
    """The workload's operations against one registry."""

    target: Target
    session: aiohttp.ClientSession
    concurrency: int = 8
    _base: URL = field(init=False)

    def __post_init__(self) -> None:
        self._base = URL(self.target.url)

    def _url(self, path: str) -> URL:
        return self._base.with_path(path)

    def _location(self, response: aiohttp.ClientResponse) -> URL:
        # distribution answers an absolute URL with a signed ?_state=…, georeg a
        # path: resolve either against the registry, keeping the query intact.
        return self._base.join(URL(response.headers["Location"], encoded=True))

    # -- one blob ------------------------------------------------------------

    async def push_blob(self, repo: str, digest: str, body, length: int) -> None:
        """POST → PATCH (the whole body, with Content-Length) → PUT ?digest=."""
        async with self.session.post(self._url(f"/v2/{repo}/blobs/uploads/"),
                                     headers={"Content-Length": "0"}) as r:
            await _check(r, 202, "POST blob upload", self.target)
            location = self._location(r)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        async with self.session.patch(location, data=body, headers=headers) as r:
            await _check(r, 202, "PATCH blob upload", self.target)
            location = self._location(r)
        async with self.session.put(location.update_query(digest=digest),
                                    headers={"Content-Length": "0"}) as r:
            await _check(r, 201, "PUT blob upload", self.target)
            if r.headers.get("Docker-Content-Digest", digest) != digest:
                raise WorkloadError(f"{self.target.name}: stored {digest} as "
                                    f"{r.headers['Docker-Content-Digest']}")

    async def pull_blob(self, repo: str, digest: str, size: int) -> None:
        async with self.session.get(self._url(f"/v2/{repo}/blobs/{digest}")) as r:
            await _check(r, 200, "GET blob", self.target)
            body = await r.read()
        if len(body) != size or sha256_digest(body) != digest:
            raise WorkloadError(f"{self.target.name}: GET blob {digest} returned {len(body)} "
                                f"bytes that do not hash to it")

    async def push_manifest(self, repo: str, reference: str, body: bytes) -> None:
        async with self.session.put(self._url(f"/v2/{repo}/manifests/{reference}"), data=body,
                                    headers={"Content-Type": OCI_MANIFEST}) as r:
            await _check(r, 201, "PUT manifest", self.target)

    # -- steps ---------------------------------------------------------------

    async def push_layers(self, repo: str, layers: Layers) -> Sample:
        async with Measured(self.target.pid) as m:
            await run_concurrently(layers.blobs, self.concurrency,
                                   lambda b: self.push_blob(repo, b[0], b[1], len(b[1])))
        return _transfer_sample(m, layers.size)

    async def pull_layers(self, repo: str, layers: Layers) -> Sample:
        async with Measured(self.target.pid) as m:
            await run_concurrently(layers.blobs, self.concurrency,
                                   lambda b: self.pull_blob(repo, b[0], len(b[1])))
        return _transfer_sample(m, layers.size)

    async def push_images(self, repo: str, layers: Layers, images: int,
                          layers_per_image: int = 4) -> list[str]:
        """``images`` tagged images over ``layers`` (which must be pushed to ``repo``):
        the content small operations read. Returns the tags."""
        tags = []
        for i in range(images):
            config = json.dumps({"architecture": "amd64", "os": "linux", "bench": i,
                                 "nonce": os.urandom(8).hex()}).encode()
            config_digest = sha256_digest(config)
            await self.push_blob(repo, config_digest, config, len(config))
            chosen = [layers.blobs[(i * layers_per_image + k) % len(layers.blobs)]
                      for k in range(layers_per_image)]
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": len(b)} for d, b in chosen],
            }).encode()
            tag = f"v{i}"
            await self.push_manifest(repo, tag, manifest)
            tags.append(tag)
        return tags

    async def small_ops(self, kind: str, repo: str, digests: list[str], tags: list[str],
                        count: int) -> Sample:
        """``count`` requests of one kind (see ``SMALL_OPS``) at the client's concurrency."""
        session, target = self.session, self.target
        latencies: list[float] = []

        async def head_blob(i: int) -> None:
            async with session.head(self._url(f"/v2/{repo}/blobs/{digests[i % len(digests)]}")) as r:
                await _check(r, 200, "HEAD blob", target)

        async def get_manifest(i: int) -> None:
            async with session.get(self._url(f"/v2/{repo}/manifests/{tags[i % len(tags)]}"),
                                   headers={"Accept": ACCEPT_MANIFESTS}) as r:
                await _check(r, 200, "GET manifest", target)
                await r.read()

        async def tags_list(i: int) -> None:
            async with session.get(self._url(f"/v2/{repo}/tags/list")) as r:
                await _check(r, 200, "GET tags list", target)
                if len(json.loads(await r.read())["tags"]) != len(tags):
                    raise WorkloadError(f"{target.name}: tags list is missing tags")

        op = {"head_blob": head_blob, "get_manifest": get_manifest, "tags_list": tags_list}[kind]

        async def timed(i: int) -> None:
            started = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - started)

        async with Measured(target.pid) as m:
            await run_concurrently(range(count), self.concurrency, timed)
        return Sample(count / m.seconds, m.seconds, m.server_cpu_s, m.client_cpu_s, count,
                      p99_ms=p99(latencies), other_cpu_s=m.other_cpu_s)

    async def upload_big(self, repo: str, size: int, content: RandomBytes,
                         stream: int) -> tuple[Sample, str]:
        """Stream one ``size``-byte blob up, hashing as it goes; (sample, digest)."""
        hasher = hashlib.sha256()

        async def body() -> AsyncIterator[memoryview]:
            for piece in content.pieces(size, stream):
                hasher.update(piece)
                yield piece

        # POST → PATCH streamed → PUT ?digest= (the digest is only known at the end).
        async with PeakRss(self.target.pid) as peak, Measured(self.target.pid) as m:
            async with self.session.post(self._url(f"/v2/{repo}/blobs/uploads/"),
                                         headers={"Content-Length": "0"}) as r:
                await _check(r, 202, "POST blob upload", self.target)
                location = self._location(r)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            async with self.session.patch(location, data=body(), headers=headers) as r:
                await _check(r, 202, "PATCH blob upload", self.target)
                location = self._location(r)
            digest = "sha256:" + hasher.hexdigest()
            async with self.session.put(location.update_query(digest=digest),
                                        headers={"Content-Length": "0"}) as r:
                await _check(r, 201, "PUT blob upload", self.target)
        return _transfer_sample(m, size, peak.bytes), digest

    async def download_big(self, repo: str, digest: str, size: int) -> Sample:
        hasher = hashlib.sha256()
        received = 0
        async with PeakRss(self.target.pid) as peak, Measured(self.target.pid) as m:
            async with self.session.get(self._url(f"/v2/{repo}/blobs/{digest}")) as r:
                await _check(r, 200, "GET blob", self.target)
                async for piece in r.content.iter_any():
                    hasher.update(piece)
                    received += len(piece)
        if received != size or "sha256:" + hasher.hexdigest() != digest:
            raise WorkloadError(f"{self.target.name}: GET blob {digest} returned {received} "
                                f"bytes that do not hash to it")
        return _transfer_sample(m, size, peak.bytes)


def _transfer_sample(m: Measured, size: int, peak_rss: int | None = None) -> Sample:
    return Sample(size / m.seconds / 1e6, m.seconds, m.server_cpu_s, m.client_cpu_s, size,
                  peak_rss=peak_rss, other_cpu_s=m.other_cpu_s)


def flush_page_cache_writes() -> None:
    """Write back dirty pages before a measurement, so one registry's data is
    not flushed on the other's time."""
    os.sync()
