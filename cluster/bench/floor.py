"""The physical floor of replication lag: the least time *any* protocol could
take to make one pushed image pullable at one destination over the modelled
WAN link, given the push timeline the benchmark observed. A measured lag below
it is a bug in the floor or in the clocks (``clocks`` measures the latter).

An image is pullable at a destination once it holds every piece: each blob
and the manifest (the tag travels with the manifest). A piece cannot reach the
destination before the origin holds it, nor faster than the link carries it.
Per piece, with every time on the benchmark's clock (``time.time_ns()``)::

    arrives ≥ held + ow + not_across ÷ B
    not_across = max(0, size − B · (held − first))

* ``held``: when the origin held the piece. What the benchmark can measure on
  its own clock is when the client *sent* the request that completes it (the
  blob's ``PUT ?digest=``, the manifest's ``PUT``): the node receives and
  commits it later, so this is an earlier bound, never a later one. (The
  node's own stamp of the manifest is later and tighter, but it is taken
  before the commit in another process: it is reported as ``node ack``, not
  used here.)
* ``first``: when the client sent the piece's first byte (the blob's
  ``PATCH``). A protocol might stream bytes onward as they arrive, before the
  commit, so at ``held`` up to ``B · (held − first)`` of them may already be
  across; only the rest must still cross.
* ``ow``: the link's least one-way delay (modelled latency − jitter); ``B`` its
  bandwidth (unlimited inside a region: zone links). Each piece is charged
  alone on the link, as if it had the link to itself: sharing only adds time.
  (``links`` shapes each connection's direction on its own, so a protocol that
  split *one* piece over several parallel connections could beat the bandwidth
  term; georeg sends a piece over one stream of one channel per peer.)
  The direct link is the shortest path: the modelled latencies obey the
  triangle inequality (``tests/test_bench_lag.py`` checks the default model),
  so no relay through a third region could be faster.

Then ``floor = max over pieces (arrives) − ack``, ``ack`` the client's receipt
of the manifest PUT's 201, from which lag is measured. The floor may be
negative: a zone peer of the origin holds the image before the client is
answered (zone quorum). Nothing here depends on georeg's protocol (how many
round trips a fetch takes, whether blobs travel inline with events): it is
physics of the model, so any target stated against it is one a protocol can
actually approach. Under an injected link fault the floor stays the healthy
model's, so the slowed pair stands out in its ratio. On loopback without the
WAN model it is ``held − ack`` of the latest piece, about −(the origin's
handling time).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..network.links import LinkModel

NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class BlobPush:
    size: int
    first_sent_ns: int    # the PATCH carrying its bytes left the client
    sent_ns: int          # the final PUT ?digest= left the client
    acked_ns: int         # its 201 arrived


@dataclass(frozen=True, slots=True)
class ImagePush:
    """What the client observed while pushing one image to its origin node."""

    origin: str           # node name
    repository: str
    tag: str
    digest: str
    blobs: tuple[BlobPush, ...]
    started_ns: int
    manifest_sent_ns: int
    acked_ns: int         # the manifest PUT's 201 arrived: the origin's acknowledgement
    manifest_size: int = 0

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs)


def least_one_way_ms(link: LinkModel) -> float:
    return max(0.0, link.latency_ms - link.jitter_ms)


def transfer_ms(size: float, link: LinkModel) -> float:
    """Time the link needs to put ``size`` bytes on the wire (0 if unlimited)."""
    if link.bandwidth_mbps <= 0:
        return 0.0
    return size * 8 / (link.bandwidth_mbps * 1e6) * 1000


def piece_arrival_ms(size: int, first_ns: int, held_ns: int, link: LinkModel,
                     zero_ns: int) -> float:
    """The earliest a piece of ``size`` bytes, whose first byte left the client
    at ``first_ns`` and which the origin held no earlier than ``held_ns``, can be
    whole at the far end of ``link``: in ms after ``zero_ns``."""
    head_start_ms = max(0, held_ns - first_ns) / NS_PER_MS
    remaining_ms = max(0.0, transfer_ms(size, link) - head_start_ms)
    return (held_ns - zero_ns) / NS_PER_MS + least_one_way_ms(link) + remaining_ms


def image_floor_ms(push: ImagePush, link: LinkModel) -> float:
    """The floor (see the module docstring) for ``push`` over ``link``, in ms
    after the client's receipt of the manifest's 201."""
    pieces = [(b.size, b.first_sent_ns, b.sent_ns) for b in push.blobs]
    pieces.append((push.manifest_size, push.manifest_sent_ns, push.manifest_sent_ns))
    return max(piece_arrival_ms(size, first, held, link, push.acked_ns)
               for size, first, held in pieces)


def layer_floor_ms(size: int, link: LinkModel) -> float:
    """The least time a blob of ``size`` bytes takes to cross ``link`` once the
    origin holds all of it: one way + size ÷ B. The bandwidth floor of large-
    layer mode, measured from the blob's ``held``: a protocol that sends a
    blob on only once the origin holds it (georeg's) can do no better, and
    for a large layer the bandwidth term is what any protocol pays."""
    return least_one_way_ms(link) + transfer_ms(size, link)


FORMULA = ("floor = max over the image's pieces (blobs, manifest) of\n"
           "  (held + ow + max(0, size − B·(held − first)) ÷ B) − ack;\n"
           "  held: the client sent the request completing the piece, first: its first byte,\n"
           "  ow: the link's one-way latency − jitter, B: its bandwidth,\n"
           "  ack: the client's receipt of the manifest's 201 (the least any protocol could do)")
