from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageRecord(_message.Message):
    __slots__ = ("record_id", "kind", "model", "tenant", "trace_id", "status", "finish_reason", "prompt_tokens", "generated_tokens", "delivered_tokens", "started_unix_ms", "ended_unix_ms", "record_count", "boot_id", "seq", "cumulative_delivered", "hour")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_DELIVERED_FIELD_NUMBER: _ClassVar[int]
    HOUR_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    kind: str
    model: str
    tenant: str
    trace_id: str
    status: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    delivered_tokens: int
    started_unix_ms: int
    ended_unix_ms: int
    record_count: int
    boot_id: str
    seq: int
    cumulative_delivered: int
    hour: str
    def __init__(self, record_id: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., tenant: _Optional[str] = ..., trace_id: _Optional[str] = ..., status: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., delivered_tokens: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., ended_unix_ms: _Optional[int] = ..., record_count: _Optional[int] = ..., boot_id: _Optional[str] = ..., seq: _Optional[int] = ..., cumulative_delivered: _Optional[int] = ..., hour: _Optional[str] = ...) -> None: ...

class UsageBatch(_message.Message):
    __slots__ = ("sidecar_id", "records")
    SIDECAR_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    sidecar_id: str
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    def __init__(self, sidecar_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ...) -> None: ...

class UsageAck(_message.Message):
    __slots__ = ("accepted_ids", "duplicate_ids")
    ACCEPTED_IDS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_IDS_FIELD_NUMBER: _ClassVar[int]
    accepted_ids: _containers.RepeatedScalarFieldContainer[str]
    duplicate_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted_ids: _Optional[_Iterable[str]] = ..., duplicate_ids: _Optional[_Iterable[str]] = ...) -> None: ...
