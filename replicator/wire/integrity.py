"""End-to-end integrity of replication messages over plain gRPC: a CRC-32
sealed onto every message a node sends, checked before any is parsed.

Blobs and manifests are checked by digest wherever they land, but the rest
of the replication stream (events: repository, tag and digest names, HLC
stamps; anti-entropy registers; configuration) is not content-addressed,
and over plain gRPC (a cluster without ``tls``) nothing above TCP's 16-bit
checksum would notice a flipped byte in it: a corrupted event could parse
and be applied. A corrupting WAN link (``cluster.network.links``) makes
exactly that happen; so does a bad NIC or middlebox in real life. Over
mutual TLS (the default) the record layer authenticates every byte, so
nothing is sealed there: ``sealed_stub`` and ``add_servicer`` take
``sealed=False`` and are the generated stub and registration, unchanged.

The framing (proto/georeg/replication/v1/replication.proto says it too): a
sealed message is the 5-byte tag of field ``SEAL_FIELD`` (2^29-1, the
largest field number protobuf allows, reserved for this, used by no
message) with wire type fixed32, the CRC-32 of every byte after those 9,
then the message as it serialises. The seal comes *first*: a serialiser
writes known fields in field-number order and unknown ones last, so no
message from a node that does not seal starts with that tag; and a message
whose gRPC length prefix was damaged (cut short, or run on into the next)
fails the CRC. A parser that does not know the field skips it: a sealed
message is still plain protobuf to an older node.

Checks, on a sealed channel (``opener``):

* starts with the seal: parsed only if the CRC matches;
* starts one byte away from it (a flip in the seal's own tag): refused;
* otherwise a message from a node that does not seal (an older version):
  parsed as it is, unchecked. Mixed-version traffic in that direction is
  not verified.

A refused message is counted (``refused``, the node's
``georeg_replication_integrity_refused_total``). On the server (a request)
the deserializer raises, and gRPC fails the call with ``UNKNOWN``. On the
client (a reply) raising would not reach the caller — grpc.aio logs the
exception and hands over ``None`` — so the deserializer returns ``DAMAGED``,
and the caller (``replicator.peers``: ``intact``) fails the call as
indefinite, like a broken stream, and it is retried.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, Final

import grpc

from .v1 import replication_pb2 as pb
from .v1 import replication_pb2_grpc as pbg

SERVICE = pb.DESCRIPTOR.services_by_name["Replication"]
SEAL_FIELD = 2**29 - 1
_WIRE_FIXED32 = 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:                                 # bounded: n shrinks by 7 bits a turn
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


SEAL_TAG = _varint(SEAL_FIELD << 3 | _WIRE_FIXED32)     # fd ff ff ff 0f
SEAL_LEN = len(SEAL_TAG) + 4

Refused = Callable[[str], None]     # told the name of each message type refused


def _uncounted(_name: str) -> None:
    pass


class Damaged:
    """A reply whose seal did not match: what a client's deserializer hands
    over instead of a message (``DAMAGED``, the one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DAMAGED"


DAMAGED: Final = Damaged()


class IntegrityError(ValueError):
    """A replication request whose bytes were damaged on the way."""


def seal(message: Any) -> bytes:
    body = message.SerializeToString()
    return b"".join((SEAL_TAG, zlib.crc32(body).to_bytes(4, "little"), body))


def opener(cls: type, refused: Refused = _uncounted) -> Callable[[bytes], Any]:
    """The deserializer of ``cls`` on a sealed channel: the message, or
    ``DAMAGED`` (counted by ``refused``) if its bytes were damaged."""
    parse, name = cls.FromString, cls.__name__

    def open_(data: bytes) -> Any:
        if data[:len(SEAL_TAG)] == SEAL_TAG:
            body = memoryview(data)[SEAL_LEN:]
            if len(data) >= SEAL_LEN and zlib.crc32(body) == int.from_bytes(
                    data[len(SEAL_TAG):SEAL_LEN], "little"):
                return parse(body)
        elif not _one_byte_from_seal(data):
            return parse(data)                  # not sealed (a node that does not seal)
        refused(name)
        return DAMAGED

    return open_


def _one_byte_from_seal(data: bytes) -> bool:
    """A seal tag with one byte flipped (what a corrupting path does to it).
    No unsealed message starts so: its first field's number is small, and
    the four bytes after a one-byte tag would have to be ff ff ff 0f."""
    head = data[:len(SEAL_TAG)]
    return len(head) == len(SEAL_TAG) and sum(a != b for a, b in zip(head, SEAL_TAG, strict=True)) == 1


def _strict(open_: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A server's request deserializer: raises on damage (gRPC fails the call)."""

    def open_or_raise(data: bytes) -> Any:
        message = open_(data)
        if message is DAMAGED:
            raise IntegrityError("request damaged in transit (CRC-32 mismatch)")
        return message

    return open_or_raise


def _message(descriptor) -> type:
    return getattr(pb, descriptor.name)


_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
          (True, False): "stream_unary", (True, True): "stream_stream"}


class SealedStub:
    """The generated stub's methods, sending sealed messages and opening replies."""

    def __init__(self, channel: grpc.aio.Channel, refused: Refused) -> None:
        for method in SERVICE.methods:
            kind = _KINDS[method.client_streaming, method.server_streaming]
            setattr(self, method.name, getattr(channel, kind)(
                f"/{SERVICE.full_name}/{method.name}", request_serializer=seal,
                response_deserializer=opener(_message(method.output_type), refused),
                _registered_method=True))


def sealed_stub(channel: grpc.aio.Channel, *, sealed: bool = True,
                refused: Refused = _uncounted) -> Any:
    """A stub for ``channel``: sealed (``SealedStub``), or with ``sealed=False``
    (a TLS channel) the generated one."""
    return SealedStub(channel, refused) if sealed else pbg.ReplicationStub(channel)


def add_servicer(servicer: Any, server: grpc.aio.Server, *, sealed: bool = True,
                 refused: Refused = _uncounted) -> None:
    """Serve ``servicer`` on ``server``: sealed, or with ``sealed=False`` (a
    TLS server) as the generated code does."""
    if not sealed:
        pbg.add_ReplicationServicer_to_server(servicer, server)
        return
    handlers = {}
    for method in SERVICE.methods:
        kind = _KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, method.name),
            request_deserializer=_strict(opener(_message(method.input_type), refused)),
            response_serializer=seal)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
