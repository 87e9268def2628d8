"""The node's tag moves (``registry_node.tag_moves``), for the control
process's base-image triggers: a node-internal route, never forwarded.

    GET /georeg/v1/tag-moves[?after=SEQ&wait=SECONDS]
        {"moves": [{"seq", "repository", "tag", "digest"}], "next": SEQ, "floor": SEQ,
         "reset": BOOL}

Without ``after`` the answer is the head (no moves, ``next`` the last
sequence), and so is an ``after`` past the head, with ``"reset": true``; with it, the moves after it, waiting up to ``wait`` seconds
(at most 30) for the next commit when there are none yet.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import ErrorCode, RegistryError
from ..tag_moves import MAX_WAIT_S
from .common import TAG_MOVES, json_response


def _number(request: web.Request, name: str, most: float) -> float | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= most or (name == "after" and not (text.isascii() and text.isdigit())):
        raise RegistryError(ErrorCode.UNSUPPORTED, f"{name} is a number from 0 to {most:g}",
                            message="invalid tag-moves request", status=400)
    return value


async def get_tag_moves(request: web.Request) -> web.Response:
    after = _number(request, "after", 2.0**63)
    wait = _number(request, "wait", MAX_WAIT_S) or 0.0
    moves = await request.app[TAG_MOVES].wait(None if after is None else int(after), wait)
    return json_response(moves.as_dict())
