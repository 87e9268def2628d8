"""Moving a known number of bytes from one socket to another inside the kernel:
splice(2) from the source socket into a pipe, and from the pipe into the
destination socket, driven by the event loop.

The routing proxy relays every blob a client pushes or pulls. Relayed through
user space, each MiB is copied out of one socket, wrapped in a Python bytes
object and copied into the other socket, a dozen times per MiB through Python
callbacks. A bare relay loop on this project's 2-core machine spends 0.6 ms of
CPU per MiB copying and 0.27 ms splicing; the proxy's Python copy path spent
0.9-1.1 ms. On two cores the proxy's CPU is taken straight from the client and
the node, so this is most of what the proxy costs a transfer.

A ``Splice`` owns duplicates of the two sockets' descriptors while it runs
(an event loop refuses to watch a descriptor its transport owns), so the
transports must not read the source or write the destination meanwhile: the
caller pauses reading on the source and starts only when the destination's
write buffer is empty. The pipe is drained before more is read, so an
``EAGAIN`` from reading always means the source has nothing yet, never that
the pipe is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Callable

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")

PIPE_SIZE = 1 << 20         # /proc/sys/fs/pipe-max-size by default; fewer, larger splices
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_ROUNDS_PER_TURN = 16       # pipe fills per event-loop turn, so one transfer cannot starve others
_IDLE, _READING, _WRITING = 0, 1, 2


class SpliceBroken(Exception):
    """The transfer stopped before its last byte: ``side`` is ``"source"`` or
    ``"destination"``, the socket that failed."""

    def __init__(self, side: str, reason: str) -> None:
        super().__init__(f"{side} {reason}")
        self.side = side
        self.reason = reason


class PipePool:
    """Pipes for splices, reused while empty (creating and sizing one costs three
    system calls), within a budget of pipe capacity.

    The kernel charges a pipe's whole capacity to its user, and an unprivileged
    user past ``/proc/sys/fs/pipe-user-pages-soft`` (64 MiB by default) gets
    one-page pipes from then on, in every process it runs. So this process
    holds at most ``budget`` bytes of pipes, idle ones included; past it
    ``take`` refuses and the caller copies instead. One pool serves a whole
    process (``SHARED``).
    """

    def __init__(self, budget: int = 16 * PIPE_SIZE, max_idle: int = 8) -> None:
        self.budget = budget
        self.max_idle = max_idle
        self.charged = 0            # capacity of every pipe open, in use or idle
        self._idle: list[tuple[int, int, int]] = []

    def take(self) -> tuple[int, int, int]:
        """``(read_fd, write_fd, capacity)``, empty; ``OSError`` when the budget
        is spent or no pipe can be had."""
        if self._idle:
            return self._idle.pop()
        if self.charged + PIPE_SIZE > self.budget:
            raise OSError(errno.ENOBUFS, "pipe budget spent")
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):    # over the user's limit: keep the size given
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        capacity = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
        self.charged += capacity
        return read_fd, write_fd, capacity

    def put(self, pipe: tuple[int, int, int], empty: bool) -> None:
        """Back after use; kept only if empty and full-sized, and while there is room."""
        if empty and pipe[2] >= PIPE_SIZE and len(self._idle) < self.max_idle:
            self._idle.append(pipe)
        else:
            self._close(pipe)

    def close_idle(self) -> None:
        for pipe in self._idle:
            self._close(pipe)
        self._idle.clear()

    def _close(self, pipe: tuple[int, int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])
        self.charged -= pipe[2]


SHARED = PipePool()


class Splice:
    """Moves exactly ``length`` bytes from socket ``source`` to socket
    ``destination`` (file descriptors, non-blocking), then calls
    ``done(None)``; on a failure of either socket, ``done(SpliceBroken)``.
    ``cancel()`` stops it without a call."""

    __slots__ = ("_loop", "_pipes", "_pipe", "_source", "_destination", "_left", "_in_pipe",
                 "_done", "_waiting", "_scheduled", "length")

    def __init__(self, pipes: PipePool, source: int, destination: int, length: int,
                 done: Callable[[SpliceBroken | None], None]) -> None:
        """Raises ``OSError`` if the descriptors it needs cannot be had (the
        caller then copies instead)."""
        self._loop = asyncio.get_running_loop()
        self._pipes = pipes
        taken: list[int] = []
        try:
            self._pipe: tuple[int, int, int] | None = pipes.take()
            taken += self._pipe[:2]
            self._source = os.dup(source)
            taken.append(self._source)
            self._destination = os.dup(destination)
        except OSError:
            for fd in taken:
                os.close(fd)
            raise
        self.length = length
        self._left = length           # not yet taken from the source
        self._in_pipe = 0
        self._done = done
        self._waiting = _IDLE
        self._scheduled: asyncio.Handle | None = None

    @classmethod
    def open(cls, pipes: PipePool, source: int, destination: int, length: int,
             done: Callable[[SpliceBroken | None], None]) -> Splice | None:
        """A new splice, or None when its descriptors cannot be had (out of
        descriptors, or the pipe budget spent): the caller then copies."""
        try:
            return cls(pipes, source, destination, length, done)
        except OSError:
            return None

    @property
    def taken(self) -> int:
        """Bytes read from the source so far (some may still be in the pipe)."""
        return self.length - self._left

    def start(self) -> None:
        self._pump()

    def cancel(self) -> int:
        """Stop; returns ``taken``. What is in the pipe is dropped."""
        self._close()
        return self.taken

    def _pump(self) -> None:
        self._scheduled = None
        read_fd, write_fd, capacity = self._pipe
        try:
            for _ in range(_ROUNDS_PER_TURN):
                if not self._in_pipe:
                    if not self._left:
                        self._close()
                        self._done(None)
                        return
                    try:
                        moved = os.splice(self._source, write_fd, min(self._left, capacity),
                                          flags=_FLAGS)
                    except BlockingIOError:
                        self._wait(_READING)
                        return
                    except OSError as exc:
                        raise SpliceBroken("source", exc.strerror or str(exc)) from exc
                    if not moved:
                        raise SpliceBroken("source", "closed the connection before the end")
                    self._left -= moved
                    self._in_pipe = moved
                try:
                    moved = os.splice(read_fd, self._destination, self._in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    self._wait(_WRITING)
                    return
                except OSError as exc:
                    raise SpliceBroken("destination", exc.strerror or str(exc)) from exc
                self._in_pipe -= moved
        except SpliceBroken as broken:
            self._close()
            self._done(broken)
            return
        except OSError as exc:         # the loop could not watch a descriptor
            self._close()
            self._done(SpliceBroken("source", f"cannot wait for it: {exc.strerror or exc}"))
            return
        self._wait(_IDLE)
        self._scheduled = self._loop.call_soon(self._pump)

    def _wait(self, what: int) -> None:
        if self._waiting == what:
            return
        if self._waiting == _READING:
            self._loop.remove_reader(self._source)
        elif self._waiting == _WRITING:
            self._loop.remove_writer(self._destination)
        if what == _READING:
            self._loop.add_reader(self._source, self._pump)
        elif what == _WRITING:
            self._loop.add_writer(self._destination, self._pump)
        self._waiting = what

    def _close(self) -> None:
        if self._source < 0:
            return
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        self._wait(_IDLE)
        if self._pipe is not None:
            self._pipes.put(self._pipe, empty=not self._in_pipe)
            self._pipe = None
        os.close(self._source)
        os.close(self._destination)
        self._source = self._destination = -1
