"""The routing proxy's side of blob-download hand-overs (the node's side, and
the wire, are in ``registry_node.handoff``).

For a ``GET`` of a blob, the proxy passes the client's socket to the node
routing chose, which writes the response on it itself: the bytes cross
loopback once, as when the client talks to the node directly, instead of
twice with the proxy copying in between. ``Handoffs`` keeps one channel per
node, opened on first use; a node that does not take hand-overs (another
server, a node from before them, a node being restarted) is asked again at
most once a ``RETRY_S``, and meanwhile its downloads are relayed.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import time
from typing import Protocol

import structlog

from registry_node.handoff import CUT, DECLINED, DONE, REPLY, REQUEST, WRITING, address, peer_uid

from .policy import NodeEndpoint

log = structlog.get_logger("georeg.routing")

RETRY_S = 1.0
_REPLIES_PER_WAKEUP = 64


class Waiter(Protocol):
    """What a hand-over reports to (the proxy's exchange)."""

    def handoff_writing(self) -> None: ...

    def handoff_done(self) -> None: ...

    def handoff_declined(self) -> None: ...

    def handoff_cut(self) -> None: ...


class Channel:
    """One node's hand-over socket: passes client sockets, routes the node's
    replies to the waiters by serial."""

    def __init__(self, node: NodeEndpoint, sock: socket.socket, on_closed) -> None:
        self.node = node
        self.sock = sock
        self.waiting: dict[int, Waiter] = {}
        self.writing: set[int] = set()
        self._serial = 0
        self._on_closed = on_closed
        self.closed = False
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def hand(self, client_fd: int, head: bytes, extra: bytes, waiter: Waiter) -> int | None:
        """Pass ``client_fd`` with the request ``head``; the serial, or None if
        the node cannot take it now (relay instead)."""
        self._serial = serial = (self._serial + 1) & 0xFFFFFFFF
        message = REQUEST.pack(serial, len(extra)) + extra + head
        try:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", [client_fd]))])
        except OSError:
            # Nothing was sent: relay this one. (The node behind on hand-overs,
            # out of descriptors, or gone, which the reader sees as an end.)
            return None
        self.waiting[serial] = waiter
        return serial

    def forget(self, serial: int) -> None:
        """The waiter is gone (its client closed, the proxy stops); the node's
        reply will be dropped."""
        self.waiting.pop(serial, None)
        self.writing.discard(serial)

    def _readable(self) -> None:
        for _ in range(_REPLIES_PER_WAKEUP):
            try:
                reply = self.sock.recv(REPLY.size)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                reply = b""
            except OSError as exc:
                self.close(f"read failed: {exc}")
                return
            if not reply:
                self.close("closed by the node", node_closed=True)
                return
            if len(reply) != REPLY.size:
                self.close("malformed reply")
                return
            serial, code = REPLY.unpack(reply)
            waiter = self.waiting.get(serial)
            if waiter is None:
                continue
            if code == WRITING:
                self.writing.add(serial)
                waiter.handoff_writing()
                continue
            del self.waiting[serial]
            self.writing.discard(serial)
            if code == DONE:
                waiter.handoff_done()
            elif code == DECLINED:
                waiter.handoff_declined()
            else:
                if code != CUT:
                    log.warning("handoff_bad_reply", node=self.node.name, code=code)
                waiter.handoff_cut()

    def close(self, why: str, node_closed: bool = False) -> None:
        """Close the channel and end what waits on it. Only the node's own end
        of the channel (``node_closed``: every reply it sent has been read)
        proves that a waiter without a ``W`` has nothing on the wire; those are
        relayed. Every other waiter is cut: the node may be writing its
        response, and a second one must never follow."""
        if self.closed:
            return
        self.closed = True
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self._on_closed(self)
        waiting, writing = self.waiting, self.writing
        self.waiting, self.writing = {}, set()
        if waiting:
            log.warning("handoff_channel_lost", node=self.node.name, reason=why,
                        in_flight=len(waiting))
        for serial, waiter in waiting.items():
            if node_closed and serial not in writing:
                waiter.handoff_declined()
            else:
                waiter.handoff_cut()


class Handoffs:
    """A proxy's channels, one per node address."""

    def __init__(self) -> None:
        self._channels: dict[tuple[str, int], Channel] = {}
        self._retry_at: dict[tuple[str, int], float] = {}
        self._uid = os.getuid()

    def channel(self, node: NodeEndpoint) -> Channel | None:
        key = (node.host, node.port)
        channel = self._channels.get(key)
        if channel is not None:
            return channel
        now = time.monotonic()
        if self._retry_at.get(key, 0.0) > now:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address(node.host, node.port))
            owner = peer_uid(sock)
        except OSError:
            sock.close()
            self._retry_at[key] = now + RETRY_S
            return None
        if owner not in (self._uid, 0):
            # Abstract names have no permissions: whoever took this one is not
            # our node, and must never see a client's connection.
            sock.close()
            self._retry_at[key] = now + RETRY_S
            log.warning("handoff_refused", node=node.name, uid=owner,
                        reason="the hand-over socket belongs to another user")
            return None
        self._retry_at.pop(key, None)
        channel = self._channels[key] = Channel(node, sock, self._closed)
        return channel

    def _closed(self, channel: Channel) -> None:
        key = (channel.node.host, channel.node.port)
        if self._channels.get(key) is channel:
            del self._channels[key]

    def close_all(self) -> None:
        for channel in list(self._channels.values()):
            channel.close("the endpoint stops")
