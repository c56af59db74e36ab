from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResolveReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESOLVE_REASON_UNSPECIFIED: _ClassVar[ResolveReason]
    RESOLVE_REASON_MATCH: _ClassVar[ResolveReason]
    RESOLVE_REASON_NO_SEGMENT_MATCH: _ClassVar[ResolveReason]
    RESOLVE_REASON_NO_TREATMENT_MATCH: _ClassVar[ResolveReason]
    RESOLVE_REASON_FLAG_ARCHIVED: _ClassVar[ResolveReason]
    RESOLVE_REASON_TARGETING_KEY_ERROR: _ClassVar[ResolveReason]
    RESOLVE_REASON_ERROR: _ClassVar[ResolveReason]
RESOLVE_REASON_UNSPECIFIED: ResolveReason
RESOLVE_REASON_MATCH: ResolveReason
RESOLVE_REASON_NO_SEGMENT_MATCH: ResolveReason
RESOLVE_REASON_NO_TREATMENT_MATCH: ResolveReason
RESOLVE_REASON_FLAG_ARCHIVED: ResolveReason
RESOLVE_REASON_TARGETING_KEY_ERROR: ResolveReason
RESOLVE_REASON_ERROR: ResolveReason

class ResolveFlagsRequest(_message.Message):
    __slots__ = ("flags", "evaluation_context", "client_secret", "apply", "sdk")
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    APPLY_FIELD_NUMBER: _ClassVar[int]
    SDK_FIELD_NUMBER: _ClassVar[int]
    flags: _containers.RepeatedScalarFieldContainer[str]
    evaluation_context: _struct_pb2.Struct
    client_secret: str
    apply: bool
    sdk: str
    def __init__(self, flags: _Optional[_Iterable[str]] = ..., evaluation_context: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., client_secret: _Optional[str] = ..., apply: bool = ..., sdk: _Optional[str] = ...) -> None: ...

class ResolvedFlag(_message.Message):
    __slots__ = ("flag", "variant", "value", "reason", "should_apply", "rule", "segment", "assignment_id")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHOULD_APPLY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    flag: str
    variant: str
    value: _struct_pb2.Struct
    reason: ResolveReason
    should_apply: bool
    rule: str
    segment: str
    assignment_id: str
    def __init__(self, flag: _Optional[str] = ..., variant: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., reason: _Optional[_Union[ResolveReason, str]] = ..., should_apply: bool = ..., rule: _Optional[str] = ..., segment: _Optional[str] = ..., assignment_id: _Optional[str] = ...) -> None: ...

class ResolveFlagsResponse(_message.Message):
    __slots__ = ("resolved_flags", "resolve_token", "resolve_id")
    RESOLVED_FLAGS_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_ID_FIELD_NUMBER: _ClassVar[int]
    resolved_flags: _containers.RepeatedCompositeFieldContainer[ResolvedFlag]
    resolve_token: bytes
    resolve_id: str
    def __init__(self, resolved_flags: _Optional[_Iterable[_Union[ResolvedFlag, _Mapping]]] = ..., resolve_token: _Optional[bytes] = ..., resolve_id: _Optional[str] = ...) -> None: ...

class AppliedFlag(_message.Message):
    __slots__ = ("flag", "apply_time")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    APPLY_TIME_FIELD_NUMBER: _ClassVar[int]
    flag: str
    apply_time: _timestamp_pb2.Timestamp
    def __init__(self, flag: _Optional[str] = ..., apply_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LocalAssignment(_message.Message):
    __slots__ = ("flag", "unit", "variant", "rule", "assignment_id", "resolve_id", "apply_time")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_ID_FIELD_NUMBER: _ClassVar[int]
    APPLY_TIME_FIELD_NUMBER: _ClassVar[int]
    flag: str
    unit: str
    variant: str
    rule: str
    assignment_id: str
    resolve_id: str
    apply_time: _timestamp_pb2.Timestamp
    def __init__(self, flag: _Optional[str] = ..., unit: _Optional[str] = ..., variant: _Optional[str] = ..., rule: _Optional[str] = ..., assignment_id: _Optional[str] = ..., resolve_id: _Optional[str] = ..., apply_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ApplyFlagsRequest(_message.Message):
    __slots__ = ("flags", "client_secret", "resolve_token", "send_time", "local_assignments", "sdk", "clock_offset_micros")
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    SDK_FIELD_NUMBER: _ClassVar[int]
    CLOCK_OFFSET_MICROS_FIELD_NUMBER: _ClassVar[int]
    flags: _containers.RepeatedCompositeFieldContainer[AppliedFlag]
    client_secret: str
    resolve_token: bytes
    send_time: _timestamp_pb2.Timestamp
    local_assignments: _containers.RepeatedCompositeFieldContainer[LocalAssignment]
    sdk: str
    clock_offset_micros: int
    def __init__(self, flags: _Optional[_Iterable[_Union[AppliedFlag, _Mapping]]] = ..., client_secret: _Optional[str] = ..., resolve_token: _Optional[bytes] = ..., send_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., local_assignments: _Optional[_Iterable[_Union[LocalAssignment, _Mapping]]] = ..., sdk: _Optional[str] = ..., clock_offset_micros: _Optional[int] = ...) -> None: ...

class ApplyFlagsResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "server_time", "refused", "refusal")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    server_time: _timestamp_pb2.Timestamp
    refused: int
    refusal: str
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., server_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., refused: _Optional[int] = ..., refusal: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "unit", "name", "value", "time", "properties")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    unit: str
    name: str
    value: float
    time: _timestamp_pb2.Timestamp
    properties: _struct_pb2.Struct
    def __init__(self, event_id: _Optional[str] = ..., unit: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., properties: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TrackEventsRequest(_message.Message):
    __slots__ = ("client_secret", "events", "send_time")
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    client_secret: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    send_time: _timestamp_pb2.Timestamp
    def __init__(self, client_secret: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., send_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrackEventsResponse(_message.Message):
    __slots__ = ("accepted", "duplicates", "server_time")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., server_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class WatchStateRequest(_message.Message):
    __slots__ = ("client_secret", "known_generation")
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    KNOWN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    client_secret: str
    known_generation: int
    def __init__(self, client_secret: _Optional[str] = ..., known_generation: _Optional[int] = ...) -> None: ...

class StateSnapshot(_message.Message):
    __slots__ = ("generation", "format", "state", "updated_at")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    generation: int
    format: str
    state: bytes
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, generation: _Optional[int] = ..., format: _Optional[str] = ..., state: _Optional[bytes] = ..., updated_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
