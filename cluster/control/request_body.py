"""What an HTTP request of the management server (``management``) and its
dashboard (``dashboard``) sends in its body: a JSON object, and its fields of
the right type. Anything else is a ``ClusterError`` (400) that says what to send;
a body past its bound is a ``TooLarge`` (413), whether or not it says its length."""

from __future__ import annotations

import json

from aiohttp import web

from .errors import ClusterError, TooLarge

_REQUIRED = object()


async def json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClusterError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ClusterError("the request body must be a JSON object")
    return body


async def bounded_body(request: web.Request, limit: int, what: str) -> bytes:
    """The body, read no further than ``limit`` bytes: a chunked body (no
    Content-Length) is held to the bound as it arrives."""
    too_large = TooLarge(f"{what} weighs at most {limit // 1024} KiB")
    if (request.content_length or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_any():     # ends: past limit, or at the end
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def field(body: dict, name: str, kind: type, default: object = _REQUIRED):
    """``body[name]`` if it is a ``kind`` (never a bool passing as an int), else
    ``default``; a 400 saying what is wrong otherwise."""
    if name not in body or body[name] is None:
        if default is _REQUIRED:
            raise ClusterError(f"give {name!r}")
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ClusterError(f"{name!r} is a {kind.__name__}, not {value!r}"[:200])
    return value
