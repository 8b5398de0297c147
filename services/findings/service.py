"""FindingsService: images + masks -> visual inputs -> one VLM question per catalog task."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from pathlib import Path

import grpc

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from services.runtime.errors import StageError, grpc_errors
from services.runtime.protoconv import ref_to_proto
from services.runtime.server import ServiceSpec
from services.runtime.settings import Settings
from services.runtime.storage import ObjectStore

log = logging.getLogger("cmrvl.findings")

STAGE_PREFIX = "{study_id}/findings/"
SERIES_FOR_INPUT = {"cine": "cine_sax", "lge": "lge_sax", "t2": "t2_sax"}


MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4"}


def input_volumes(manifest: dict) -> dict[str, str]:
    """Relative path of the volume each visual input is made from ({"cine": ..., "lge": ...})."""
    from services.preprocess.study import primary_series

    volumes = {}
    for name, kind in SERIES_FOR_INPUT.items():
        series = primary_series(manifest, kind)
        if series is not None:
            volumes[name] = series["volume"]
    return volumes


def prepare_inputs(volume_paths: dict[str, Path], labels_path: Path, out_dir: Path):
    """Build every catalog task's visual input that the study allows.

    Returns ({task_id: [relative media paths]}, {task_id: reason skipped})."""
    import nibabel as nib

    from services.findings.catalog import load_catalog
    from services.findings.visual_inputs import MissingInput, build_visual_input, write_inputs

    volumes = {name: nib.load(path) for name, path in volume_paths.items()}
    labels = nib.load(labels_path)
    prepared, skipped = {}, {}
    for task in load_catalog().tasks:
        try:
            visual = build_visual_input(task, cine=volumes.get("cine"), cine_labels=labels,
                                        lge=volumes.get("lge"), t2=volumes.get("t2"))
        except MissingInput as exc:
            skipped[task.id] = str(exc)
            continue
        prepared[task.id] = write_inputs(out_dir, visual)
    return prepared, skipped


class FindingsServicer(stages_pb2_grpc.FindingsServiceServicer):
    def __init__(self, store: ObjectStore, settings: Settings, backend_factory=None):
        self.store, self.settings = store, settings
        self.backend_factory = backend_factory

    def _download_volumes(self, manifest: dict, manifest_ref, folder: Path) -> dict[str, Path]:
        manifest_dir = manifest_ref.key.rsplit("/", 1)[0]
        paths = {name: self.store.get_file(manifest_ref.bucket, f"{manifest_dir}/{volume}", folder / f"{name}.nii.gz")
                 for name, volume in input_volumes(manifest).items()}
        if "cine" not in paths:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "manifest has no short-axis cine series")
        return paths

    @grpc_errors
    def GenerateFindings(self, request, context):
        from services.findings.pipeline import generate_findings
        from services.findings.vlm_client import VLMTimeout, VLMUnavailable

        backend = self.backend_factory() if self.backend_factory else None
        if backend is None:
            # No model server and no embedded weights: say so; the gateway then delivers the
            # measurements as a partial report.
            raise StageError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no vision-language model configured (set CMRVL_VLM_BASE_URL to an OpenAI-compatible server)",
            )
        artifacts = self.store.bucket("artifacts")
        prefix = STAGE_PREFIX.format(study_id=request.study_id)
        manifest = self.store.get_json(request.manifest.bucket, request.manifest.key)
        with tempfile.TemporaryDirectory(prefix="cmrvl-findings-") as tmp:
            tmp = Path(tmp)
            volume_paths = self._download_volumes(manifest, request.manifest, tmp / "volumes")
            labels_path = self.store.get_file(request.labels.bucket, request.labels.key, tmp / "labels.nii.gz")
            inputs_dir = tmp / "inputs"
            prepared, skipped = prepare_inputs(volume_paths, labels_path, inputs_dir)
            self.store.upload_folder(inputs_dir, artifacts, prefix + "inputs/")
            media = {task_id: [(inputs_dir / rel, MEDIA_TYPES[Path(rel).suffix]) for rel in paths]
                     for task_id, paths in prepared.items()}
            try:
                document = generate_findings(media, backend, concurrency=self.settings.vlm_concurrency,
                                             not_assessable=skipped)
            except VLMUnavailable as exc:
                raise StageError(grpc.StatusCode.UNAVAILABLE, f"vision-language model server unavailable: {exc}") from None
            except VLMTimeout as exc:
                raise StageError(grpc.StatusCode.DEADLINE_EXCEEDED, f"vision-language model server too slow: {exc}") from None
        document["skipped_tasks"] = skipped
        findings_ref = self.store.put_bytes(artifacts, prefix + "findings.json",
                                            json.dumps(document, indent=2).encode(), "application/json")
        model = document.get("model") or {}
        return stages_pb2.FindingsResponse(
            findings=ref_to_proto(findings_ref),
            model=common_pb2.ModelInfo(name=model.get("name", ""), version=model.get("version", ""),
                                       backend=model.get("backend", "")),
            skipped_tasks=[f"{task_id}: {reason}" for task_id, reason in skipped.items()],
        )


def make_backend_factory(settings: Settings):
    """The configured VLM backend: an OpenAI-compatible server (vLLM / KServe), else the model
    run in-process (CMRVL_VLM_MODEL_DIR), else none. Built once, on first use."""
    if not settings.vlm_base_url and not settings.vlm_model_dir:
        return None
    lock, built = threading.Lock(), []

    def factory():
        with lock:
            if not built:
                if settings.vlm_base_url:
                    from services.findings.vlm_client import VLMClient

                    built.append(VLMClient.from_settings(settings))
                else:
                    from services.findings.embedded import EmbeddedBackend

                    built.append(EmbeddedBackend(settings.vlm_model_dir, model_name=settings.vlm_model,
                                                 version=settings.vlm_model_version or "local"))
            return built[0]

    return factory


def service_spec(settings: Settings) -> ServiceSpec:
    store = ObjectStore(settings)
    servicer = FindingsServicer(store, settings, make_backend_factory(settings))
    return ServiceSpec(
        names=[stages_pb2.DESCRIPTOR.services_by_name["FindingsService"].full_name],
        register=lambda server: stages_pb2_grpc.add_FindingsServiceServicer_to_server(servicer, server),
        tokens=settings.stage_tokens,
    )
