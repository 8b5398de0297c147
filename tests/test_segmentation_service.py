"""SegmentationService over real gRPC, with the network served by a real Triton server.

Triton runs the production repository layout; its `onnxruntime` backend here is the Python-backend
stand-in from tests/triton/ (Triton's C++ ONNX backend is not in the PyPI build)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import nibabel as nib
import numpy as np
import pytest

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from nnunet_fixtures import tiny_model, unseen_cine
from triton_server import triton_missing_reason, triton_server

pytestmark = pytest.mark.skipif(triton_missing_reason() is not None, reason=str(triton_missing_reason()))


@pytest.fixture(scope="module")
def stored_cine(store, tmp_path_factory):
    """A phantom cine + manifest in the store, as the preprocess stage leaves them."""
    image, _, affine = unseen_cine(n_phases=3)
    image = image.astype(np.int16)  # stored pixel values, as preprocessing writes them
    folder = tmp_path_factory.mktemp("cine")
    nib.save(nib.Nifti1Image(image, affine), folder / "cine.nii.gz")
    study_id = f"seg-{uuid.uuid4().hex[:8]}"
    prefix = f"{study_id}/preprocess/"
    bucket = store.bucket("artifacts")
    store.put_file(bucket, prefix + "series/001_cine_sax.nii.gz", folder / "cine.nii.gz")
    manifest = {"study_instance_uid": "1.2.3", "patient": {"height_m": 1.8, "weight_kg": 81.0},
                "series": [{"kind": "cine_sax", "volume": "series/001_cine_sax.nii.gz", "n_slices": 8, "n_phases": 3}]}
    ref = store.put_json(bucket, prefix + "manifest.json", manifest)
    return study_id, common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key), image, affine


def _segmentation_server(stack_info, **settings):
    from services.runtime.server import start_server
    from services.runtime.settings import load_settings
    from services.segmentation.service import service_spec

    settings = load_settings(grpc_port=0, metrics_port=0, s3_endpoint=stack_info.s3_endpoint,
                             s3_access_key=stack_info.access_key, s3_secret_key=stack_info.secret_key,
                             internal_token="", **settings)
    return start_server(service_spec(settings), settings)


def _segment(port, study_id, manifest_ref):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return stages_pb2_grpc.SegmentationServiceStub(channel).Segment(
            stages_pb2.SegmentRequest(study_id=study_id, manifest=manifest_ref), timeout=300)


def test_segment_through_triton_matches_in_process_onnxruntime(stack_info, store, stored_cine, tmp_path):
    from services.segmentation.inference import load_segmenter

    model = tiny_model()
    study_id, manifest_ref, image, affine = stored_cine
    with triton_server(model.layout, tmp_path / "triton.log", ort_threads=1) as url:
        server = _segmentation_server(stack_info, triton_url=url, segmentation_model_dir=str(model.layout))
        try:
            response = _segment(server.port, study_id, manifest_ref)
        finally:
            server.stop()
    assert response.model.backend == "triton" and response.model.name == "cmr_seg"
    assert response.labels.key == f"{study_id}/segmentation/labels.nii.gz"
    labels = np.asarray(nib.load(store.get_file(response.labels.bucket, response.labels.key,
                                                tmp_path / "labels.nii.gz")).dataobj)
    reference = load_segmenter(model.layout, backend="onnxruntime").segment_cine(image.astype(np.float32), affine)
    assert labels.shape == image.shape
    assert (labels == reference).mean() == 1.0
    assert set(np.unique(labels)) >= {1, 2, 3}
    measurements = store.get_json(response.measurements.bucket, response.measurements.key)
    assert measurements["lv_edv_ml"] > 0 and measurements["bsa_m2"] == pytest.approx((180 * 81 / 3600) ** 0.5, abs=1e-3)
    assert measurements["model"]["default_model"] is False
    # This manifest does not list its cells: every one is measured as present, and that is said.
    assert "presence_unknown" in [q["code"] for q in measurements["quality"]]


def test_triton_down_is_unavailable_with_a_clear_message(stack_info, stored_cine):
    model = tiny_model()
    study_id, manifest_ref, _, _ = stored_cine
    server = _segmentation_server(stack_info, triton_url="127.0.0.1:9", segmentation_model_dir=str(model.layout))
    try:
        with pytest.raises(grpc.RpcError) as err:
            _segment(server.port, study_id, manifest_ref)
    finally:
        server.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in err.value.details()


def test_missing_manifest_is_not_found(stack_info, store):
    model = tiny_model()
    server = _segmentation_server(stack_info, segmentation_model_dir=str(model.layout))
    try:
        with pytest.raises(grpc.RpcError) as err:
            _segment(server.port, "nope", common_pb2.ObjectRef(bucket=store.bucket("artifacts"), key="nope/manifest.json"))
    finally:
        server.stop()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


GAP = (4, 1)  # (slice, phase) without an image


@pytest.fixture(scope="module")
def stored_gapped_cine(store, tmp_path_factory):
    """A cine whose slice 4 has no image at phase 1, as preprocessing leaves it: zeros in the
    volume, null in the manifest's sop_instance_uids."""
    image, _, affine = unseen_cine(n_phases=4)
    image = image.astype(np.int16)
    image[:, :, GAP[0], GAP[1]] = 0
    folder = tmp_path_factory.mktemp("gapped")
    nib.save(nib.Nifti1Image(image, affine), folder / "cine.nii.gz")
    study_id = f"seg-gap-{uuid.uuid4().hex[:8]}"
    bucket, prefix = store.bucket("artifacts"), f"{study_id}/preprocess/"
    store.put_file(bucket, prefix + "series/001_cine_sax.nii.gz", folder / "cine.nii.gz")
    uids = [[None if (z, t) == GAP else f"1.2.826.0.1.{z}.{t}" for t in range(4)] for z in range(8)]
    series = {"kind": "cine_sax", "volume": "series/001_cine_sax.nii.gz", "n_slices": 8, "n_phases": 4,
              "sop_instance_uids": uids}
    refs = {}
    for name, entry in (("manifest", series), ("bad", dict(series, sop_instance_uids=uids[:7]))):
        ref = store.put_json(bucket, f"{prefix}{name}.json", {"study_instance_uid": "1.2.3", "series": [entry]})
        refs[name] = common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key)
    return study_id, refs


def test_segment_keeps_gaps_out_of_the_measurements(stack_info, store, stored_gapped_cine, tmp_path):
    study_id, refs = stored_gapped_cine
    server = _segmentation_server(stack_info, segmentation_model_dir=str(tiny_model().layout))
    try:
        response = _segment(server.port, study_id, refs["manifest"])
        with pytest.raises(grpc.RpcError) as err:
            _segment(server.port, study_id, refs["bad"])
    finally:
        server.stop()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in err.value.details()
    measurements = store.get_json(response.measurements.bucket, response.measurements.key)
    curve = measurements["lv_volume_curve_ml"]
    assert curve[GAP[1]] is None and all(v is not None for t, v in enumerate(curve) if t != GAP[1])
    assert GAP[1] not in (measurements["ed_phase"], measurements["es_phase"])
    flags = {q["code"]: q for q in measurements["quality"]}
    assert flags["incomplete_phases"]["cells"] == [list(GAP)] and "presence_unknown" not in flags
    labels = np.asarray(nib.load(store.get_file(response.labels.bucket, response.labels.key,
                                                tmp_path / "labels.nii.gz")).dataobj)
    assert not labels[:, :, GAP[0], GAP[1]].any()  # no anatomy where there is no image
