"""One direction of an HTTP/1.1 connection cut into messages, for the routing
proxy (``cluster.routing.proxy``): requests from a client, responses from a node.

The stream owns framing, and only framing. It feeds each head to an httptools
(llhttp) parser owned by the caller, whose callbacks report back
(``begun``, ``headers_done``, ``ended``); it decides which bytes are a head,
which are a body and where the next message starts; and it lets a counted
body leave it (``take``) to be spliced in the kernel and hands back to it
after. What a message means, and where it goes, is the proxy's business.

Invariants
    * A ``Content-Length`` body cut cleanly after its head is counted, not
      parsed: the bytes given to ``on_body`` are the bytes read, as views
      where they can be, and ``on_end`` follows its last byte.
    * A head larger than ``head_limit`` raises ``HeadTooLarge`` before more of
      it is kept; garbage is refused by the parser as soon as it arrives.
    * While ``take`` holds the rest of a body the stream is not fed (it raises
      if it is); ``handed_back`` resumes it exactly where the splice stopped.
    * Nothing is kept of a read that is a view of a shared buffer once
      ``feed`` returns, except as a copy.
"""

from __future__ import annotations

from collections.abc import Callable


class HeadTooLarge(Exception):
    """A message head grew past the stream's ``head_limit``."""


_HEAD, _RAW, _PARSED, _SPLICING_BODY = 0, 1, 2, 3


class MessageStream:
    """One direction of a connection as a sequence of HTTP messages.

    Each head goes to the httptools parser as it arrives (so garbage, such as
    a TLS hello, is refused at once), cut exactly where it ends. The owner's
    parser callbacks report to the stream: ``begun()`` from
    ``on_message_begin``, ``headers_done(length)`` from ``on_headers_complete``
    and ``ended()`` from ``on_message_complete``. If the head was cut cleanly
    and ``length`` is a positive ``Content-Length``, the next ``length`` bytes
    go to ``on_body`` as they arrived — no parser, no copy — followed by
    ``on_end``, and a fresh parser takes the next head. Otherwise (chunked,
    delimited by the connection's end, or a pipelined message the parser had
    already begun) the parser gets everything until a message ends at the end
    of a read: always correct, only not as cheap.

    When a counted body still has ``splice_min`` bytes or more to come after a
    read, ``take(left)`` may take them: it returns True if it will move them
    past the stream (in the kernel) and call ``handed_back(taken)`` with how
    many of them it read, once done or stopped; the stream then carries on
    from there. The stream is not fed meanwhile.
    """

    __slots__ = ("_new_parser", "parser", "_on_body", "_on_end", "_head_limit", "_mode",
                 "_left", "_tail", "_head_size", "_ended", "_cutting", "_take", "_splice_min")

    def __init__(self, new_parser: Callable[[], object], on_body: Callable[[bytes], None],
                 on_end: Callable[[], None], head_limit: int,
                 take: Callable[[int], bool] | None = None, splice_min: int = 0) -> None:
        self._new_parser = new_parser
        self.parser = new_parser()
        self._on_body = on_body
        self._on_end = on_end
        self._head_limit = head_limit
        self._take = take if splice_min > 0 else None
        self._splice_min = splice_min
        self._mode = _HEAD
        self._left = 0
        self._tail = b""          # the last bytes of the head so far, to find its end across reads
        self._head_size = 0
        self._ended = True
        self._cutting = False

    def begun(self) -> None:
        self._ended = False

    def ended(self) -> None:
        self._ended = True

    def headers_done(self, raw_length: int | None) -> None:
        if self._cutting and raw_length:
            self._mode = _RAW
            self._left = raw_length
        else:
            self._mode = _PARSED      # the parser carries the body (if any) to the end

    def handed_back(self, taken: int) -> None:
        """``take``'s splice is over, having read ``taken`` bytes of the body."""
        self._left -= taken
        if self._left:
            self._mode = _RAW
            return
        self._mode = _HEAD
        self.parser = self._new_parser()
        self._on_end()

    @property
    def small_reads(self) -> bool:
        """Whether the next read should be small: a head is expected, or a body
        that may yet be spliced (each read ends with another try), so that
        little of it passes through Python first."""
        mode = self._mode
        return mode == _HEAD or (mode == _RAW and self._take is not None
                                 and self._left >= self._splice_min)

    def feed(self, data: bytes | memoryview) -> None:
        if self._mode == _SPLICING_BODY:
            raise RuntimeError("fed while its body is being spliced")
        if isinstance(data, memoryview) and not data.readonly:
            data = bytes(data)            # a view of a shared read buffer: not to be kept
        while data:
            mode = self._mode
            if mode == _RAW:
                left = self._left
                if len(data) < left:
                    self._left = left - len(data)
                    self._on_body(data)
                    break
                piece, data = data[:left], data[left:]
                self._left = 0
                self._mode = _HEAD
                self.parser = self._new_parser()
                self._on_body(piece)
                self._on_end()
                continue
            if mode == _PARSED:
                self.parser.feed_data(data)
                if self._ended:
                    self._mode = _HEAD
                return
            if isinstance(data, memoryview):
                data = bytes(data)        # a second head in one read: rare, and small
            tail = self._tail
            end = -1
            if tail:
                found = (tail + data[:3]).find(b"\r\n\r\n")
                if found >= 0:
                    end = found + 4 - len(tail)
            if end < 0:
                found = data.find(b"\r\n\r\n")
                if found >= 0:
                    end = found + 4
            if end < 0:
                self._head_size += len(data)
                if self._head_size > self._head_limit:
                    raise HeadTooLarge
                self._tail = (tail + data)[-3:]
                self.parser.feed_data(data)
                if self._mode == _PARSED and self._ended:
                    self._mode = _HEAD
                return
            # The rest is (the start of) a body: a view, not a copy.
            head, data = data[:end], memoryview(data)[end:]
            self._tail = b""
            self._head_size = 0
            self._cutting = True
            try:
                self.parser.feed_data(head)
            finally:
                self._cutting = False
            if self._mode == _PARSED and self._ended:
                self._mode = _HEAD        # a message without a body
        if self._mode == _RAW and self._take is not None and self._left >= self._splice_min:
            self._mode = _SPLICING_BODY   # set first: the splice may end before take returns
            if not self._take(self._left):
                self._mode = _RAW

