"""SegmentationService: cine volume -> label maps of every phase + cardiac function."""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import grpc

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from services.runtime.errors import StageError, grpc_errors
from services.runtime.protoconv import ref_to_proto
from services.runtime.scratch import process_root, scratch_dir
from services.runtime.server import ServiceSpec
from services.runtime.settings import Settings
from services.runtime.storage import ObjectStore

STAGE_PREFIX = "{study_id}/segmentation/"
# The ACDC model (LV cavity, myocardium, RV) shipped with the project (see its MODEL_CARD.md): used only when
# neither CMRVL_SEGMENTATION_MODEL_DIR nor the models bucket provides one.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def cine_series(manifest: dict) -> dict:
    from services.preprocess.study import primary_series

    series = primary_series(manifest, "cine_sax")
    if series is None:
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "manifest has no short-axis cine series")
    return series


class SegmentationServicer(stages_pb2_grpc.SegmentationServiceServicer):
    def __init__(self, store: ObjectStore, settings: Settings):
        self.store, self.settings = store, settings
        self._segmenter = None
        self._is_default_model = False
        self._lock = threading.Lock()

    def segmenter(self):
        """Load the model once, on first use (local folder, else the models bucket)."""
        with self._lock:
            if self._segmenter is None:
                from services.segmentation.inference import load_segmenter

                model_dir = self.settings.segmentation_model_dir or self._download_model()
                if model_dir is None and DEFAULT_MODEL_DIR.is_dir():
                    model_dir, self._is_default_model = str(DEFAULT_MODEL_DIR), True
                if model_dir is None:
                    raise StageError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"no segmentation model installed: nothing under s3://{self.store.bucket('models')}/"
                        f"triton/{self.settings.segmentation_model}/ and CMRVL_SEGMENTATION_MODEL_DIR unset",
                    )
                backend = "triton" if self.settings.triton_url else "onnxruntime"
                self._segmenter = load_segmenter(
                    model_dir, backend=backend, triton_url=self.settings.triton_url or None,
                    model_name=self.settings.segmentation_model,
                )
            return self._segmenter

    def _download_model(self) -> str | None:
        """The model repository folder from the models bucket, or None when it holds none."""
        prefix = f"triton/{self.settings.segmentation_model}/"
        parent = Path(tempfile.mkdtemp(prefix="cmrvl-model-"))
        folder = parent / self.settings.segmentation_model
        if not self.store.download_prefix(self.store.bucket("models"), prefix, folder):
            parent.rmdir()  # nothing downloaded: leave no empty folder behind
            return None
        return str(folder)

    @grpc_errors
    def Segment(self, request, context):
        import nibabel as nib
        import numpy as np

        from services.segmentation.function import measure_labels, present_cells

        artifacts = self.store.bucket("artifacts")
        manifest = self.store.get_json(request.manifest.bucket, request.manifest.key)
        series = cine_series(manifest)
        manifest_dir = request.manifest.key.rsplit("/", 1)[0]
        from services.segmentation.backends import BackendTimeout, BackendUnavailable, InvalidInput

        segmenter = self.segmenter()
        with scratch_dir("cmrvl-seg-") as tmp:  # removed at exit too, or by the next start after a kill
            cine_path = self.store.get_file(request.manifest.bucket, f"{manifest_dir}/{series['volume']}", Path(tmp) / "cine.nii.gz")
            cine = nib.load(cine_path)
            image = np.asarray(cine.dataobj, dtype=np.float32)
            if image.ndim != 4:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"cine volume must be 4D, got shape {image.shape}")
            try:
                present, presence_flags = present_cells(series, image.shape[2], image.shape[3])
            except ValueError as exc:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"manifest and cine volume disagree: {exc}") from None
            try:
                labels = segmenter.segment_cine(image, cine.affine).astype(np.uint8)
            except BackendUnavailable as exc:
                raise StageError(grpc.StatusCode.UNAVAILABLE, f"segmentation model server unavailable: {exc}") from None
            except BackendTimeout as exc:
                raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED, f"segmentation model server too slow: {exc}") from None
            except InvalidInput as exc:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"cine rejected by the model: {exc}") from None
            # The zeros preprocessing put in cells without an image are not anatomy: no labels there.
            labels[:, :, ~present] = 0
            labels_path = Path(tmp) / "labels.nii.gz"
            nib.save(nib.Nifti1Image(labels, cine.affine), labels_path)
            patient = manifest.get("patient", {})
            height = request.height_m if request.HasField("height_m") else patient.get("height_m")
            weight = request.weight_kg if request.HasField("weight_kg") else patient.get("weight_kg")
            measurements = measure_labels(labels, cine.affine, height_m=height, weight_kg=weight, present=present,
                                          predicted_classes=set(segmenter.lut.tolist()) - {0})
            measurements["quality"][:0] = presence_flags
            prefix = STAGE_PREFIX.format(study_id=request.study_id)
            labels_ref = self.store.put_file(artifacts, prefix + "labels.nii.gz", labels_path)
        model = common_pb2.ModelInfo(
            name=Path(segmenter.model_dir).name, version=str(segmenter.version),
            backend="triton" if self.settings.triton_url else "onnxruntime",
        )
        measurements["model"] = {"name": model.name, "version": model.version, "backend": model.backend,
                                 "default_model": self._is_default_model}
        measurements_ref = self.store.put_bytes(
            artifacts, prefix + "measurements.json", json.dumps(measurements, indent=2, default=float).encode(),
            "application/json",
        )
        return stages_pb2.SegmentResponse(
            labels=ref_to_proto(labels_ref), measurements=ref_to_proto(measurements_ref), model=model,
        )


def service_spec(settings: Settings) -> ServiceSpec:
    store = ObjectStore(settings)
    process_root()  # now, not at the first request: removes what killed processes left
    return ServiceSpec(
        names=[stages_pb2.DESCRIPTOR.services_by_name["SegmentationService"].full_name],
        register=lambda server: stages_pb2_grpc.add_SegmentationServiceServicer_to_server(
            SegmentationServicer(store, settings), server),
        tokens=settings.stage_tokens,
    )
