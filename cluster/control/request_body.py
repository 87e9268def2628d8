"""What an HTTP request of the management server (``management``) and its
dashboard (``dashboard``) sends in its body: a JSON object, and its fields of
the right type. Anything else is a ``ClusterError`` (400) that says what to send."""

from __future__ import annotations

import json

from aiohttp import web

from .errors import ClusterError

_REQUIRED = object()


async def json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ClusterError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise ClusterError("the request body must be a JSON object")
    return body


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
