from cmrvl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StudyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STUDY_STATUS_UNSPECIFIED: _ClassVar[StudyStatus]
    STUDY_STATUS_QUEUED: _ClassVar[StudyStatus]
    STUDY_STATUS_RUNNING: _ClassVar[StudyStatus]
    STUDY_STATUS_COMPLETED: _ClassVar[StudyStatus]
    STUDY_STATUS_PARTIAL: _ClassVar[StudyStatus]
    STUDY_STATUS_FAILED: _ClassVar[StudyStatus]
    STUDY_STATUS_CANCELLED: _ClassVar[StudyStatus]
STUDY_STATUS_UNSPECIFIED: StudyStatus
STUDY_STATUS_QUEUED: StudyStatus
STUDY_STATUS_RUNNING: StudyStatus
STUDY_STATUS_COMPLETED: StudyStatus
STUDY_STATUS_PARTIAL: StudyStatus
STUDY_STATUS_FAILED: StudyStatus
STUDY_STATUS_CANCELLED: StudyStatus

class SubmitStudyRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmitHeader
    chunk: FileChunk
    def __init__(self, header: _Optional[_Union[SubmitHeader, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class SubmitHeader(_message.Message):
    __slots__ = ("client_request_id", "height_m", "weight_kg", "retry")
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_M_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_KG_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    client_request_id: str
    height_m: float
    weight_kg: float
    retry: bool
    def __init__(self, client_request_id: _Optional[str] = ..., height_m: _Optional[float] = ..., weight_kg: _Optional[float] = ..., retry: bool = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitStudyReferenceRequest(_message.Message):
    __slots__ = ("client_request_id", "dicom_prefix", "height_m", "weight_kg", "retry")
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DICOM_PREFIX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_M_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_KG_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    client_request_id: str
    dicom_prefix: _common_pb2.ObjectRef
    height_m: float
    weight_kg: float
    retry: bool
    def __init__(self, client_request_id: _Optional[str] = ..., dicom_prefix: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., height_m: _Optional[float] = ..., weight_kg: _Optional[float] = ..., retry: bool = ...) -> None: ...

class StageRecord(_message.Message):
    __slots__ = ("stage", "state", "attempts", "seconds", "error")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    stage: _common_pb2.Stage
    state: str
    attempts: int
    seconds: float
    error: str
    def __init__(self, stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., state: _Optional[str] = ..., attempts: _Optional[int] = ..., seconds: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class Study(_message.Message):
    __slots__ = ("study_id", "study_instance_uid", "client_request_id", "status", "current_stage", "stages", "error", "created_at", "updated_at")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    study_instance_uid: str
    client_request_id: str
    status: StudyStatus
    current_stage: _common_pb2.Stage
    stages: _containers.RepeatedCompositeFieldContainer[StageRecord]
    error: str
    created_at: str
    updated_at: str
    def __init__(self, study_id: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., client_request_id: _Optional[str] = ..., status: _Optional[_Union[StudyStatus, str]] = ..., current_stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., stages: _Optional[_Iterable[_Union[StageRecord, _Mapping]]] = ..., error: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class GetStudyRequest(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...

class WatchStudyRequest(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...

class StudyEvent(_message.Message):
    __slots__ = ("study_id", "sequence", "stage", "status", "percent", "message", "time")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    sequence: int
    stage: _common_pb2.Stage
    status: StudyStatus
    percent: float
    message: str
    time: str
    def __init__(self, study_id: _Optional[str] = ..., sequence: _Optional[int] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., status: _Optional[_Union[StudyStatus, str]] = ..., percent: _Optional[float] = ..., message: _Optional[str] = ..., time: _Optional[str] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("study_id", "status", "report_json", "report_text", "json", "text", "sr", "seg", "segs")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    REPORT_TEXT_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SR_FIELD_NUMBER: _ClassVar[int]
    SEG_FIELD_NUMBER: _ClassVar[int]
    SEGS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    status: StudyStatus
    report_json: str
    report_text: str
    json: _common_pb2.ObjectRef
    text: _common_pb2.ObjectRef
    sr: _common_pb2.ObjectRef
    seg: _common_pb2.ObjectRef
    segs: _containers.RepeatedCompositeFieldContainer[_common_pb2.ObjectRef]
    def __init__(self, study_id: _Optional[str] = ..., status: _Optional[_Union[StudyStatus, str]] = ..., report_json: _Optional[str] = ..., report_text: _Optional[str] = ..., json: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., text: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., sr: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., seg: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., segs: _Optional[_Iterable[_Union[_common_pb2.ObjectRef, _Mapping]]] = ...) -> None: ...

class GetReportObjectRequest(_message.Message):
    __slots__ = ("study_id", "name")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    name: str
    def __init__(self, study_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ReportObjectChunk(_message.Message):
    __slots__ = ("data", "content_type", "size_bytes", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    content_type: str
    size_bytes: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ListStudiesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "status")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    status: StudyStatus
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., status: _Optional[_Union[StudyStatus, str]] = ...) -> None: ...

class ListStudiesResponse(_message.Message):
    __slots__ = ("studies", "next_page_token")
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[Study]
    next_page_token: str
    def __init__(self, studies: _Optional[_Iterable[_Union[Study, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelStudyRequest(_message.Message):
    __slots__ = ("study_id",)
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    def __init__(self, study_id: _Optional[str] = ...) -> None: ...
