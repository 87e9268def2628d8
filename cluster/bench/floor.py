"""The physical floor of replication lag: the least time the protocol could
take to make one pushed image pullable at one destination, given the modelled
WAN link and the push timeline the benchmark observed.

What the protocol must do (``replicator.subscription``/``transfer``/``service``):

* each blob commit at the origin logs a BLOB_PUT event, pushed to the
  destination's subscription (one way); the destination asks for the bytes
  (FetchBlob: one way back), and the bytes come (one way, plus their size
  divided by the link's bandwidth);
* the manifest PUT logs MANIFEST_PUT and TAG_SET, the manifest's bytes inside
  the event (one way; no extra round trip).

So, with every time on the benchmark's clock (``time.time_ns()``, the same
clock the nodes stamp with), ``ack`` the client's receipt of the manifest
PUT's 201, ``ow`` the link's least one-way delay (modelled latency − jitter),
``B`` its bandwidth and, per blob i, ``sent_i`` the moment the client *sent*
the request that commits it (the final ``PUT ?digest=``; the commit, and so
its event, cannot come earlier)::

    floor = max(ow, max_i (sent_i + 3·ow + size_i ÷ B) − ack)

The manifest term counts from the acknowledgement: lag is measured from it,
and a push is not expected anywhere before it is acknowledged. (A node logs
the manifest's events just before it answers — in a zone-redundant region,
before the second zone confirms — so a destination may beat this term by
that head start; its ratio then goes below 1.) The blob terms count from
each blob's own commit, each blob alone (not their sum over one wire), which
keeps them a lower bound even when a destination fetches different blobs from
different zones of the origin region. Under an injected link fault the floor
stays the healthy model's, so the slowed pair stands out in its ratio. On
loopback without the WAN model the floor is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..network.links import LinkModel

NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class BlobPush:
    size: int
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

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs)


def least_one_way_ms(link: LinkModel) -> float:
    return max(0.0, link.latency_ms - link.jitter_ms)


def transfer_ms(size: int, link: LinkModel) -> float:
    """Time the link needs to put ``size`` bytes on the wire (0 if unlimited)."""
    if link.bandwidth_mbps <= 0:
        return 0.0
    return size * 8 / (link.bandwidth_mbps * 1e6) * 1000


def image_floor_ms(push: ImagePush, link: LinkModel) -> float:
    """The floor (see the module docstring) for ``push`` over ``link``, in ms
    after the origin's acknowledgement."""
    ow = least_one_way_ms(link)
    floor = ow
    for blob in push.blobs:
        floor = max(floor, (blob.sent_ns - push.acked_ns) / NS_PER_MS + 3 * ow
                    + transfer_ms(blob.size, link))
    return floor


FORMULA = ("floor = max(ow, max over blobs (put_sent + 3·ow + size ÷ bandwidth) − ack); "
           "ow = modelled one-way latency − jitter, ack = client's receipt of the manifest 201")
