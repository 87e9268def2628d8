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

A response is never sent twice: the node writes its first byte only once
its ``W`` is in the channel's socket, and the proxy relays a hand-over that
got no ``W`` only when it has read the node's end of the channel (so every
reply the node sent has been seen). A channel the proxy drops itself cuts
every hand-over on it.

Only the happy path is served here: a well-formed name and digest, a
request the node's access chain admits (on a node with auth on: credentials
with ``pull`` on the repository, checked by ``admits`` before the blob is
looked up), a blob that exists, a satisfiable or absent range, a read
throttling lets through (``registry_node.throttle``, on the identity
``admits`` named; asked last, so a request declined for any other reason
takes no token here and one in the HTTP chain), a first piece
that passes its integrity check, not marked for a redirect
(``registry_node.api.redirects``). Everything else is ``N``, so the client gets
exactly what the HTTP API answers — a 401 challenge or 403 included, from
the one place that writes them. Headers are those of the HTTP handler
(``Download``). On a node whose downloads are shaped, the body leaves as the
node's download budget grants it, the same budget its HTTP handler spends
(``registry_node.bandwidth``): a hand-over is no way around the limit.

The socket's address is in Linux's abstract namespace, derived from the
node's HTTP address (``address``), so a proxy that knows where a node listens
knows where to hand over. Abstract names have no permissions, so each end
checks the other's user (``SO_PEERCRED``): the node takes hand-overs only from
its own user (or root), the proxy hands over only to its own user's (or
root's) socket, never to a process of another user that took the name.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import email.utils
import functools
import os
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import parse_qs, unquote

import structlog

from .api.blobs import CorruptBeforeSending, Download
from .api.middlewares import request_id
from .auth.grants import REDIRECT_HEADER, carries_grant
from .bandwidth import Bandwidth, following
from .crypto import BlobCorrupt
from .errors import RegistryError
from .reference import Digest, validate_name
from .registry import Registry
from .throttle import READ, Throttle, Throttled

log = structlog.get_logger("georeg.access")

REQUEST = struct.Struct("!IH")
REPLY = struct.Struct("!Ic")
WRITING, DONE, DECLINED, CUT = b"W", b"D", b"N", b"X"
MAX_REQUEST = 128 * 1024           # a head is at most 64 KiB (the proxy refuses larger)
_BLOB_PATH = re.compile(r"/v2/(.+)/blobs/([^/]+)")
_REASONS = {200: "OK", 206: "Partial Content"}
_FD_SIZE = array.array("i").itemsize
_REDIRECT = REDIRECT_HEADER.lower()


def address(host: str, port: int) -> bytes:
    """The hand-over socket of the node serving HTTP on ``host:port``."""
    return b"\0georeg/handoff/%s:%d" % (host.encode(), port)


class _Declined(Exception):
    """Nothing was written: the proxy relays the request instead."""


class _Channel:
    """The node's end of one proxy's hand-over socket. Replies leave in order;
    one that finds the socket full waits for it to drain (a proxy far behind)."""

    def __init__(self, sock: socket.socket, on_closed: Callable[[_Channel], None]) -> None:
        self.sock = sock
        self.open = True
        self._outbox: deque[tuple[bytes, asyncio.Future[bool]]] = deque()
        self._waiting_writable = False
        self._on_closed = on_closed

    def send(self, serial: int, code: bytes) -> asyncio.Future[bool]:
        """Queue a reply; the future says whether it reached the socket (False:
        the channel closed first). Awaiting one already sent does not yield."""
        sent = asyncio.get_running_loop().create_future()
        if not self.open:
            sent.set_result(False)
            return sent
        self._outbox.append((REPLY.pack(serial, code), sent))
        if len(self._outbox) == 1:
            self._flush()
        return sent

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._outbox:
            message, sent = self._outbox[0]
            try:
                self.sock.send(message)
            except (BlockingIOError, InterruptedError):
                if not self._waiting_writable:
                    self._waiting_writable = True
                    loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError as exc:          # the proxy is gone
                self.close(f"reply failed: {exc}")
                return
            self._outbox.popleft()
            sent.set_result(True)
        if self._waiting_writable:
            self._waiting_writable = False
            loop.remove_writer(self.sock.fileno())

    def close(self, why: str = "closed") -> None:
        if not self.open:
            return
        self.open = False
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        if self._waiting_writable:
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        for _, sent in self._outbox:
            sent.set_result(False)
        self._outbox.clear()
        self._on_closed(self)
        if why != "closed":
            log.warning("handoff_channel_dropped", reason=why)


class HandoffServer:
    """Accepts proxies' hand-over connections and serves what they hand over.

    Its life follows the node's HTTP server (``registry_node.app``): created
    with the app, listening once the node knows its port (``start``), refusing
    new hand-overs when the app shuts down (``stop_accepting``; the proxy
    relays them), and finishing those in flight before the storage closes
    (``close``)."""

    def __init__(self, registry: Registry,
                 admits: Callable[[str | None, str], str | None] | None = None,
                 throttle: Throttle | None = None, *,
                 bandwidth: Bandwidth | None = None) -> None:
        self.registry = registry
        # (Authorization header, repository) -> who may pull there (None: nobody
        # this header names); None: auth off.
        self.admits = admits
        self.throttle = throttle
        # The node's budgets, the ones its HTTP handlers spend; None: unshaped.
        self.bandwidth = bandwidth
        self.address = b""
        self._listener: socket.socket | None = None
        self._channels: set[_Channel] = set()
        self._tasks: set[asyncio.Task] = set()
        self._uid = os.getuid()
        self._accepting = True
        self._deadline: float | None = None

    def start(self, host: str, port: int) -> bool:
        """Listen for ``host:port``'s proxies; False (their downloads are then
        relayed) if the address is taken."""
        self.address = address(host, port)
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

    def stop_accepting(self, grace_s: float) -> None:
        """Answer new hand-overs "not served" (the proxy relays them, and finds
        the node going) and give those in flight until ``grace_s`` from now."""
        self._accepting = False
        self._deadline = time.monotonic() + grace_s
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    async def close(self) -> None:
        """Wait for hand-overs in flight until the grace is over, cut the rest
        (the proxy closes their client connections), close every channel."""
        if self._accepting:
            self.stop_accepting(0.0)
        if self._tasks:
            _, late = await asyncio.wait(self._tasks,
                                         timeout=max(0.0, self._deadline - time.monotonic()))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for channel in list(self._channels):
            channel.close()

    # -- the proxy's connections ---------------------------------------------------------

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:     # out of descriptors: the proxies relay meanwhile
                log.warning("handoff_accept_failed", error=str(exc))
                return
            if peer_uid(sock) not in (self._uid, 0):
                sock.close()
                continue
            sock.setblocking(False)
            channel = _Channel(sock, self._channels.discard)
            self._channels.add(channel)
            loop.add_reader(sock.fileno(), self._receive, channel)

    def _receive(self, channel: _Channel) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                data, ancillary, flags, _ = channel.sock.recvmsg(MAX_REQUEST,
                                                                 socket.CMSG_SPACE(_FD_SIZE))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancillary, flags = b"", [], 0
            received = [fd for level, kind, raw in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                        for fd in array.array("i", raw[:len(raw) - len(raw) % _FD_SIZE])]
            if not data or len(received) != 1 or len(data) < REQUEST.size \
                    or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in received:
                    os.close(fd)
                channel.close("closed" if not data else "malformed hand-over")
                return
            serial, extra_length = REQUEST.unpack_from(data)
            if not self._accepting:
                os.close(received[0])
                channel.send(serial, DECLINED)
                continue
            extra = data[REQUEST.size:REQUEST.size + extra_length]
            head = data[REQUEST.size + extra_length:]
            task = loop.create_task(self._serve(channel, serial, received[0], extra, head))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one download --------------------------------------------------------------------

    async def _serve(self, channel: _Channel, serial: int, fd: int, extra: bytes,
                     head: bytes) -> None:
        started = time.perf_counter()
        try:
            client = socket.socket(fileno=fd)
        except OSError:                 # not a socket
            os.close(fd)
            channel.send(serial, DECLINED)
            return
        code, status, path, rid = DECLINED, 499, "", ""
        try:
            if client.type != socket.SOCK_STREAM:
                return
            client.setblocking(False)
            path, headers = _parse(head)
            rid = request_id(headers.get("x-request-id"))
            download, refund = self._find(path, headers)
            with contextlib.closing(download.blob):
                async with contextlib.aclosing(
                        download.pieces(self.registry.run_blocking)) as pieces:
                    try:
                        first = await anext(pieces)
                    except CorruptBeforeSending:   # the HTTP chain repairs it, then answers
                        refund()
                        return
                    # Not a byte before the proxy can know it: if the channel is
                    # gone, the proxy relays the request elsewhere.
                    if not await channel.send(serial, WRITING):
                        refund()
                        return
                    code, status = CUT, download.status
                    head = _response_head(download, rid, extra)
                    budget = self.bandwidth.download if self.bandwidth else None
                    if budget is None:
                        await _send(client, head, first)
                        async for piece in pieces:
                            await _send(client, piece)
                    else:
                        await _send(client, head)
                        async with contextlib.aclosing(
                                budget.shaped(following(first, pieces))) as body:
                            async for piece in body:
                                await _send(client, piece)
            code = DONE
        except _Declined:
            pass
        except (OSError, BlobCorrupt, asyncio.CancelledError) as exc:
            # After ``W``: the client went away, a later piece failed its check
            # (``Download`` has handed it to the repair), or the node is stopping. The proxy closes the client's connection.
            log.info("handoff_cut", rid=rid, path=path, error=str(exc) or type(exc).__name__)
        except Exception:
            log.exception("handoff_fault", rid=rid, path=path)
        finally:
            remote = _peer(client)
            client.close()       # only this process's descriptor: the proxy keeps the connection
            channel.send(serial, code)
            if code != DECLINED:
                log.info("request", rid=rid, method="GET", path=path,
                         status=status if code == DONE else 499,
                         ms=round((time.perf_counter() - started) * 1000, 2), remote=remote,
                         handed_over=True)

    def _find(self, path: str, headers: dict[str, str]) -> tuple[Download, Callable[[], None]]:
        """The download ``path`` asks for, and what gives back the read token it
        took (a hand-over declined after this costs nothing: the HTTP chain
        takes its own); or ``_Declined`` for anything the HTTP handler would
        answer with an error."""
        match = _BLOB_PATH.fullmatch(path)
        if match is None:
            raise _Declined
        identity = None
        try:
            repo = validate_name(match[1])
            digest = Digest.parse(match[2])
            if self.admits is not None:
                identity = self.admits(headers.get("authorization"), repo)
                if identity is None:
                    raise _Declined
            blob = self.registry.open_blob(repo, digest)
        except (RegistryError, BlobCorrupt, OSError):
            # A rotten copy or a disk error: the HTTP chain repairs or answers it.
            raise _Declined from None
        refund: Callable[[], None] = _nothing
        try:
            download = Download(blob, digest, headers.get("range"),
                                rotten=self.registry.repair.found)
            if self.throttle is not None and self.throttle.active:
                # Not counted: the HTTP chain refuses it again, and counts it.
                self.throttle.admit(READ, identity, counted=False)
                refund = functools.partial(self.throttle.refund, READ, identity)
        except (RegistryError, Throttled):
            blob.close()
            raise _Declined from None
        return download, refund


def _nothing() -> None:
    pass


def _parse(head: bytes) -> tuple[str, dict[str, str]]:
    """The proxy's forwarded head (llhttp parsed it) → path and headers by
    lower-case name (first wins, as in aiohttp's ``headers.get``). A head this
    path would read differently from aiohttp (an escaped path, another method,
    HTTP/1.0) is declined."""
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.rpartition(" ")
    path, _, query = target.partition("?")
    if method != "GET" or version != "HTTP/1.1" or not path.startswith("/v2/") \
            or unquote(path) != path:
        raise _Declined
    # Blank values kept, as aiohttp's query keeps them: ``?expires=`` is a grant
    # (a bad one, for the HTTP chain to refuse), not the absence of one.
    if query and carries_grant(parse_qs(query, keep_blank_values=True)):
        raise _Declined         # a blob grant is the HTTP chain's to judge (api.auth)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(":")
        if not colon:
            raise _Declined
        headers.setdefault(name.strip().lower(), value.strip())
    if _REDIRECT in headers:
        raise _Declined         # to be answered with a redirect, by the HTTP chain (api.redirects)
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


def peer_uid(sock: socket.socket) -> int:
    """The user on the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _peer(client: socket.socket) -> str | None:
    try:
        peer = client.getpeername()
    except OSError:
        return None
    return peer[0] if isinstance(peer, tuple) else None
