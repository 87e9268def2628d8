"""ACR's ``/acr/v1/`` metadata routes: a repository's, tag's or manifest's
properties and changeable attributes (``GET``, ``PATCH``), the ``_tags`` and
``_manifests`` listings, untag (``DELETE …/_tags/{tag}``), and the recycle
bin of soft delete (``GET …/_deleted``, ``POST …/_deleted/{tag|digest}
[?force=true]`` to restore: ``registry_node.recycle_bin``). The views are
``registry_node.metadata``'s, the rules ``registry_node.locks``'.

Access (``api.auth``): ``GET`` needs ``metadata_read``, ``PATCH``
``metadata_write``, ``DELETE`` ``delete`` on the repository — ACR's scope-map
actions ``metadata/read``, ``metadata/write``, ``content/delete``. The recycle
bin: listing needs ``delete``, restoring ``push`` and ``delete``.
"""

from __future__ import annotations

import json

from aiohttp import web

from .. import locks, metadata
from ..errors import ErrorCode, RegistryError
from ..reference import validate_tag
from .common import (
    client_request,
    digest_param,
    json_response,
    next_link,
    page_size,
    registry,
    repo_name,
)

MAX_PAGE = 1000
MAX_BODY = 4096


def _login_server(request: web.Request) -> str:
    return request.host


async def _update(request: web.Request) -> dict[str, bool]:
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise RegistryError(ErrorCode.SIZE_INVALID, f"an attributes body is at most {MAX_BODY} "
                            "bytes", message="invalid attributes", status=413)
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        body = None
    return locks.parse_update(body)


async def get_repository(request: web.Request) -> web.Response:
    repo = repo_name(request)
    return json_response(metadata.repository_properties(registry(request), repo,
                                                        _login_server(request)))


async def patch_repository(request: web.Request) -> web.Response:
    repo = repo_name(request)
    update = await _update(request)
    reg = registry(request)
    await reg.update_attributes(locks.repository(repo), update, request=client_request(request))
    return json_response(metadata.repository_properties(reg, repo, _login_server(request)))


async def get_tag(request: web.Request) -> web.Response:
    repo = repo_name(request)
    tag = validate_tag(request.match_info["tag"])
    return json_response(metadata.tag_properties(registry(request), repo, tag,
                                                 _login_server(request)))


async def patch_tag(request: web.Request) -> web.Response:
    repo = repo_name(request)
    tag = validate_tag(request.match_info["tag"])
    update = await _update(request)
    reg = registry(request)
    await reg.update_attributes(locks.tag(repo, tag), update, request=client_request(request))
    return json_response(metadata.tag_properties(reg, repo, tag, _login_server(request)))


async def delete_tag(request: web.Request) -> web.Response:
    """Untag: the tag goes, its manifest stays (``georeg repository untag``)."""
    repo = repo_name(request)
    tag = validate_tag(request.match_info["tag"])
    reg = registry(request)
    if not reg.repository_exists(repo):     # say so, rather than that the tag is unknown
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": repo})
    await reg.delete_manifest(repo, tag, request=client_request(request))
    return json_response({}, status=202)


async def get_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    digest = str(digest_param(request.match_info["digest"]))
    return json_response(metadata.manifest_properties(registry(request), repo, digest,
                                                      _login_server(request)))


async def patch_manifest(request: web.Request) -> web.Response:
    repo = repo_name(request)
    digest = str(digest_param(request.match_info["digest"]))
    update = await _update(request)
    reg = registry(request)
    await reg.update_attributes(locks.manifest(repo, digest), update,
                                request=client_request(request))
    return json_response(metadata.manifest_properties(reg, repo, digest, _login_server(request)))


async def list_deleted(request: web.Request) -> web.Response:
    """ACR's list-deleted and list-deleted-tags: the repository's recycle bin
    here, paged (``n``, ``last``, ``stamp``) as the other listings are."""
    n = page_size(request, MAX_PAGE)
    body, more, end, last = metadata.deleted(registry(request), repo_name(request),
                                             _login_server(request), n,
                                             request.query.get("last") or None, _stamp(request))
    headers = None
    if more and last is not None:
        headers = {"Link": next_link(request.path, n, last).replace(">;", f"&stamp={end}>;", 1)}
    return json_response(body, headers=headers)


async def restore(request: web.Request) -> web.Response:
    """ACR's manifest restore: ``reference`` a digest or a tag it had;
    ``force=true`` moves back a tag that names another manifest since."""
    repo = repo_name(request)
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise RegistryError(ErrorCode.UNSUPPORTED, "force is true or false",
                            message="invalid force", status=400)
    result = await registry(request).restore(repo, request.match_info["reference"],
                                             force=force == "true",
                                             request=client_request(request))
    return json_response(result)


def _stamp(request: web.Request) -> int | None:
    """``stamp``: where a time-ordered listing's ``last`` was (``metadata``)."""
    raw = request.query.get("stamp")
    if not raw:
        return None
    if not raw.isdigit() or len(raw) > 20:
        raise RegistryError(ErrorCode.UNSUPPORTED, "stamp must be the one a Link gave",
                            message="invalid stamp", status=400)
    return int(raw)


def _listing(request: web.Request, view, key: str, field: str) -> web.Response:
    repo = repo_name(request)
    n = page_size(request, MAX_PAGE)
    orderby = request.query.get("orderby")
    body, more, end = view(registry(request), repo, _login_server(request), orderby, n,
                           request.query.get("last") or None, _stamp(request))
    headers = None
    if more and body[key]:
        link = next_link(request.path, n, body[key][-1][field])
        if orderby:
            link = link.replace(">;", f"&orderby={orderby}&stamp={end}>;", 1)
        headers = {"Link": link}
    return json_response(body, headers=headers)


async def list_tags(request: web.Request) -> web.Response:
    return _listing(request, metadata.list_tags, "tags", "name")


async def list_manifests(request: web.Request) -> web.Response:
    return _listing(request, metadata.list_manifests, "manifests", "digest")
