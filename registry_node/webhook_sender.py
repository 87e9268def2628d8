"""The HTTP transport of webhook deliveries (``webhook_delivery.Sender``), over
aiohttp's client.

One session per node, with no limit on connections in total or per host:
each webhook's worker sends one request at a time, so the number of open
connections is bounded by the number of webhooks, and a receiver that hangs
holds only its own (a shared pool would let it starve the others). No proxy
from the environment, no redirects followed (a 3xx is the receiver's answer),
and only the start of a response body is read.
"""

from __future__ import annotations

import asyncio

import aiohttp

from .webhook_delivery import RESPONSE_BODY_KEPT, Answer, NoAnswer, Outgoing


class HttpSender:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def send(self, request: Outgoing, timeout_s: float) -> Answer:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                trust_env=False, auto_decompress=True)
        try:
            async with self._session.request(
                    request.method, request.uri, data=request.body, headers=request.headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    allow_redirects=False) as response:
                body = await response.content.read(RESPONSE_BODY_KEPT * 4)
                return Answer(response.status, dict(response.headers.items()),
                              body.decode(errors="replace"))
        except TimeoutError:
            raise NoAnswer("timeout", f"no answer within {timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: a URI aiohttp cannot use (validated when written, but
            # a receiver may redirect DNS anywhere); never retried forever, it
            # is given up at the horizon like any connection error.
            raise NoAnswer("connection", str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            # aiohttp's connector closes its transports on the next loop turn.
            await asyncio.sleep(0)
