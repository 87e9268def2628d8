"""end-8 tags list, the catalog, and end-12 referrers.

Tags and repositories come out in byte order; ``n`` and ``last`` page through
them and a ``Link: <…>; rel="next"`` header says when more follow. Referrers of
a digest nobody points at are an empty index, never a 404.
"""

from __future__ import annotations

from aiohttp import web

from ..manifest import OCI_INDEX
from .common import (
    client_request,
    digest_param,
    json_response,
    next_link,
    page_size,
    registry,
    repo_name,
)

MAX_PAGE = 10_000


async def list_tags(request: web.Request) -> web.Response:
    repo = repo_name(request)
    n = page_size(request, MAX_PAGE)
    tags, more = registry(request).list_tags(repo, n, request.query.get("last") or None)
    headers = {"Link": next_link(request.path, n, tags[-1])} if more and tags else None
    return json_response({"name": repo, "tags": tags}, headers=headers)


async def catalog(request: web.Request) -> web.Response:
    n = page_size(request, MAX_PAGE)
    repos, more = registry(request).catalog(n, request.query.get("last") or None)
    headers = {"Link": next_link(request.path, n, repos[-1])} if more and repos else None
    return json_response({"repositories": repos}, headers=headers)


async def referrers(request: web.Request) -> web.Response:
    repo = repo_name(request)
    subject = digest_param(request.match_info["digest"])
    artifact_type = request.query.get("artifactType") or None
    found = registry(request).referrers(repo, subject, artifact_type)
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else None
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": found}
    return json_response(index, content_type=OCI_INDEX, headers=headers)


async def delete_repository(request: web.Request) -> web.Response:
    """``DELETE /acr/v1/{name}`` — ACR's repository delete: every manifest and tag."""
    repo = repo_name(request)
    result = await registry(request).delete_repository(repo, request=client_request(request))
    return json_response(result, status=202)
