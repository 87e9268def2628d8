"""Blob downloads written straight onto a client's connection, handed over by
the routing proxy in front of the node.

Relaying a download, the proxy reads every byte from the node's socket and
writes it to the client's: on a two-core machine that third busy process cost
relayed pulls 12-27 % of their throughput. Instead, for a ``GET`` of a blob by
digest, the proxy passes the client's socket itself (``SCM_RIGHTS`` over a
Unix ``SOCK_SEQPACKET`` socket) with the request head it would have
forwarded; the node writes the whole response on that socket and says so; the
proxy keeps the connection and reads the client's next request.

The wire, one datagram each way per step:

    proxy → node   ``serial`` (u32), ``len(extra)`` (u16), ``extra``, the head;
                   the client's socket as ancillary data. ``extra`` is header
                   lines the proxy adds to every response (``X-Georeg-Replica``,
                   ``Connection: close``), written into this one as they are.
    node → proxy   ``serial`` (u32) and one byte: ``W`` the first response byte
                   is about to be written; ``D`` done, the whole response is in
                   the socket and the node has let go of it; ``N`` not served,
                   nothing was written (the proxy relays the request: errors,
                   anything unusual, are answered by the HTTP handlers, never
                   here); ``X`` cut after ``W`` (the proxy closes the client's
                   connection, as it does for a relayed response cut short).

Only the happy path is served here: a well-formed name and digest, a blob
that exists, a satisfiable or absent range, a first piece that passes its
integrity check. Everything else is ``N``, so the client gets exactly what
the HTTP API answers. Headers are those of the HTTP handler (``Download``).

The socket's address is in Linux's abstract namespace, derived from the
node's HTTP address (``address``), so a proxy that knows where a node listens
knows where to hand over; connections from another user are refused.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import email.utils
import os
import re
import socket
import struct
import time
from urllib.parse import unquote

import structlog

from .api.blobs import Download
from .api.middlewares import request_id
from .crypto import BlobCorrupt
from .errors import RegistryError
from .reference import Digest, validate_name
from .registry import Registry

log = structlog.get_logger("georeg.access")

REQUEST = struct.Struct("!IH")
REPLY = struct.Struct("!Ic")
WRITING, DONE, DECLINED, CUT = b"W", b"D", b"N", b"X"
MAX_REQUEST = 128 * 1024           # a head is at most 64 KiB (the proxy refuses larger)
_BLOB_PATH = re.compile(r"/v2/(.+)/blobs/([^/]+)")
_REASONS = {200: "OK", 206: "Partial Content"}


def address(host: str, port: int) -> bytes:
    """The hand-over socket of the node serving HTTP on ``host:port``."""
    return b"\0georeg/handoff/%s:%d" % (host.encode(), port)


class _Declined(Exception):
    """Nothing was written: the proxy relays the request instead."""


class HandoffServer:
    """Accepts proxies' hand-over connections and serves what they hand over."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self.registry = registry
        self.address = address(host, port)
        self._listener: socket.socket | None = None
        self._channels: set[socket.socket] = set()
        self._tasks: set[asyncio.Task] = set()
        self._uid = os.getuid()

    def start(self) -> bool:
        """Listen; False (and downloads are relayed) if the address is taken."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.address)
            listener.listen(64)
        except OSError as exc:
            listener.close()
            log.warning("handoff_unavailable", address=self.address[1:].decode(), error=str(exc))
            return False
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)
        return True

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking hand-overs, give those in flight ``grace_s`` to finish (as
        aiohttp gives its requests), then cut the rest (the proxy resets their
        client connections). Hand-overs sent but not yet read are closed with
        their channel, unanswered: the proxy relays those. Call it before the
        node's storage closes."""
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for channel in self._channels:
            loop.remove_reader(channel.fileno())
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    # -- the proxy's connections ---------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                channel, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:     # out of descriptors: the proxies relay meanwhile
                log.warning("handoff_accept_failed", error=str(exc))
                return
            creds = channel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid not in (self._uid, 0):
                channel.close()
                continue
            channel.setblocking(False)
            self._channels.add(channel)
            asyncio.get_running_loop().add_reader(channel.fileno(), self._receive, channel)

    def _receive(self, channel: socket.socket) -> None:
        fds = array.array("i")
        for _ in range(64):
            try:
                data, ancillary, flags, _ = channel.recvmsg(MAX_REQUEST,
                                                            socket.CMSG_SPACE(fds.itemsize))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancillary, flags = b"", [], 0
            received = [fd for level, kind, raw in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                        for fd in array.array("i", raw[:len(raw) - len(raw) % fds.itemsize])]
            if not data or len(received) != 1 or len(data) < REQUEST.size \
                    or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in received:
                    os.close(fd)
                self._drop(channel, "closed" if not data else "malformed hand-over")
                return
            serial, extra_length = REQUEST.unpack_from(data)
            extra = data[REQUEST.size:REQUEST.size + extra_length]
            head = data[REQUEST.size + extra_length:]
            task = asyncio.get_running_loop().create_task(
                self._serve(channel, serial, received[0], extra, head))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop(self, channel: socket.socket, why: str) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            asyncio.get_running_loop().remove_reader(channel.fileno())
            channel.close()
            if why != "closed":
                log.warning("handoff_channel_dropped", reason=why)

    def _reply(self, channel: socket.socket, serial: int, code: bytes) -> None:
        if channel not in self._channels:
            return                 # the proxy went away; its client connections went with it
        try:
            channel.send(REPLY.pack(serial, code))
        except OSError as exc:     # the proxy is gone, or has stopped reading: it is stuck
            self._drop(channel, f"reply failed: {exc}")

    # -- one download --------------------------------------------------------------------

    async def _serve(self, channel: socket.socket, serial: int, fd: int, extra: bytes,
                     head: bytes) -> None:
        started = time.perf_counter()
        try:
            client = socket.socket(fileno=fd)
        except OSError:                 # not a socket
            os.close(fd)
            self._reply(channel, serial, DECLINED)
            return
        code, status, path, rid = DECLINED, 499, "", ""
        try:
            if client.type != socket.SOCK_STREAM:
                return
            client.setblocking(False)
            path, headers = _parse(head)
            rid = request_id(headers.get("x-request-id"))
            download = self._find(path, headers)
            with contextlib.closing(download.blob):
                async with contextlib.aclosing(
                        download.pieces(self.registry.run_blocking)) as pieces:
                    try:
                        first = await anext(pieces)
                    except RegistryError:        # its first piece failed the integrity check
                        return
                    code, status = CUT, download.status
                    self._reply(channel, serial, WRITING)
                    await _send(client, _response_head(download, rid, extra), first)
                    async for piece in pieces:
                        await _send(client, piece)
            code = DONE
        except _Declined:
            pass
        except (OSError, BlobCorrupt, asyncio.CancelledError) as exc:
            # After ``W``: the client went away, a later piece failed its check,
            # or the node is stopping. The proxy closes the client's connection.
            log.info("handoff_cut", rid=rid, path=path, error=str(exc) or type(exc).__name__)
        except Exception:
            log.exception("handoff_fault", rid=rid, path=path)
        finally:
            remote = _peer(client)
            client.close()       # only this process's descriptor: the proxy keeps the connection
            self._reply(channel, serial, code)
            if code != DECLINED:
                log.info("request", rid=rid, method="GET", path=path,
                         status=status if code == DONE else 499,
                         ms=round((time.perf_counter() - started) * 1000, 2), remote=remote,
                         handed_over=True)

    def _find(self, path: str, headers: dict[str, str]) -> Download:
        """The download ``path`` asks for, or ``_Declined`` for anything the HTTP
        handler would answer with an error."""
        match = _BLOB_PATH.fullmatch(path)
        if match is None:
            raise _Declined
        try:
            repo = validate_name(match[1])
            digest = Digest.parse(match[2])
            blob = self.registry.open_blob(repo, digest)
        except RegistryError:
            raise _Declined from None
        try:
            return Download(blob, digest, headers.get("range"))
        except RegistryError:
            blob.close()
            raise _Declined from None


def _parse(head: bytes) -> tuple[str, dict[str, str]]:
    """The proxy's forwarded head (llhttp parsed it) → path and headers by
    lower-case name (first wins, as in aiohttp's ``headers.get``). A head this
    path would read differently from aiohttp (an escaped path, another method,
    HTTP/1.0) is declined."""
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.rpartition(" ")
    path = target.partition("?")[0]
    if method != "GET" or version != "HTTP/1.1" or not path.startswith("/v2/") \
            or unquote(path) != path:
        raise _Declined
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(":")
        if not colon:
            raise _Declined
        headers.setdefault(name.strip().lower(), value.strip())
    return path, headers


def _response_head(download: Download, rid: str, extra: bytes) -> bytes:
    lines = [f"HTTP/1.1 {download.status} {_REASONS[download.status]}",
             f"Content-Length: {download.length}",
             *(f"{name}: {value}" for name, value in download.headers.items()),
             "Docker-Distribution-API-Version: registry/2.0",
             f"X-Request-Id: {rid}",
             f"Date: {email.utils.formatdate(usegmt=True)}"]
    return ("\r\n".join(lines) + "\r\n").encode("latin-1") + extra + b"\r\n"


async def _send(client: socket.socket, *buffers: bytes) -> None:
    """Write ``buffers`` in full: at once as far as the socket takes them (one
    system call for a head and a small blob), then as it drains."""
    try:
        sent = client.sendmsg(buffers)
    except (BlockingIOError, InterruptedError):
        sent = 0
    loop = asyncio.get_running_loop()
    for buffer in buffers:
        if sent >= len(buffer):
            sent -= len(buffer)
            continue
        await loop.sock_sendall(client, memoryview(buffer)[sent:])
        sent = 0


def _peer(client: socket.socket) -> str | None:
    try:
        peer = client.getpeername()
    except OSError:
        return None
    return peer[0] if isinstance(peer, tuple) else None
