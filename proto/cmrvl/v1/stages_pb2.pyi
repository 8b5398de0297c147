from cmrvl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreprocessRequest(_message.Message):
    __slots__ = ("study_id", "dicom_prefix")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    DICOM_PREFIX_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    dicom_prefix: _common_pb2.ObjectRef
    def __init__(self, study_id: _Optional[str] = ..., dicom_prefix: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("manifest", "study_instance_uid", "rejected_files")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FILES_FIELD_NUMBER: _ClassVar[int]
    manifest: _common_pb2.ObjectRef
    study_instance_uid: str
    rejected_files: int
    def __init__(self, manifest: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., study_instance_uid: _Optional[str] = ..., rejected_files: _Optional[int] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("study_id", "manifest", "height_m", "weight_kg")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_M_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_KG_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    manifest: _common_pb2.ObjectRef
    height_m: float
    weight_kg: float
    def __init__(self, study_id: _Optional[str] = ..., manifest: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., height_m: _Optional[float] = ..., weight_kg: _Optional[float] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("labels", "measurements", "model")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    labels: _common_pb2.ObjectRef
    measurements: _common_pb2.ObjectRef
    model: _common_pb2.ModelInfo
    def __init__(self, labels: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., measurements: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class FindingsRequest(_message.Message):
    __slots__ = ("study_id", "manifest", "labels")
    STUDY_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    study_id: str
    manifest: _common_pb2.ObjectRef
    labels: _common_pb2.ObjectRef
    def __init__(self, study_id: _Optional[str] = ..., manifest: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., labels: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ...) -> None: ...

class FindingsResponse(_message.Message):
    __slots__ = ("findings", "model", "skipped_tasks")
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_TASKS_FIELD_NUMBER: _ClassVar[int]
    findings: _common_pb2.ObjectRef
    model: _common_pb2.ModelInfo
    skipped_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, findings: _Optional[_Union[_common_pb2.ObjectRef, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., skipped_tasks: _Optional[_Iterable[str]] = ...) -> None: ...
