"""end-3, end-7, end-9: manifests by tag or digest, stored and served byte-exact."""

from __future__ import annotations

from aiohttp import web

from ..errors import ErrorCode, RegistryError
from ..pull_through import ORIGIN_HEADER
from ..registry import manifest_too_large
from .common import (
    DIGEST_HEADER,
    PULL_THROUGH,
    BodyResponse,
    client_request,
    empty,
    registry,
    repo_name,
)


async def get_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    reg = registry(request)
    reference = request.match_info["reference"]
    origin = {}
    try:
        stored = await reg.find_manifest(repo, reference)
    except RegistryError as exc:
        # Not here, nor at a peer: a repository a cache rule covers fetches it
        # from upstream and serves it in this same request.
        cache = request.app.get(PULL_THROUGH)
        if exc.code is not ErrorCode.MANIFEST_UNKNOWN or cache is None \
                or not await cache.fetch_manifest(repo, reference):
            raise
        stored = reg.stat_manifest(repo, reference)
        origin = {ORIGIN_HEADER: "upstream"}
    etag = f'"{stored.digest}"'
    headers = {DIGEST_HEADER: stored.digest, "Content-Type": stored.media_type, "ETag": etag,
               **origin}
    if _none_match(request.headers.get("If-None-Match"), etag):
        return empty(304, headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(stored.size)
        return web.Response(status=200, headers=headers)
    return BodyResponse(status=200, body=reg.manifest_body(stored), headers=headers)


def _none_match(header: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: a list of entity tags or ``*``, compared weakly."""
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise manifest_too_large(limit)
    parts: list[bytes] = []
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise manifest_too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


async def put_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    reg = registry(request)
    body = await _read_limited(request, reg.limits.max_manifest_size)
    if not body:
        raise RegistryError(ErrorCode.MANIFEST_INVALID, "the manifest body is empty")
    result = await reg.put_manifest(repo, request.match_info["reference"], body,
                                    request.headers.get("Content-Type"),
                                    request=client_request(request))
    headers = {"Location": f"/v2/{repo}/manifests/{result.digest}", DIGEST_HEADER: result.digest}
    if result.subject:
        headers["OCI-Subject"] = result.subject
    return empty(201, headers)


async def delete_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    await registry(request).delete_manifest(repo, request.match_info["reference"],
                                            request=client_request(request))
    return empty(202, {})
