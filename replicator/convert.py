"""Between the node's records and the wire messages of ``georeg.replication.v1``."""

from __future__ import annotations

from registry_node.records import (
    ChangeableAttributes,
    ClientRequest,
    Event,
    EventKind,
    NodeIdentity,
)
from registry_node.replica import RegisterState

from .wire.v1 import replication_pb2 as pb


def node_ref(identity: NodeIdentity) -> pb.NodeRef:
    return pb.NodeRef(region=identity.region, zone=identity.zone, node_id=identity.node_id)


def event_to_wire(event: Event) -> pb.Event:
    return pb.Event(
        seq=event.seq, kind=event.kind.value, repository=event.repository, digest=event.digest,
        tag=event.tag, media_type=event.media_type, size=event.size,
        references=list(event.references), subject=event.subject,
        source_repository=event.source_repository, origin_region=event.origin_region,
        origin_zone=event.origin_zone, origin_seq=event.origin_seq, hlc=event.hlc,
        acked_ns=event.acked_ns, config_kind=event.config_kind, config_name=event.config_name,
        config_value=event.config_value, request=_request_to_wire(event.request),
        attributes=_attributes_to_wire(event.attributes), recycled=event.recycled,
        recycled_tags=list(event.recycled_tags))


def event_from_wire(message: pb.Event) -> Event:
    return Event(
        kind=EventKind(message.kind), repository=message.repository, digest=message.digest,
        tag=message.tag, media_type=message.media_type, size=message.size,
        references=tuple(message.references), subject=message.subject,
        source_repository=message.source_repository, origin_region=message.origin_region,
        origin_zone=message.origin_zone, origin_seq=message.origin_seq, hlc=message.hlc,
        acked_ns=message.acked_ns, seq=message.seq, config_kind=message.config_kind,
        config_name=message.config_name, config_value=message.config_value,
        request=_request_from_wire(message), attributes=_attributes_from_wire(message),
        recycled=message.recycled, recycled_tags=tuple(message.recycled_tags))


def _request_to_wire(request: ClientRequest | None) -> pb.ClientRequest | None:
    if request is None:
        return None
    return pb.ClientRequest(id=request.id, host=request.host, method=request.method,
                            useragent=request.useragent)


def _request_from_wire(message: pb.Event) -> ClientRequest | None:
    if not message.HasField("request"):
        return None
    r = message.request
    return ClientRequest(id=r.id, host=r.host, method=r.method, useragent=r.useragent)


def _attributes_to_wire(attributes: ChangeableAttributes | None) -> pb.ChangeableAttributes | None:
    if attributes is None:
        return None
    return pb.ChangeableAttributes(
        delete_enabled=attributes.delete_enabled, write_enabled=attributes.write_enabled,
        read_enabled=attributes.read_enabled, list_enabled=attributes.list_enabled)


def _attributes_from_wire(message: pb.Event) -> ChangeableAttributes | None:
    if not message.HasField("attributes"):
        return None
    a = message.attributes
    return ChangeableAttributes(delete_enabled=a.delete_enabled, write_enabled=a.write_enabled,
                                read_enabled=a.read_enabled, list_enabled=a.list_enabled)


def register_to_wire(reg: RegisterState) -> pb.Register:
    hlc, region, zone = reg.stamp
    return pb.Register(key=reg.key, digest=reg.digest, deleted=reg.deleted, hlc=hlc,
                       origin_region=region, origin_zone=zone, media_type=reg.media_type,
                       size=reg.size, references=list(reg.references),
                       origin_acked_ns=reg.origin_acked_ns, recycled=reg.recycled,
                       recycled_tags=list(reg.recycled_tags), retention=reg.retention)


def register_from_wire(message: pb.Register) -> RegisterState:
    return RegisterState(
        key=message.key, digest=message.digest, deleted=message.deleted,
        stamp=(message.hlc, message.origin_region, message.origin_zone),
        media_type=message.media_type, size=message.size, references=tuple(message.references),
        origin_acked_ns=message.origin_acked_ns, recycled=message.recycled,
        recycled_tags=tuple(message.recycled_tags), retention=message.retention)
