from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeRef(_message.Message):
    __slots__ = ("region", "zone", "node_id")
    REGION_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    region: str
    zone: str
    node_id: str
    def __init__(self, region: _Optional[str] = ..., zone: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("seq", "kind", "repository", "digest", "tag", "media_type", "size", "references", "subject", "source_repository", "origin_region", "origin_zone", "origin_seq", "hlc", "acked_ns", "manifest_body", "blob_body", "config_kind", "config_name", "config_value", "wan_receiver", "request", "attributes", "recycled", "recycled_tags")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ZONE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    HLC_FIELD_NUMBER: _ClassVar[int]
    ACKED_NS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_BODY_FIELD_NUMBER: _ClassVar[int]
    BLOB_BODY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VALUE_FIELD_NUMBER: _ClassVar[int]
    WAN_RECEIVER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_TAGS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    repository: str
    digest: str
    tag: str
    media_type: str
    size: int
    references: _containers.RepeatedScalarFieldContainer[str]
    subject: str
    source_repository: str
    origin_region: str
    origin_zone: str
    origin_seq: int
    hlc: int
    acked_ns: int
    manifest_body: bytes
    blob_body: bytes
    config_kind: str
    config_name: str
    config_value: bytes
    wan_receiver: str
    request: ClientRequest
    attributes: ChangeableAttributes
    recycled: bool
    recycled_tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., repository: _Optional[str] = ..., digest: _Optional[str] = ..., tag: _Optional[str] = ..., media_type: _Optional[str] = ..., size: _Optional[int] = ..., references: _Optional[_Iterable[str]] = ..., subject: _Optional[str] = ..., source_repository: _Optional[str] = ..., origin_region: _Optional[str] = ..., origin_zone: _Optional[str] = ..., origin_seq: _Optional[int] = ..., hlc: _Optional[int] = ..., acked_ns: _Optional[int] = ..., manifest_body: _Optional[bytes] = ..., blob_body: _Optional[bytes] = ..., config_kind: _Optional[str] = ..., config_name: _Optional[str] = ..., config_value: _Optional[bytes] = ..., wan_receiver: _Optional[str] = ..., request: _Optional[_Union[ClientRequest, _Mapping]] = ..., attributes: _Optional[_Union[ChangeableAttributes, _Mapping]] = ..., recycled: _Optional[bool] = ..., recycled_tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ChangeableAttributes(_message.Message):
    __slots__ = ("delete_enabled", "write_enabled", "read_enabled", "list_enabled")
    DELETE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    WRITE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    READ_ENABLED_FIELD_NUMBER: _ClassVar[int]
    LIST_ENABLED_FIELD_NUMBER: _ClassVar[int]
    delete_enabled: bool
    write_enabled: bool
    read_enabled: bool
    list_enabled: bool
    def __init__(self, delete_enabled: _Optional[bool] = ..., write_enabled: _Optional[bool] = ..., read_enabled: _Optional[bool] = ..., list_enabled: _Optional[bool] = ...) -> None: ...

class ClientRequest(_message.Message):
    __slots__ = ("id", "host", "method", "useragent")
    ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    USERAGENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    host: str
    method: str
    useragent: str
    def __init__(self, id: _Optional[str] = ..., host: _Optional[str] = ..., method: _Optional[str] = ..., useragent: _Optional[str] = ...) -> None: ...

class SubscribeStart(_message.Message):
    __slots__ = ("subscriber", "expected_node_id", "cursor", "resyncs", "name", "lean", "attributes")
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEAN_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    subscriber: NodeRef
    expected_node_id: str
    cursor: int
    resyncs: bool
    name: str
    lean: bool
    attributes: bool
    def __init__(self, subscriber: _Optional[_Union[NodeRef, _Mapping]] = ..., expected_node_id: _Optional[str] = ..., cursor: _Optional[int] = ..., resyncs: _Optional[bool] = ..., name: _Optional[str] = ..., lean: _Optional[bool] = ..., attributes: _Optional[bool] = ...) -> None: ...

class SubscribeAck(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: int
    def __init__(self, applied: _Optional[int] = ...) -> None: ...

class SubscribeCursor(_message.Message):
    __slots__ = ("persisted",)
    PERSISTED_FIELD_NUMBER: _ClassVar[int]
    persisted: int
    def __init__(self, persisted: _Optional[int] = ...) -> None: ...

class SubscribeMode(_message.Message):
    __slots__ = ("lean", "cursor")
    LEAN_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    lean: bool
    cursor: int
    def __init__(self, lean: _Optional[bool] = ..., cursor: _Optional[int] = ...) -> None: ...

class SubscribeMessage(_message.Message):
    __slots__ = ("start", "ack", "cursor", "mode")
    START_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    start: SubscribeStart
    ack: SubscribeAck
    cursor: SubscribeCursor
    mode: SubscribeMode
    def __init__(self, start: _Optional[_Union[SubscribeStart, _Mapping]] = ..., ack: _Optional[_Union[SubscribeAck, _Mapping]] = ..., cursor: _Optional[_Union[SubscribeCursor, _Mapping]] = ..., mode: _Optional[_Union[SubscribeMode, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("sender", "events", "last_seq", "cursor_reset", "cursor_truncated", "log_floor", "relayed", "lean")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CURSOR_RESET_FIELD_NUMBER: _ClassVar[int]
    CURSOR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    LOG_FLOOR_FIELD_NUMBER: _ClassVar[int]
    RELAYED_FIELD_NUMBER: _ClassVar[int]
    LEAN_FIELD_NUMBER: _ClassVar[int]
    sender: NodeRef
    events: _containers.RepeatedCompositeFieldContainer[Event]
    last_seq: int
    cursor_reset: bool
    cursor_truncated: bool
    log_floor: int
    relayed: _containers.RepeatedCompositeFieldContainer[RelayedCursor]
    lean: bool
    def __init__(self, sender: _Optional[_Union[NodeRef, _Mapping]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., last_seq: _Optional[int] = ..., cursor_reset: _Optional[bool] = ..., cursor_truncated: _Optional[bool] = ..., log_floor: _Optional[int] = ..., relayed: _Optional[_Iterable[_Union[RelayedCursor, _Mapping]]] = ..., lean: _Optional[bool] = ...) -> None: ...

class RelayedCursor(_message.Message):
    __slots__ = ("peer", "node_id", "seq")
    PEER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    peer: str
    node_id: str
    seq: int
    def __init__(self, peer: _Optional[str] = ..., node_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class FetchBlobRequest(_message.Message):
    __slots__ = ("requester", "repository", "digest", "offset", "wait_ms")
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    requester: NodeRef
    repository: str
    digest: str
    offset: int
    wait_ms: int
    def __init__(self, requester: _Optional[_Union[NodeRef, _Mapping]] = ..., repository: _Optional[str] = ..., digest: _Optional[str] = ..., offset: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...

class FetchManifestRequest(_message.Message):
    __slots__ = ("requester", "repository", "digest")
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    requester: NodeRef
    repository: str
    digest: str
    def __init__(self, requester: _Optional[_Union[NodeRef, _Mapping]] = ..., repository: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ManifestReply(_message.Message):
    __slots__ = ("digest", "media_type", "body", "hlc", "origin_region", "origin_zone", "origin_acked_ns")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    HLC_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ZONE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ACKED_NS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    media_type: str
    body: bytes
    hlc: int
    origin_region: str
    origin_zone: str
    origin_acked_ns: int
    def __init__(self, digest: _Optional[str] = ..., media_type: _Optional[str] = ..., body: _Optional[bytes] = ..., hlc: _Optional[int] = ..., origin_region: _Optional[str] = ..., origin_zone: _Optional[str] = ..., origin_acked_ns: _Optional[int] = ...) -> None: ...

class SummaryRequest(_message.Message):
    __slots__ = ("requester", "fingerprint_scheme", "buckets_only", "buckets")
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_SCHEME_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_ONLY_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    requester: NodeRef
    fingerprint_scheme: int
    buckets_only: bool
    buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, requester: _Optional[_Union[NodeRef, _Mapping]] = ..., fingerprint_scheme: _Optional[int] = ..., buckets_only: _Optional[bool] = ..., buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class BucketSummary(_message.Message):
    __slots__ = ("bucket", "fingerprint")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    fingerprint: bytes
    def __init__(self, bucket: _Optional[int] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class RepositorySummary(_message.Message):
    __slots__ = ("repository", "fingerprint")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    repository: str
    fingerprint: bytes
    def __init__(self, repository: _Optional[str] = ..., fingerprint: _Optional[bytes] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("repositories", "last_seq", "configuration_fingerprint", "fingerprint_scheme", "buckets", "bucket_count")
    REPOSITORIES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_SCHEME_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNT_FIELD_NUMBER: _ClassVar[int]
    repositories: _containers.RepeatedCompositeFieldContainer[RepositorySummary]
    last_seq: int
    configuration_fingerprint: bytes
    fingerprint_scheme: int
    buckets: _containers.RepeatedCompositeFieldContainer[BucketSummary]
    bucket_count: int
    def __init__(self, repositories: _Optional[_Iterable[_Union[RepositorySummary, _Mapping]]] = ..., last_seq: _Optional[int] = ..., configuration_fingerprint: _Optional[bytes] = ..., fingerprint_scheme: _Optional[int] = ..., buckets: _Optional[_Iterable[_Union[BucketSummary, _Mapping]]] = ..., bucket_count: _Optional[int] = ...) -> None: ...

class ConfigurationRequest(_message.Message):
    __slots__ = ("requester",)
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    requester: NodeRef
    def __init__(self, requester: _Optional[_Union[NodeRef, _Mapping]] = ...) -> None: ...

class ConfigurationState(_message.Message):
    __slots__ = ("registers",)
    REGISTERS_FIELD_NUMBER: _ClassVar[int]
    registers: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, registers: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class RepositoryStateRequest(_message.Message):
    __slots__ = ("requester", "repository")
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    requester: NodeRef
    repository: str
    def __init__(self, requester: _Optional[_Union[NodeRef, _Mapping]] = ..., repository: _Optional[str] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("key", "digest", "deleted", "hlc", "origin_region", "origin_zone", "media_type", "size", "references", "origin_acked_ns", "recycled", "recycled_tags", "retention")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    HLC_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ZONE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ACKED_NS_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_TAGS_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    key: str
    digest: str
    deleted: bool
    hlc: int
    origin_region: str
    origin_zone: str
    media_type: str
    size: int
    references: _containers.RepeatedScalarFieldContainer[str]
    origin_acked_ns: int
    recycled: bool
    recycled_tags: _containers.RepeatedScalarFieldContainer[str]
    retention: bool
    def __init__(self, key: _Optional[str] = ..., digest: _Optional[str] = ..., deleted: _Optional[bool] = ..., hlc: _Optional[int] = ..., origin_region: _Optional[str] = ..., origin_zone: _Optional[str] = ..., media_type: _Optional[str] = ..., size: _Optional[int] = ..., references: _Optional[_Iterable[str]] = ..., origin_acked_ns: _Optional[int] = ..., recycled: _Optional[bool] = ..., recycled_tags: _Optional[_Iterable[str]] = ..., retention: _Optional[bool] = ...) -> None: ...

class RepositoryState(_message.Message):
    __slots__ = ("repository", "tags", "manifests", "blobs", "attributes")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    repository: str
    tags: _containers.RepeatedCompositeFieldContainer[Register]
    manifests: _containers.RepeatedCompositeFieldContainer[Register]
    blobs: _containers.RepeatedCompositeFieldContainer[Register]
    attributes: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, repository: _Optional[str] = ..., tags: _Optional[_Iterable[_Union[Register, _Mapping]]] = ..., manifests: _Optional[_Iterable[_Union[Register, _Mapping]]] = ..., blobs: _Optional[_Iterable[_Union[Register, _Mapping]]] = ..., attributes: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ImageStatusRequest(_message.Message):
    __slots__ = ("repository", "digest", "tag", "requester")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    repository: str
    digest: str
    tag: str
    requester: NodeRef
    def __init__(self, repository: _Optional[str] = ..., digest: _Optional[str] = ..., tag: _Optional[str] = ..., requester: _Optional[_Union[NodeRef, _Mapping]] = ...) -> None: ...

class ImageStatusReply(_message.Message):
    __slots__ = ("node", "present", "arrived_ns", "origin_acked_ns", "origin_region", "failure", "blobs_present", "blobs_total", "digest", "tag_hlc", "tag_origin_region", "tag_origin_zone", "tag_acked_ns", "media_type", "tag_arrived_ns")
    NODE_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_NS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ACKED_NS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    BLOBS_PRESENT_FIELD_NUMBER: _ClassVar[int]
    BLOBS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAG_HLC_FIELD_NUMBER: _ClassVar[int]
    TAG_ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    TAG_ORIGIN_ZONE_FIELD_NUMBER: _ClassVar[int]
    TAG_ACKED_NS_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TAG_ARRIVED_NS_FIELD_NUMBER: _ClassVar[int]
    node: NodeRef
    present: bool
    arrived_ns: int
    origin_acked_ns: int
    origin_region: str
    failure: str
    blobs_present: int
    blobs_total: int
    digest: str
    tag_hlc: int
    tag_origin_region: str
    tag_origin_zone: str
    tag_acked_ns: int
    media_type: str
    tag_arrived_ns: int
    def __init__(self, node: _Optional[_Union[NodeRef, _Mapping]] = ..., present: _Optional[bool] = ..., arrived_ns: _Optional[int] = ..., origin_acked_ns: _Optional[int] = ..., origin_region: _Optional[str] = ..., failure: _Optional[str] = ..., blobs_present: _Optional[int] = ..., blobs_total: _Optional[int] = ..., digest: _Optional[str] = ..., tag_hlc: _Optional[int] = ..., tag_origin_region: _Optional[str] = ..., tag_origin_zone: _Optional[str] = ..., tag_acked_ns: _Optional[int] = ..., media_type: _Optional[str] = ..., tag_arrived_ns: _Optional[int] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("repository", "digest")
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    repository: str
    digest: str
    def __init__(self, repository: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ImageStatusesRequest(_message.Message):
    __slots__ = ("requester", "images")
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    requester: NodeRef
    images: _containers.RepeatedCompositeFieldContainer[ImageRef]
    def __init__(self, requester: _Optional[_Union[NodeRef, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ...) -> None: ...

class ImageStatusesReply(_message.Message):
    __slots__ = ("node", "images")
    NODE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    node: NodeRef
    images: _containers.RepeatedCompositeFieldContainer[ImageStatusReply]
    def __init__(self, node: _Optional[_Union[NodeRef, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageStatusReply, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("node", "last_seq", "writable", "wall_ns")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    WALL_NS_FIELD_NUMBER: _ClassVar[int]
    node: NodeRef
    last_seq: int
    writable: bool
    wall_ns: int
    def __init__(self, node: _Optional[_Union[NodeRef, _Mapping]] = ..., last_seq: _Optional[int] = ..., writable: _Optional[bool] = ..., wall_ns: _Optional[int] = ...) -> None: ...
