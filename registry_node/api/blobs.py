"""end-2 and end-10: read and delete blobs.

Reads decrypt only the segments a range needs, in a worker thread, one piece
ahead of the socket, so a blob of any size streams in bounded memory.
"""

from __future__ import annotations

import re

import structlog
from aiohttp import web

from ..crypto import BlobCorrupt, SealedBlob
from ..errors import ErrorCode, RegistryError
from .common import DIGEST_HEADER, BodyResponse, digest_param, empty, registry, repo_name

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
    if request.method == "HEAD":
        info = reg.stat_blob(repo, digest)
        if not reg.blobs.exists(digest):  # HEAD must not promise what GET cannot serve
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": str(digest)})
        return empty(200, {"Content-Length": str(info.size), DIGEST_HEADER: digest,
                           "Content-Type": "application/octet-stream",
                           "Accept-Ranges": "bytes"})
    blob = reg.open_blob(repo, digest)
    try:
        return await _send(request, blob, digest)
    finally:
        blob.close()


async def _send(request: web.Request, blob: SealedBlob, digest: str) -> web.StreamResponse:
    wanted = parse_range(request.headers.get("Range"), blob.size)
    start, end = wanted or (0, blob.size)
    headers = {DIGEST_HEADER: digest, "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
    run = registry(request).run_blocking
    first_end = min(end, start + STREAM_PIECE)
    try:
        first = await run(lambda: blob.read(start, first_end))
    except BlobCorrupt as exc:
        raise _corrupt(digest, exc) from None
    if first_end == end:
        return BodyResponse(status=status, body=first, headers=headers)

    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = end - start
    await response.prepare(request)
    pos, piece = first_end, first
    while True:
        nxt = None
        if pos < end:
            stop = min(end, pos + STREAM_PIECE)
            nxt = run(lambda a=pos, b=stop: blob.read(a, b))
            pos = stop
        await response.write(piece)
        if nxt is None:
            break
        try:
            piece = await nxt
        except BlobCorrupt as exc:
            # Headers are gone; the only honest thing left is to cut the connection
            # so the client sees a short body instead of wrong bytes.
            # Closing the transport is what cuts it: an exception alone would reach
            # the error middleware, whose error response cannot be sent any more,
            # and the client would wait for the rest of the body forever.
            log.error("blob_corrupt", digest=digest, error=str(exc))
            if request.transport is not None:
                request.transport.close()
            raise
    await response.write_eof()
    return response


def _corrupt(digest: str, exc: BlobCorrupt) -> RegistryError:
    log.error("blob_corrupt", digest=digest, error=str(exc))
    return RegistryError(ErrorCode.UNKNOWN, "stored blob failed its integrity check; it is not served",
                         message="blob corrupt", status=500)


async def delete_blob(request: web.Request) -> web.Response:
    repo = repo_name(request)
    digest = digest_param(request.match_info["digest"])
    await registry(request).delete_blob(repo, digest)
    return empty(202, {})
