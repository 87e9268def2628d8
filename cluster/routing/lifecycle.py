"""The life of one exchange in the routing proxy (a request and its response,
between one client connection and the nodes), as a state machine: its phases
and every move between them. No I/O; ``cluster.routing.proxy`` moves each of
its exchanges through this table, in one method, and refuses any move the
table does not hold (``IllegalTransition``): a bug in the proxy, never a
client's or a node's fault.

Moves, and what makes each::

    QUEUED       → CONNECTING    routed: a new connection to the first candidate
                 → SENT          routed: a pooled connection to it
                 → HANDED_OVER   a blob GET: the client's socket passed to the node
                 → ANSWERED      the proxy's own answer: 307, 404, 503 (a blob
                                 redirect on a cluster with auth is the node's
                                 to answer: relayed as any response, via SENT)
    CONNECTING   → SENT          connected
                 → CONNECTING    refused or timed out: the next candidate (SENT if pooled)
                 → ANSWERED      no candidate left: 503
    HANDED_OVER  → NODE_WRITING  the node's W
                 → ANSWERED      D (or N with no candidate left: 503)
                 → CONNECTING    N: nothing was written; relayed as any request
                   / SENT
                 → CUT           X, or the hand-over channel lost
    NODE_WRITING → ANSWERED      D
                 → CUT           X, the channel lost (or an N after W: a node
                                 breaking the protocol is not relayed again)
    SENT         → INTERIM       a 1xx head
                 → RELAYING      the final head, written to the client
                 → CONNECTING    connection lost before any response byte with
                   / SENT        none of the body sent: again (a pooled one: the
                                 same node, fresh; else the next candidate); or,
                                 for a GET or HEAD, its node found down by health
                                 checks: the next candidate
                 → ANSWERED      502 (lost with part of the body sent, garbage), 503
    INTERIM      → SENT          the 1xx ends
                 → ANSWERED      it was a 101: 502
    RELAYING     → ANSWERED      the last byte (or the node's close, for a body so framed)
                 → CUT           the node lost, a splice broken, garbage mid-response
    not over     → ABORTED       the client went away, or the proxy stops

Phases
    QUEUED        parsed; waits for the exchanges before it on its connection
    CONNECTING    a connection to a candidate node is being made
    HANDED_OVER   the client's socket is with a node (``cluster.routing.handoff``),
                  which has not said it writes yet
    NODE_WRITING  the node said ``W``: it writes the response on the client's socket
    SENT          the request head went to a node; no response head yet
    INTERIM       a ``1xx`` response from the node is being read (and dropped)
    RELAYING      the final response head is with the client; its body follows
    ANSWERED      the whole response is with the client (relayed, written by the
                  node, or the proxy's own); the connection may carry on
    CUT           the response was cut short: the client's connection is aborted
    ABORTED       the client went away, or the proxy stops

What the table guarantees (``tests/test_proxy_lifecycle.py`` checks each)
    * A request goes to a node again (``CONNECTING``, ``SENT``) only from a phase
      in which the client has no byte of a response: never from ``RELAYING``
      or ``NODE_WRITING`` (``INTERIM`` returns to ``SENT`` on its connection,
      the ``1xx`` having reached nobody). The one exception is ``HANDED_OVER``,
      left for a node again only on the node's ``N`` (it wrote nothing).
      Whether the request body has started to leave is a fact the proxy checks
      as well (``body_sent``): with part of it gone the answer is a ``502``.
    * ``CUT`` is reached only from phases in which response bytes may be with
      the client; before that, a failure is a retry or the proxy's own answer.
    * The three end phases have no way out, every other phase can be
      aborted, and every phase can reach an end.

Each phase also says whether response bytes may be on the client's wire
(``response_begun``: the proxy then writes nothing else for it) and whether
the exchange is over.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where an exchange is in its life (see the module docstring)."""

    #               label           response_begun  over
    QUEUED = ("queued", False, False)
    CONNECTING = ("connecting", False, False)
    HANDED_OVER = ("handed over", True, False)      # the node may write at any moment
    NODE_WRITING = ("node writing", True, False)
    SENT = ("sent", False, False)
    INTERIM = ("interim response", False, False)
    RELAYING = ("relaying", True, False)
    ANSWERED = ("answered", True, True)
    CUT = ("cut", True, True)
    ABORTED = ("aborted", True, True)               # nothing more is written for it either

    # Identity hashing: the same equality as an enum's, computed in C, so the
    # transition check costs two table look-ups and no Python-level call.
    __hash__ = object.__hash__

    def __init__(self, label: str, response_begun: bool, over: bool) -> None:
        self.label = label
        self.response_begun = response_begun
        self.over = over

    def __repr__(self) -> str:
        return f"Phase.{self.name}"


_P = Phase
# Every legal move, and only those: phase -> the phases it may go to next.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    _P.QUEUED: frozenset({_P.CONNECTING, _P.SENT, _P.HANDED_OVER, _P.ANSWERED, _P.ABORTED}),
    # a refused connect moves on to the next candidate: a new connect, a pooled
    # connection, or the proxy's 503 when none is left
    _P.CONNECTING: frozenset({_P.CONNECTING, _P.SENT, _P.ANSWERED, _P.ABORTED}),
    # W; D; X or the channel lost; N: routed again as a fresh request
    _P.HANDED_OVER: frozenset({_P.NODE_WRITING, _P.ANSWERED, _P.CUT, _P.CONNECTING, _P.SENT,
                               _P.ABORTED}),
    _P.NODE_WRITING: frozenset({_P.ANSWERED, _P.CUT, _P.ABORTED}),
    # a 1xx; the final head; the connection lost before any response byte
    # with none of the body sent (again: CONNECTING, SENT); a 502 or a 503
    _P.SENT: frozenset({_P.INTERIM, _P.RELAYING, _P.CONNECTING, _P.SENT, _P.ANSWERED,
                        _P.ABORTED}),
    # the 1xx ends (SENT), or was a 101 (the proxy's 502)
    _P.INTERIM: frozenset({_P.SENT, _P.ANSWERED, _P.ABORTED}),
    _P.RELAYING: frozenset({_P.ANSWERED, _P.CUT, _P.ABORTED}),
    _P.ANSWERED: frozenset(),
    _P.CUT: frozenset(),
    _P.ABORTED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """The proxy tried a move ``TRANSITIONS`` does not hold."""

    def __init__(self, current: Phase, wanted: Phase) -> None:
        super().__init__(f"an exchange cannot go from {current.label} to {wanted.label}")
        self.current = current
        self.wanted = wanted
