from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListExperimentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExperimentSummary(_message.Message):
    __slots__ = ("name", "flag", "computed_at", "recommendation", "srm_mismatch", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_FIELD_NUMBER: _ClassVar[int]
    SRM_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    flag: str
    computed_at: _timestamp_pb2.Timestamp
    recommendation: str
    srm_mismatch: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., flag: _Optional[str] = ..., computed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., recommendation: _Optional[str] = ..., srm_mismatch: bool = ..., error: _Optional[str] = ...) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[ExperimentSummary]
    def __init__(self, experiments: _Optional[_Iterable[_Union[ExperimentSummary, _Mapping]]] = ...) -> None: ...

class GetResultsRequest(_message.Message):
    __slots__ = ("experiment", "include_html")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HTML_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    include_html: bool
    def __init__(self, experiment: _Optional[str] = ..., include_html: bool = ...) -> None: ...

class GetResultsResponse(_message.Message):
    __slots__ = ("results_json", "computed_at", "report_html")
    RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_FIELD_NUMBER: _ClassVar[int]
    REPORT_HTML_FIELD_NUMBER: _ClassVar[int]
    results_json: str
    computed_at: _timestamp_pb2.Timestamp
    report_html: str
    def __init__(self, results_json: _Optional[str] = ..., computed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., report_html: _Optional[str] = ...) -> None: ...

class ComputeFromStatisticsRequest(_message.Message):
    __slots__ = ("input_json",)
    INPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    input_json: str
    def __init__(self, input_json: _Optional[str] = ...) -> None: ...

class ComputeFromStatisticsResponse(_message.Message):
    __slots__ = ("results_json",)
    RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    results_json: str
    def __init__(self, results_json: _Optional[str] = ...) -> None: ...
