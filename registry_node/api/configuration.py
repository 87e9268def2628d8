"""Registry configuration on one node (``registry_node.configuration``):
node-internal routes, never forwarded by an endpoint.

    GET    /georeg/v1/configuration                    everything this node holds, tombstones
                                                       included, with stamps, and its generation
    GET    /georeg/v1/configuration/{kind}             the same, for one kind
    GET    /georeg/v1/configuration/{kind}/{name}      one live object (404 if absent or deleted)
    PUT    /georeg/v1/configuration/{kind}/{name}      write it; the body is its value (JSON)
    DELETE /georeg/v1/configuration/{kind}/{name}      delete it (a tombstone)

Writes are for the management API, which sends them to a node of the home
region only; the node itself does not refuse them elsewhere (it cannot tell
which region holds the control plane: the plan can, and the plan is the
management API's). Reads answer from this node alone: they show convergence.
"""

from __future__ import annotations

import json

from aiohttp import web

from ..configuration import MAX_VALUE_BYTES, check_name, kind_of
from ..errors import ErrorCode, RegistryError
from .common import CONFIGURATION, json_response


def _kind_and_name(request: web.Request) -> tuple[str, str]:
    kind = kind_of(request.match_info["kind"]).name
    return kind, check_name(kind_of(kind), request.match_info["name"])


async def list_configuration(request: web.Request) -> web.Response:
    config = request.app[CONFIGURATION]
    kind = request.match_info.get("kind")
    if kind is not None:
        kind_of(kind)
    return json_response({"generation": config.generation,
                          "objects": [o.as_dict() for o in config.registers(kind)]})


async def get_object(request: web.Request) -> web.Response:
    kind, name = _kind_and_name(request)
    obj = request.app[CONFIGURATION].register(kind, name)
    if obj is not None and not obj.deleted:
        return json_response(obj.as_dict())
    raise RegistryError(ErrorCode.NAME_UNKNOWN, {"kind": kind, "name": name},
                        message="configuration object not found")


async def put_object(request: web.Request) -> web.Response:
    kind, name = _kind_and_name(request)
    if request.content_length is not None and request.content_length > MAX_VALUE_BYTES:
        raise RegistryError(ErrorCode.SIZE_INVALID, f"a configuration value is at most "
                            f"{MAX_VALUE_BYTES} bytes", message="configuration value too large",
                            status=413)
    raw = await request.content.read(MAX_VALUE_BYTES + 1)
    if len(raw) > MAX_VALUE_BYTES:
        raise RegistryError(ErrorCode.SIZE_INVALID, f"a configuration value is at most "
                            f"{MAX_VALUE_BYTES} bytes", message="configuration value too large",
                            status=413)
    try:
        value = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise RegistryError(ErrorCode.UNSUPPORTED, "the body must be a JSON object",
                            message="invalid configuration value", status=400) from None
    stored = await request.app[CONFIGURATION].put(kind, name, value)
    return json_response(stored.as_dict())


async def delete_object(request: web.Request) -> web.Response:
    kind, name = _kind_and_name(request)
    stored = await request.app[CONFIGURATION].delete(kind, name)
    return json_response(stored.as_dict())
