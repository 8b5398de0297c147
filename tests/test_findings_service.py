"""FindingsService over real gRPC: visual inputs from the stored study, one HTTP request per task
to an OpenAI-compatible server. The server is a stdlib HTTP server that STANDS IN FOR vLLM (the
real vLLM runs in the integration tier)."""

from __future__ import annotations

import uuid

import grpc
import nibabel as nib
import numpy as np
import pytest

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from nnunet_fixtures import phantom_cine
from vlm_fixtures import StandInServer, completion


@pytest.fixture(scope="module")
def stored_study(store, tmp_path_factory):
    """A phantom cine + its labels + manifest in the store, as the earlier stages leave them."""
    image, labels = phantom_cine((64, 64, 8), n_phases=6)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    folder = tmp_path_factory.mktemp("study")
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), folder / "cine.nii.gz")
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), folder / "labels.nii.gz")
    study_id = f"findings-{uuid.uuid4().hex[:8]}"
    bucket = store.bucket("artifacts")
    store.put_file(bucket, f"{study_id}/preprocess/series/001_cine_sax.nii.gz", folder / "cine.nii.gz")
    labels_ref = store.put_file(bucket, f"{study_id}/segmentation/labels.nii.gz", folder / "labels.nii.gz")
    manifest_ref = store.put_json(bucket, f"{study_id}/preprocess/manifest.json", {
        "study_instance_uid": "1.2.3",
        "series": [{"kind": "cine_sax", "volume": "series/001_cine_sax.nii.gz", "n_slices": 8, "n_phases": 6}]})
    return study_id, common_pb2.ObjectRef(bucket=bucket, key=manifest_ref.key), \
        common_pb2.ObjectRef(bucket=bucket, key=labels_ref.key)


def _findings_server(stack_info, **settings):
    from services.findings.service import service_spec
    from services.runtime.server import start_server
    from services.runtime.settings import load_settings

    settings = load_settings(grpc_port=0, metrics_port=0, s3_endpoint=stack_info.s3_endpoint,
                             s3_access_key=stack_info.access_key, s3_secret_key=stack_info.secret_key,
                             internal_token="", **settings)
    return start_server(service_spec(settings), settings)


def _generate(port, study):
    study_id, manifest, labels = study
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return stages_pb2_grpc.FindingsServiceStub(channel).GenerateFindings(
            stages_pb2.FindingsRequest(study_id=study_id, manifest=manifest, labels=labels), timeout=300)


def test_findings_from_a_stored_study_through_an_openai_compatible_server(stack_info, store, stored_study):
    with StandInServer(lambda body: (200, {}, completion("There is no pericardial effusion."))) as vlm:
        server = _findings_server(stack_info, vlm_base_url=vlm.base_url, vlm_model="cmr-vl", vlm_max_attempts=1)
        try:
            response = _generate(server.port, stored_study)
        finally:
            server.stop()
        requests = list(vlm.requests)
    study_id = stored_study[0]
    document = store.get_json(response.findings.bucket, response.findings.key)
    assert response.findings.key == f"{study_id}/findings/findings.json"
    by_task = {f["task_id"]: f for f in document["findings"]}
    assert by_task["pericardial_effusion"]["status"] == "ok"
    assert by_task["pericardial_effusion"]["finding"]["status"] == "absent"
    # Only cine-based tasks can run on a cine-only study; the others say why.
    assert {r.split(":")[0] for r in response.skipped_tasks} == {"lge", "myocardial_edema", "lv_thrombus"}
    assert len(requests) == 2  # effusion (10 images) + wall motion (1 video)
    contents = [part["type"] for r in requests for m in r["messages"] for part in m["content"]
                if isinstance(m["content"], list)]
    assert contents.count("image_url") == 10 and contents.count("video_url") == 1
    inputs = set(store.list_keys(store.bucket("artifacts"), f"{study_id}/findings/inputs/"))
    assert f"{study_id}/findings/inputs/wall_motion/wall_motion.mp4" in inputs
    assert response.model.name == "cmr-vl"


def test_vlm_server_down_is_unavailable(stack_info, stored_study):
    server = _findings_server(stack_info, vlm_base_url="http://127.0.0.1:9/v1", vlm_max_attempts=2)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(server.port, stored_study)
    finally:
        server.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in err.value.details()


def test_no_vlm_configured_is_a_failed_precondition(stack_info, stored_study):
    server = _findings_server(stack_info)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _generate(server.port, stored_study)
    finally:
        server.stop()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
