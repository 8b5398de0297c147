"""PreprocessService: DICOM objects in the store -> volumes + manifest in the store."""

from __future__ import annotations

from pathlib import Path

import grpc

from cmrvl.v1 import stages_pb2, stages_pb2_grpc
from services.runtime.errors import StageError, grpc_errors
from services.runtime.protoconv import ref_to_proto
from services.runtime.scratch import process_root, scratch_dir
from services.runtime.server import ServiceSpec
from services.runtime.settings import Settings
from services.runtime.storage import ObjectStore

STAGE_PREFIX = "{study_id}/preprocess/"


class PreprocessServicer(stages_pb2_grpc.PreprocessServiceServicer):
    def __init__(self, store: ObjectStore):
        self.store = store

    @grpc_errors
    def Preprocess(self, request, context):
        from services.preprocess.study import NoUsableCine, preprocess_study

        if not request.study_id or not request.dicom_prefix.key.endswith("/"):
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "study_id and a dicom_prefix ending in '/' are required")
        prefix = STAGE_PREFIX.format(study_id=request.study_id)
        artifacts = self.store.bucket("artifacts")
        with scratch_dir("cmrvl-pre-") as tmp:  # removed at exit too, or by the next start after a kill
            dicom_dir, out_dir = Path(tmp) / "dicom", Path(tmp) / "out"
            files = self.store.download_prefix(request.dicom_prefix.bucket, request.dicom_prefix.key, dicom_dir)
            if not files:
                raise StageError(grpc.StatusCode.NOT_FOUND, f"no objects under s3://{request.dicom_prefix.bucket}/{request.dicom_prefix.key}")
            try:
                manifest = preprocess_study(dicom_dir, out_dir)
            except NoUsableCine as exc:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"no usable short-axis cine: {exc}") from None
            refs = self.store.upload_folder(out_dir, artifacts, prefix)
        return stages_pb2.PreprocessResponse(
            manifest=ref_to_proto(refs["manifest.json"]),
            study_instance_uid=manifest.get("study_instance_uid", ""),
            rejected_files=len(manifest.get("rejected", [])),
        )


def service_spec(settings: Settings) -> ServiceSpec:
    store = ObjectStore(settings)
    process_root()  # now, not at the first request: removes what killed processes left
    return ServiceSpec(
        names=[stages_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name],
        register=lambda server: stages_pb2_grpc.add_PreprocessServiceServicer_to_server(PreprocessServicer(store), server),
        tokens=settings.stage_tokens,
    )
