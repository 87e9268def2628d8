"""end-4, end-5, end-6, end-11, end-13 and cancel: blob uploads.

Monolithic (``POST ?digest=``, or ``POST`` then ``PUT`` with the body), chunked
(``PATCH`` with ``Content-Range``), streamed (``PATCH`` without it) and
cross-repository mounts. The upload's state lives in storage, not in the URL,
so an old ``Location`` keeps working and a restart does not lose the session.
On a node whose uploads are shaped, a body is read as the node's upload budget
grants it (``registry_node.bandwidth``): the client is held back by its
connection's flow control, never refused.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from aiohttp import web

from ..blobstore import valid_upload_id
from ..errors import ErrorCode, RegistryError
from ..reference import validate_name
from .common import (
    BANDWIDTH,
    DIGEST_HEADER,
    UPLOAD_UUID_HEADER,
    body_chunks,
    digest_param,
    empty,
    has_body,
    registry,
    repo_name,
)

_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)(?:/(?:\d+|\*))?")


def _session_headers(repo: str, upload_id: str, offset: int) -> dict[str, str]:
    return {
        "Location": f"/v2/{repo}/blobs/uploads/{upload_id}",
        "Range": f"0-{max(offset - 1, 0)}",
        UPLOAD_UUID_HEADER: upload_id,
    }


def _blob_headers(repo: str, digest: str) -> dict[str, str]:
    return {"Location": f"/v2/{repo}/blobs/{digest}", DIGEST_HEADER: digest}


def _content_range(request: web.Request) -> tuple[int | None, int | None]:
    """(start, length) from ``Content-Range``; (None, None) for a streamed chunk."""
    header = request.headers.get("Content-Range")
    if header is None:
        return None, None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match:
        raise RegistryError(ErrorCode.RANGE_INVALID,
                            f"Content-Range must be '<start>-<end>', got {header!r}")
    start, end = int(match[1]), int(match[2])
    if end < start:
        raise RegistryError(ErrorCode.RANGE_INVALID, f"Content-Range {header!r} ends before it starts")
    length = end - start + 1
    if request.content_length is not None and request.content_length != length:
        raise RegistryError(ErrorCode.SIZE_INVALID,
                            f"Content-Range covers {length} bytes, Content-Length says "
                            f"{request.content_length}")
    return start, length


def _blob_body(request: web.Request) -> AsyncIterator[bytes]:
    chunks = body_chunks(request)
    budget = request.app[BANDWIDTH].upload
    return chunks if budget is None else budget.paced(chunks)


def _upload_id(request: web.Request) -> str:
    upload_id = request.match_info["uuid"]
    if not valid_upload_id(upload_id):
        raise RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, {"upload": upload_id})
    return upload_id


async def start_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    reg = registry(request)
    query = request.query
    mount = query.get("mount")
    if mount:
        digest = digest_param(mount, "mount")
        source = query.get("from")
        if source and await reg.mount_blob(repo, digest, validate_name(source)):
            return empty(201, _blob_headers(repo, digest))
    elif "digest" in query:
        digest = digest_param(query.get("digest"))
        length = request.content_length
        info = await reg.put_blob(repo, digest, _blob_body(request), length)
        return empty(201, _blob_headers(repo, info.digest))
    upload_id = await reg.start_upload(repo)
    return empty(202, _session_headers(repo, upload_id, 0))


async def upload_status(request: web.Request) -> web.Response:
    repo = repo_name(request)
    upload_id = _upload_id(request)
    offset = await registry(request).upload_offset(repo, upload_id)
    return empty(204, _session_headers(repo, upload_id, offset))


async def patch_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    upload_id = _upload_id(request)
    start, length = _content_range(request)
    if length is None:
        length = request.content_length
    offset = await registry(request).append_upload(repo, upload_id, _blob_body(request),
                                                   start, length)
    return empty(202, _session_headers(repo, upload_id, offset))


async def finish_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    upload_id = _upload_id(request)
    digest = digest_param(request.query.get("digest"))
    chunks = start = length = None
    if has_body(request):
        start, length = _content_range(request)
        if length is None:
            length = request.content_length
        chunks = _blob_body(request)
    info = await registry(request).complete_upload(repo, upload_id, digest, chunks, start, length)
    return empty(201, _blob_headers(repo, info.digest))


async def cancel_upload(request: web.Request) -> web.Response:
    repo = repo_name(request)
    await registry(request).cancel_upload(repo, _upload_id(request))
    return empty(204, {})
