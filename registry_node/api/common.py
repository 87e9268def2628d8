"""Small pieces every handler uses: app keys, parameter parsing, bodies, headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

import msgspec
from aiohttp import web

from ..bandwidth import Bandwidth
from ..errors import ErrorCode, RegistryError
from ..records import ClientRequest
from ..reference import Digest, validate_name
from .middlewares import REQUEST_ID

if TYPE_CHECKING:
    from ..configuration import Configuration
    from ..pull_through import PullThrough
    from ..registry import Registry
    from ..tag_moves import TagMoveLog
    from ..untagged import UntaggedRetention
    from ..webhook_delivery import WebhookDelivery

REGISTRY: web.AppKey[Registry] = web.AppKey("registry", object)  # type: ignore[arg-type]
# The node's registry configuration (``registry_node.configuration``).
CONFIGURATION: web.AppKey[Configuration] = web.AppKey("configuration", object)  # type: ignore[arg-type]
# The node's webhook delivery (``registry_node.webhook_delivery``).
WEBHOOKS: web.AppKey[WebhookDelivery] = web.AppKey("webhooks", object)  # type: ignore[arg-type]
# The node's pull-through cache (``registry_node.pull_through``).
PULL_THROUGH: web.AppKey[PullThrough] = web.AppKey("pull_through", object)  # type: ignore[arg-type]
# The node's sweep of untagged manifests (``registry_node.untagged``).
RETENTION: web.AppKey[UntaggedRetention] = web.AppKey("retention", object)  # type: ignore[arg-type]
# The tag moves of the node's log (``registry_node.tag_moves``).
TAG_MOVES: web.AppKey[TagMoveLog] = web.AppKey("tag_moves", object)  # type: ignore[arg-type]
# The node's blob bandwidth budgets (``registry_node.bandwidth``); unshaped: both None.
BANDWIDTH: web.AppKey[Bandwidth] = web.AppKey("bandwidth", Bandwidth)

DIGEST_HEADER = "Docker-Content-Digest"
UPLOAD_UUID_HEADER = "Docker-Upload-UUID"
JSON = "application/json"
_json = msgspec.json.Encoder(enc_hook=lambda value: str(value) if isinstance(value, str) else None)


def registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


def client_request(request: web.Request) -> ClientRequest:
    """The request as a webhook reports it (``records.ClientRequest``)."""
    return ClientRequest(id=request.get(REQUEST_ID, ""), host=request.host[:256],
                         method=request.method,
                         useragent=request.headers.get("User-Agent", "")[:512])


def repo_name(request: web.Request) -> str:
    return validate_name(request.match_info["name"])


def digest_param(value: str | None, what: str = "digest") -> Digest:
    if not value:
        raise RegistryError(ErrorCode.DIGEST_INVALID, f"the {what} parameter is required",
                            message="digest missing")
    return Digest.parse(value)


class BodyResponse(web.Response):
    """A response that lets go of its body once the body is sent.

    aiohttp's server keeps a connection's last response until the next request
    arrives on it, and the proxies in front of a node keep idle connections
    for reuse: each held a served blob (up to a 1 MiB piece), a manifest or a
    listing, 3 MiB in a node 25 s after a workload of 80 images."""

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await super().write_eof(data)
        finally:
            self.body = None


def json_response(payload: object, status: int = 200, content_type: str = JSON,
                  headers: dict[str, str] | None = None) -> web.Response:
    return BodyResponse(body=_json.encode(payload), status=status, content_type=content_type,
                        headers=headers)


def empty(status: int, headers: dict[str, str]) -> web.Response:
    headers.setdefault("Content-Length", "0")
    return web.Response(status=status, headers=headers)


def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    return request.content.iter_any()


def has_body(request: web.Request) -> bool:
    if request.content_length is not None:
        return request.content_length > 0
    return request.headers.get("Transfer-Encoding", "").lower() == "chunked"


def page_size(request: web.Request, cap: int) -> int | None:
    """The `n` query parameter: None when absent, else an integer in [0, cap]."""
    raw = request.query.get("n")
    if raw is None or raw == "":
        return None
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise RegistryError(ErrorCode.PAGINATION_NUMBER_INVALID,
                            f"n must be a non-negative integer, got {raw!r}")
    return min(n, cap)


def next_link(path: str, n: int | None, last: str) -> str:
    query = urlencode({"last": last, **({"n": n} if n is not None else {})})
    return f'<{quote(path)}?{query}>; rel="next"'
