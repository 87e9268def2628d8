"""Node administration beside the OCI API: the storage and clock fault seams,
bit rot, and what the node did about rot.

    GET  /georeg/v1/faults/storage   {"full": false, "slow_ms": 0, "eio_read": 0,
                                      "eio_write": 0, "seed": null}
    PUT  /georeg/v1/faults/storage   the same shape; what is absent is unchanged
                                     (a seed given restarts the random source)
    POST /georeg/v1/faults/bitrot    {"blobs": N, "seed": S, "digests": [...]}: flip
                                     a byte in N stored blob files (among those
                                     digests, if given) → {"rotted": [{"digest", "offset"}],
                                     "missing": []}; if a digest named is not stored,
                                     nothing rots and "missing" names it
    GET  /georeg/v1/blobs/repairs    what was quarantined, repaired, left
                                     unrepairable (``blob_repair.BlobRepair.report``)
    POST /georeg/v1/blobs/scrub      {"budget_bytes", "rate_bytes_s"}: read and
                                     authenticate stored blobs, repairing what
                                     fails (``BlobRepair.scrub``)
    GET  /georeg/v1/faults/clock     the node's clock: skew, peers' offsets, verdict
    PUT  /georeg/v1/faults/clock     {"offset_s": 300, "drift": 1, "since_ns": N}: the
                                     whole skew ({} resets it; ``registry_node.clock``)
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from ..crypto import HEADER_SIZE
from ..errors import ErrorCode, RegistryError
from ..reference import Digest
from .common import json_response, registry

SCRUB_BUDGET = 1 << 30                 # bytes one scrub call reads, unless told
SCRUB_RATE = 64 * 1024 * 1024          # bytes a second, unless told


def _bad(detail: str) -> RegistryError:
    return RegistryError(ErrorCode.UNSUPPORTED, detail, message="bad fault", status=400)


async def _body(request: web.Request, shape: str) -> dict:
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise _bad(f"send {shape}")
    return body


def _number(body: dict, name: str, low: float, high: float = math.inf) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not low <= value <= high:
        bound = f"between {low:g} and {high:g}" if high != math.inf else f"at least {low:g}"
        raise _bad(f"{name} must be a number {bound}")
    return float(value)


def _seed(body: dict) -> int | None:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("seed must be an integer")
    return seed


async def get_storage_faults(request: web.Request) -> web.Response:
    return json_response(registry(request).meta.faults.as_dict())


async def put_storage_faults(request: web.Request) -> web.Response:
    body = await _body(request, '{"full": bool, "slow_ms": number, "eio_read": P, '
                                '"eio_write": P, "seed": int}')
    faults = registry(request).meta.faults
    changes = {name: _number(body, name, 0.0, 1.0) for name in ("eio_read", "eio_write")
               if name in body}
    if "slow_ms" in body:
        changes["slow_ms"] = _number(body, "slow_ms", 0.0)
    if "seed" in body:
        faults.reseed(_seed(body))
    if "full" in body:
        faults.full = bool(body["full"])
    for name, value in changes.items():
        setattr(faults, name, value)
    return json_response(faults.as_dict())


async def post_bitrot(request: web.Request) -> web.Response:
    body = await _body(request, '{"blobs": N, "seed": int, "digests": [digest, …]}')
    count = int(_number(body, "blobs", 1, 10_000)) if "blobs" in body else 1
    seed = _seed(body)
    among = body.get("digests")
    if among is not None:
        if not isinstance(among, list):
            raise _bad("digests must be a list of digests (sha256:…)")
        among = [Digest.parse(d) for d in among]     # 400 DIGEST_INVALID saying which
    reg = registry(request)
    missing = [d for d in among or () if not reg.blobs.exists(d)]
    if missing:             # nothing rots: the caller named a blob that is not here
        return json_response({"rotted": [], "missing": missing, "header_bytes": HEADER_SIZE})
    rotted = await reg.run_blocking(lambda: reg.blobs.rot(count, seed, among))
    return json_response({"rotted": rotted, "missing": [], "header_bytes": HEADER_SIZE})


async def get_repairs(request: web.Request) -> web.Response:
    reg = registry(request)
    return json_response(await reg.run_blocking(reg.repair.report))


async def post_scrub(request: web.Request) -> web.Response:
    body = await _body(request, '{"budget_bytes": N, "rate_bytes_s": N}')
    budget = int(_number(body, "budget_bytes", 1)) if "budget_bytes" in body else SCRUB_BUDGET
    rate = _number(body, "rate_bytes_s", 0) if "rate_bytes_s" in body else SCRUB_RATE
    return json_response(await registry(request).repair.scrub(budget, rate))


async def get_clock(request: web.Request) -> web.Response:
    node = registry(request)
    return json_response(node.clock.describe(node.hlc.last))


async def put_clock_fault(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
        if not isinstance(body, dict):
            raise ValueError
        offset_s = float(body.get("offset_s", 0.0))
        drift = float(body.get("drift", 1.0))
        since = body.get("since_ns")
        since_ns = None if since is None else int(since)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise RegistryError(ErrorCode.UNSUPPORTED, 'send {"offset_s": number, "drift": number, '
                            '"since_ns": integer}', message="bad fault", status=400) from None
    node = registry(request)
    try:
        node.clock.clock.skew(offset_s, drift, since_ns)
    except ValueError as exc:
        raise RegistryError(ErrorCode.UNSUPPORTED, str(exc), message="bad fault",
                            status=400) from None
    return json_response(node.clock.describe(node.hlc.last))
