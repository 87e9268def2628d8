"""End-to-end integrity of replication messages: a CRC-32 sealed onto every
message a node sends, checked before any is parsed.

Blobs and manifests are checked by digest wherever they land, but the rest
of the replication stream (events: repository, tag and digest names, HLC
stamps; anti-entropy registers; configuration) is not content-addressed,
and over plain gRPC (a cluster without ``tls``) nothing above TCP's 16-bit
checksum would notice a flipped byte in it: a corrupted event could parse
and be applied. A corrupting WAN link (``cluster.network.links``) makes
exactly that happen; so does a bad NIC or middlebox in real life.

The seal is a protobuf field appended to the serialised message: field
``SEAL_FIELD`` (the largest field number protobuf allows, used by no
message), wire type fixed32, holding the CRC-32 of every byte before it. A
message with a seal is refused (``IntegrityError``, which gRPC reports as
``INTERNAL``: indefinite, retried like a broken stream) unless the CRC
matches; a message without one (a client built on the plain generated stub,
as some tests are) is parsed as it is. A parser that does not know the field
keeps it as an unknown field, so a sealed message is still plain protobuf.
Damage to the seal itself either fails the check or leaves the message
without a recognisable seal — and its content undamaged.

``sealed_stub(channel)`` and ``add_sealed_servicer(servicer, server)`` stand
in for the generated ``ReplicationStub`` and
``add_ReplicationServicer_to_server``, method for method (they are built from
the service's descriptor). ``REFUSED`` counts the messages refused in this
process (one node): ``georeg_replication_integrity_refused_total``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import grpc

from .v1 import replication_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Replication"]
SEAL_FIELD = 2**29 - 1
_WIRE_FIXED32 = 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


SEAL_TAG = _varint(SEAL_FIELD << 3 | _WIRE_FIXED32)
_SEAL_LEN = len(SEAL_TAG) + 4
REFUSED = [0]       # a list: one mutable cell shared by every deserializer of the process


class IntegrityError(ValueError):
    """A replication message whose bytes were damaged on the way."""


def seal(message: Any) -> bytes:
    body = message.SerializeToString()
    return body + SEAL_TAG + zlib.crc32(body).to_bytes(4, "little")


def opener(cls: type) -> Callable[[bytes], Any]:
    """The deserializer of ``cls``: checks the seal if there is one."""
    parse = cls.FromString

    def open_(data: bytes) -> Any:
        if len(data) >= _SEAL_LEN and data[-_SEAL_LEN:-4] == SEAL_TAG:
            body = memoryview(data)[:-_SEAL_LEN]
            if zlib.crc32(body) != int.from_bytes(data[-4:], "little"):
                REFUSED[0] += 1
                raise IntegrityError(f"{cls.__name__} damaged in transit (CRC-32 mismatch)")
            return parse(body)
        return parse(data)

    return open_


def _message(descriptor) -> type:
    return getattr(pb, descriptor.name)


_KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
          (True, False): "stream_unary", (True, True): "stream_stream"}


class SealedStub:
    """The generated stub's methods, sending sealed messages and checking replies."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        for method in SERVICE.methods:
            kind = _KINDS[method.client_streaming, method.server_streaming]
            setattr(self, method.name, getattr(channel, kind)(
                f"/{SERVICE.full_name}/{method.name}", request_serializer=seal,
                response_deserializer=opener(_message(method.output_type)),
                _registered_method=True))


def sealed_stub(channel: grpc.aio.Channel) -> Any:
    return SealedStub(channel)


def add_sealed_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        kind = _KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, method.name),
            request_deserializer=opener(_message(method.input_type)),
            response_serializer=seal)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
