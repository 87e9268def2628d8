"""end-2 and end-10: read and delete blobs.

A ``GET`` an endpoint marked for a redirect is answered with one where the
node may (``api.redirects``).

A copy that fails its integrity check is never served: found before a byte
is sent, it is repaired from a replica and the request answered from the
repaired copy; found mid-stream, the connection is cut and the repair runs
for the client's retry (``registry_node.blob_repair``).

Reads decrypt only the segments a range needs, in a worker thread, one piece
ahead of the socket, so a blob of any size streams in bounded memory. On a
node whose downloads are shaped, the bytes leave as the node's download
budget grants them (``registry_node.bandwidth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ..bandwidth import following
from ..blob_repair import being_repaired
from ..crypto import BlobCorrupt, SealedBlob
from ..errors import ErrorCode, RegistryError
from .common import (
    BANDWIDTH,
    DIGEST_HEADER,
    PULL_THROUGH,
    BodyResponse,
    digest_param,
    empty,
    registry,
    repo_name,
)
from .redirects import redirect

if TYPE_CHECKING:
    from ..registry import RunBlocking

log = structlog.get_logger("georeg.api")

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
STREAM_PIECE = 1 << 20


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` → ``(start, end_exclusive)``; None serves the whole blob.
    Malformed or multi-range headers are ignored, as HTTP allows."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or (not match[1] and not match[2]):
        return None
    if not match[1]:  # suffix range: the last N bytes
        suffix = int(match[2])
        if suffix == 0 or size == 0:  # an empty blob has no last bytes to give
            raise _unsatisfiable(size)
        return max(0, size - suffix), size
    start = int(match[1])
    if match[2] and int(match[2]) < start:  # "b-a" is malformed, not unsatisfiable
        return None
    if start >= size:  # also "a-" with a at or past the end
        raise _unsatisfiable(size)
    end = int(match[2]) + 1 if match[2] else size
    return start, min(end, size)


def _unsatisfiable(size: int) -> RegistryError:
    return RegistryError(ErrorCode.RANGE_INVALID, f"the blob has {size} bytes",
                         headers={"Content-Range": f"bytes */{size}"})


async def get_blob(request: web.Request) -> web.StreamResponse:
    repo = repo_name(request)
    digest = digest_param(request.match_info["digest"])
    reg = registry(request)
    cache = request.app.get(PULL_THROUGH)
    if cache is not None and request.method == "GET" \
            and not (reg.blob_visible(repo, digest) and reg.blobs.exists(digest)):
        # Repair only: a pull through the cache stores every blob of a manifest
        # with it, so this fetches just a blob that a manifest held here needs
        # and lacks (False: none does, or no rule covers the repository, and the
        # 404 below stands). Never on HEAD: clients HEAD every layer before they
        # push it, and a push must neither wait for nor depend on the upstream.
        await cache.fetch_blob(repo, str(digest))
    if request.method == "HEAD":
        info = reg.stat_blob(repo, digest)
        if not reg.blobs.exists(digest):  # HEAD must not promise what GET cannot serve
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": str(digest)})
        return empty(200, {"Content-Length": str(info.size), DIGEST_HEADER: digest,
                           "Content-Type": "application/octet-stream",
                           "Accept-Ranges": "bytes"})
    redirected = redirect(request, repo, digest)
    if redirected is not None:
        return redirected
    for attempt in range(2):    # a copy found rotten before a byte was sent: the repaired one
        blob = await reg.read_blob(repo, digest)
        try:
            return await _send(request, blob, digest)
        except CorruptBeforeSending as exc:
            if attempt:
                raise being_repaired(str(digest), exc.reason) from None
            await reg.repair.mend(str(digest), exc.reason)
        finally:
            blob.close()
    raise AssertionError("unreachable")


async def _send(request: web.Request, blob: SealedBlob, digest: str) -> web.StreamResponse:
    download = Download(blob, digest, request.headers.get("Range"),
                        rotten=registry(request).repair.found)
    budget = request.app[BANDWIDTH].download
    async with contextlib.aclosing(download.pieces(registry(request).run_blocking)) as pieces:
        first = await anext(pieces)
        if len(first) == download.length and (budget is None or len(first) <= budget.quantum):
            if budget is not None:
                await budget.take(len(first))
            return BodyResponse(status=download.status, body=first, headers=download.headers)
        response = web.StreamResponse(status=download.status, headers=download.headers)
        response.content_length = download.length
        await response.prepare(request)
        try:
            if budget is None:
                await response.write(first)
                async for piece in pieces:
                    await response.write(piece)
            else:
                async with contextlib.aclosing(budget.shaped(following(first, pieces))) as body:
                    async for piece in body:
                        await response.write(piece)
        except BlobCorrupt:
            # Headers are gone; the only honest thing left is to cut the connection
            # so the client sees a short body instead of wrong bytes.
            # Closing the transport is what cuts it: an exception alone would reach
            # the error middleware, whose error response cannot be sent any more,
            # and the client would wait for the rest of the body forever.
            if request.transport is not None:
                request.transport.close()
            raise
    await response.write_eof()
    return response


class CorruptBeforeSending(Exception):
    """The first piece of a download failed its integrity check: nothing was
    sent, so the request can still be answered from a repaired copy."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Download:
    """What a GET of a blob sends: status, headers, and the bytes (all, or the
    range asked for), read one piece ahead of the socket. The HTTP handler and
    the routing proxy's hand-over (``registry_node.handoff``) both send these.
    ``rotten(digest, reason)`` hears of rot met mid-stream, once the caller can
    no longer answer anything but a cut connection (``BlobRepair.found``: the
    client's retry gets the repaired copy)."""

    def __init__(self, blob: SealedBlob, digest: str, range_header: str | None,
                 rotten: Callable[[str, str], object]) -> None:
        wanted = parse_range(range_header, blob.size)
        self.blob = blob
        self.digest = digest
        self.rotten = rotten
        self.start, self.end = wanted or (0, blob.size)
        self.status = 200 if wanted is None else 206
        self.headers = {DIGEST_HEADER: digest, "Accept-Ranges": "bytes",
                        "Content-Type": "application/octet-stream"}
        if wanted is not None:
            self.headers["Content-Range"] = f"bytes {self.start}-{self.end - 1}/{blob.size}"

    @property
    def length(self) -> int:
        return self.end - self.start

    async def pieces(self, run: RunBlocking) -> AsyncIterator[bytes]:
        """The body in pieces of at most ``STREAM_PIECE``; the next is being
        decrypted (on ``run``'s threads) while the caller sends this one.

        A first piece that fails its integrity check raises
        ``CorruptBeforeSending`` (nothing is sent yet: the caller repairs the
        blob and answers from the repaired copy); a later one raises
        ``BlobCorrupt``, after telling ``rotten``, and the caller must cut the
        connection. Close the
        iterator (``contextlib.aclosing``) so a read still in flight ends
        before the blob's file is closed."""
        pos = min(self.end, self.start + STREAM_PIECE)
        reading: asyncio.Future[bytes] | None = asyncio.ensure_future(
            run(lambda: self.blob.read(self.start, pos)))
        try:
            try:
                piece = await asyncio.shield(reading)
            except BlobCorrupt as exc:
                log.error("blob_corrupt", digest=self.digest, error=str(exc))
                raise CorruptBeforeSending(str(exc)) from None
            while True:
                reading = None
                if pos < self.end:
                    stop = min(self.end, pos + STREAM_PIECE)
                    reading = asyncio.ensure_future(run(lambda a=pos, b=stop: self.blob.read(a, b)))
                    pos = stop
                yield piece
                if reading is None:
                    return
                try:
                    piece = await asyncio.shield(reading)
                except BlobCorrupt as exc:
                    log.error("blob_corrupt", digest=self.digest, error=str(exc))
                    self.rotten(self.digest, str(exc))
                    raise
        finally:
            # A read on a worker thread outlives a cancelled await (the shields
            # keep it running): let it end before the caller closes the file.
            if reading is not None and not reading.done():
                await asyncio.wait([reading])
                if not reading.cancelled():
                    reading.exception()          # seen, whatever it was


async def delete_blob(request: web.Request) -> web.Response:
    repo = repo_name(request)
    digest = digest_param(request.match_info["digest"])
    await registry(request).delete_blob(repo, digest)
    return empty(202, {})
