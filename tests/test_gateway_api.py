"""StudyService over real gRPC on loopback, with the real stages and the real S3 server."""

from __future__ import annotations

import io
import json
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cmrvl.v1 import common_pb2, study_pb2, study_pb2_grpc
from tests.conftest import SUNNYBROOK_STUDY, TEST_MAX_UPLOAD_MB, require

TERMINAL = {study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL,
            study_pb2.STUDY_STATUS_FAILED, study_pb2.STUDY_STATUS_CANCELLED}


def _finish(gateway, study_id):
    events = list(gateway.watch(study_id, timeout_s=600))
    assert [e.sequence for e in events] == list(range(len(events)))
    assert events[-1].status in TERMINAL
    return events


def test_calls_without_a_valid_token_are_unauthenticated(stack_info, tmp_path):
    from services.gateway.client import StudyClient

    (tmp_path / "a.dcm").write_bytes(b"not read")
    for token in ("", "wrong-token"):
        client = StudyClient(stack_info.target("gateway"), token)
        try:
            for call in (lambda: client.get_study("x"), lambda: client.submit_folder(tmp_path),
                         lambda: list(client.watch("x", timeout_s=5))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            client.close()


def test_unknown_study_is_not_found(gateway):
    with pytest.raises(grpc.RpcError) as err:
        gateway.get_study("no-such-study")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversize_upload_is_refused_and_leaves_nothing_behind(gateway, store):
    before = set(store.list_keys(store.bucket("studies"), ""))
    chunk = b"\0" * (1024 * 1024)

    def messages():
        yield study_pb2.SubmitStudyRequest(header=study_pb2.SubmitHeader(client_request_id="too-big"))
        for i in range(TEST_MAX_UPLOAD_MB + 2):
            yield study_pb2.SubmitStudyRequest(chunk=study_pb2.FileChunk(path="big.dcm", data=chunk))

    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.SubmitStudy(messages(), timeout=60, metadata=gateway.metadata)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{TEST_MAX_UPLOAD_MB} MB" in err.value.details()
    assert set(store.list_keys(store.bucket("studies"), "")) == before


@pytest.mark.parametrize("path", ["../escape.dcm", "/abs.dcm", "a/../../b.dcm"])
def test_upload_paths_cannot_escape(gateway, path):
    def messages():
        yield study_pb2.SubmitStudyRequest(header=study_pb2.SubmitHeader(client_request_id="paths"))
        yield study_pb2.SubmitStudyRequest(chunk=study_pb2.FileChunk(path=path, data=b"x"))

    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.SubmitStudy(messages(), timeout=30, metadata=gateway.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_upload_without_dicom_is_invalid(gateway, tmp_path):
    (tmp_path / "notes.txt").write_text("not a DICOM file")
    with pytest.raises(grpc.RpcError) as err:
        gateway.submit_folder(tmp_path, "no-dicom")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StudyInstanceUID" in err.value.details()


@pytest.fixture(scope="module")
def sunnybrook_study(stack_info):
    """The real Sunnybrook study submitted once through the gateway and run to the end."""
    from services.gateway.client import StudyClient

    folder = require(SUNNYBROOK_STUDY)
    client = StudyClient(stack_info.target("gateway"), stack_info.ris_token)
    request_id = f"sunnybrook-{uuid.uuid4().hex[:8]}"
    study = client.submit_folder(folder, request_id, height_m=1.75, weight_kg=80.0)
    events = _finish(client, study.study_id)
    yield study, request_id, events
    client.close()


def test_a_study_travels_every_stage_and_a_report_lands_in_the_store(sunnybrook_study, gateway, store):
    import pydicom

    study, _, events = sunnybrook_study
    first_file = next(SUNNYBROOK_STUDY.glob("*.dcm"))
    assert study.study_instance_uid == pydicom.dcmread(first_file, stop_before_pixels=True).StudyInstanceUID
    stages_seen = {e.stage for e in events}
    assert {common_pb2.STAGE_RECEIVED, common_pb2.STAGE_PREPROCESS, common_pb2.STAGE_SEGMENTATION,
            common_pb2.STAGE_FINDINGS, common_pb2.STAGE_REPORT} <= stages_seen
    assert events[-1].percent == 100.0
    final = gateway.get_study(study.study_id)
    assert final.status == study_pb2.STUDY_STATUS_COMPLETED, [(s.stage, s.error) for s in final.stages]
    assert {s.state for s in final.stages} == {"done"}

    report = gateway.get_report(study.study_id)
    document = json.loads(report.report_json)
    assert document["schema"] == "cmrvl.report/v1" and document["status"] == "completed"
    assert document["study"]["study_instance_uid"] == study.study_instance_uid
    assert store.get_json(report.json.bucket, report.json.key) == document
    assert report.json.bucket == store.bucket("reports") and report.json.key == f"{study.study_id}/report.json"
    assert document["series"] and document["series"][0]["kind"] == "cine_sax"
    assert (document["series"][0]["n_slices"], document["series"][0]["n_phases"]) == (12, 20)
    assert "MEASUREMENTS" in report.report_text and "FINDINGS" in report.report_text
    # The stages before the report, each with its time (the report stage is still running then).
    assert set(document["timings_s"]) == {"preprocess", "segmentation", "findings"}
    assert all(seconds > 0 for seconds in document["timings_s"].values()), document["timings_s"]

    # Measurements from the shipped default model (LV, myocardium, RV), named in the report.
    measurements = document["measurements"]
    assert measurements["lv_edv_ml"] > measurements["lv_esv_ml"] > 0
    assert measurements["rv_edv_ml"] > measurements["rv_esv_ml"] > 0 and measurements["lv_mass_g"] > 0
    assert document["models"]["segmentation"]["default_model"] is True
    assert f"{measurements['lv_edv_ml']:.1f}" in report.report_text

    # One finding per catalog task: cine tasks answered, LGE/T2 tasks not assessable here.
    findings = {f["task_id"]: f for f in document["findings"]}
    assert findings["pericardial_effusion"]["status"] in ("ok", "unparseable")
    assert findings["pericardial_effusion"]["model"]["name"] == "tiny-qwen2.5-vl"
    assert findings["lge"]["status"] == "error" and "not assessable" in findings["lge"]["error"]

    # DICOM outputs a PACS accepts: the SR parses back to the JSON's values, SEGs share the study.
    from services.gateway.dicom_sr import read_sr_measurements

    sr = pydicom.dcmread(io.BytesIO(store.get_bytes(report.sr.bucket, report.sr.key)))
    assert sr.StudyInstanceUID == study.study_instance_uid
    from_sr = read_sr_measurements(sr)
    assert from_sr, "SR carries no measurements"
    for key, value in from_sr.items():
        assert value == pytest.approx(measurements[key], rel=1e-9), key
    assert {"lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g"} <= set(from_sr)
    assert len(report.segs) == 2 and report.seg.key == f"{study.study_id}/seg.dcm"
    referenced = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    for ref in report.segs:
        seg = pydicom.dcmread(io.BytesIO(store.get_bytes(ref.bucket, ref.key)))
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == study.study_instance_uid
        assert seg.SOPInstanceUID in referenced  # the SR's measurements point at both SEGs


def test_sr_and_seg_are_pushed_to_the_pacs(sunnybrook_study, gateway, store, pacs):
    import pydicom

    study, _, _ = sunnybrook_study
    report = gateway.get_report(study.study_id)
    objects = [pydicom.dcmread(io.BytesIO(store.get_bytes(ref.bucket, ref.key))) for ref in (report.sr, *report.segs)]
    stored, series = {ds.SOPInstanceUID for ds in objects}, {ds.SeriesInstanceUID for ds in objects}
    pushed = {}
    for path in (pacs.storage_dir / study.study_instance_uid).glob("*.dcm"):
        dataset = pydicom.dcmread(path)
        if dataset.SeriesInstanceUID in series:  # this run's series (other tests' runs have their own)
            pushed[dataset.SOPInstanceUID] = dataset.Modality
    assert set(pushed) == stored
    assert sorted(pushed.values()) == ["SEG", "SEG", "SR"]
    assert json.loads(report.report_json)["dicom"]["pushed_to"].startswith("PACS@127.0.0.1:")


def test_the_same_submission_twice_is_one_study(sunnybrook_study, gateway, store):
    study, request_id, _ = sunnybrook_study
    again = gateway.submit_folder(SUNNYBROOK_STUDY, request_id)
    assert again.study_id == study.study_id
    assert again.status in TERMINAL
    listed = [s.study_id for s in gateway.stub.ListStudies(study_pb2.ListStudiesRequest(page_size=500),
                                                           metadata=gateway.metadata).studies]
    assert listed.count(study.study_id) == 1


def test_list_filters_by_status_and_pages(sunnybrook_study, gateway):
    study, _, _ = sunnybrook_study
    final = gateway.get_study(study.study_id)
    stub = gateway.stub
    filtered = stub.ListStudies(study_pb2.ListStudiesRequest(status=final.status), metadata=gateway.metadata)
    assert study.study_id in {s.study_id for s in filtered.studies}
    assert all(s.status == final.status for s in filtered.studies)
    other = stub.ListStudies(study_pb2.ListStudiesRequest(status=study_pb2.STUDY_STATUS_CANCELLED),
                             metadata=gateway.metadata)
    assert study.study_id not in {s.study_id for s in other.studies}
    first = stub.ListStudies(study_pb2.ListStudiesRequest(page_size=1), metadata=gateway.metadata)
    assert len(first.studies) == 1


def test_report_of_a_running_or_unknown_study_is_refused(gateway):
    with pytest.raises(grpc.RpcError) as err:
        gateway.get_report("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_stages_come_in_pipeline_order(sunnybrook_study, gateway):
    study, _, _ = sunnybrook_study
    stages = [s.stage for s in gateway.get_study(study.study_id).stages]
    assert stages == [common_pb2.STAGE_PREPROCESS, common_pb2.STAGE_SEGMENTATION, common_pb2.STAGE_FINDINGS,
                      common_pb2.STAGE_REPORT]


def test_a_ris_fetches_sr_and_seg_through_the_gateway(sunnybrook_study, gateway, store, stack_info):
    """The Report's ObjectRefs point into a store a RIS cannot read: GetReportObject streams them."""
    import hashlib

    from services.gateway.client import StudyClient

    study, _, _ = sunnybrook_study
    report = gateway.get_report(study.study_id)
    for ref in (report.sr, *report.segs, report.json):
        name = ref.key.rsplit("/", 1)[1]
        chunks = list(gateway.stub.GetReportObject(study_pb2.GetReportObjectRequest(study_id=study.study_id, name=name),
                                                   metadata=gateway.metadata, timeout=60))
        data = b"".join(c.data for c in chunks)
        assert data == store.get_bytes(ref.bucket, ref.key), name
        assert (chunks[0].size_bytes, chunks[0].sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert chunks[0].content_type == ("application/json" if name.endswith(".json") else "application/dicom")
        if len(data) > 64 * 1024:
            assert len(chunks) > 1  # streamed in parts, not one message
    for name, content_type in (("report.pdf", "application/pdf"), ("contours.png", "image/png")):
        chunks = list(gateway.stub.GetReportObject(study_pb2.GetReportObjectRequest(study_id=study.study_id, name=name),
                                                   metadata=gateway.metadata, timeout=60))
        assert chunks[0].content_type == content_type, name
        assert b"".join(c.data for c in chunks)[:4] == (b"%PDF" if name.endswith(".pdf") else b"\x89PNG")
    assert gateway.get_report_object(study.study_id, "seg_es.dcm") == store.get_bytes(report.segs[1].bucket,
                                                                                      report.segs[1].key)
    with pytest.raises(grpc.RpcError) as err:
        gateway.get_report_object(study.study_id, "../other-study/sr.dcm")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    outsider = StudyClient(stack_info.target("gateway"), "wrong-token")
    try:
        with pytest.raises(grpc.RpcError) as err:
            outsider.get_report_object(study.study_id, "sr.dcm")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        outsider.close()


def test_a_file_name_too_long_for_a_file_system_is_invalid_and_names_no_server_path(gateway):
    def messages():
        yield study_pb2.SubmitStudyRequest(header=study_pb2.SubmitHeader(client_request_id="long-name"))
        yield study_pb2.SubmitStudyRequest(chunk=study_pb2.FileChunk(path="a" * 300 + ".dcm", data=b"x"))

    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.SubmitStudy(messages(), timeout=30, metadata=gateway.metadata)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too long" in err.value.details() and "/tmp" not in err.value.details()


def test_a_reference_is_accepted_in_the_studies_bucket_only(gateway, store, tmp_path):
    from tests.dicom_factory import write_cine_study

    spec = write_cine_study(tmp_path / "dicom", n_slices=2, n_phases=2, rows=8, cols=8)
    prefix = f"references/{uuid.uuid4().hex}/"
    for bucket in (store.bucket("studies"), store.bucket("artifacts")):
        for path in spec.files:
            store.put_file(bucket, prefix + path.name, path)

    def reference(bucket):
        request = study_pb2.SubmitStudyReferenceRequest(client_request_id=prefix,
                                                        dicom_prefix=common_pb2.ObjectRef(bucket=bucket, key=prefix))
        return gateway.stub.SubmitStudyReference(request, timeout=30, metadata=gateway.metadata)

    for bucket in (store.bucket("artifacts"), store.bucket("reports"), "any-other-bucket"):
        with pytest.raises(grpc.RpcError) as err:
            reference(bucket)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, bucket
        assert f"s3://{store.bucket('studies')}/" in err.value.details()
    study = reference(store.bucket("studies"))
    assert study.study_instance_uid == spec.study_instance_uid
    _finish(gateway, study.study_id)


def test_an_interrupted_upload_leaves_no_temp_folder(gateway, stack_info, tmp_path):
    """The upload's folder lives in the gateway's own temp folder and goes when the call ends."""
    import tempfile
    import threading

    root = next(Path(tempfile.gettempdir()).glob(f"cmrvl-proc-{stack_info.pids['gateway']}-*"))
    release = threading.Event()

    def messages():
        yield study_pb2.SubmitStudyRequest(header=study_pb2.SubmitHeader(client_request_id="interrupted"))
        yield study_pb2.SubmitStudyRequest(chunk=study_pb2.FileChunk(path="part.dcm", data=b"x" * 1000))
        release.wait(60)  # the client goes away in the middle of its upload

    call = gateway.stub.SubmitStudy.future(messages(), timeout=60, metadata=gateway.metadata)
    try:
        deadline = time.monotonic() + 30
        while not list(root.glob("cmrvl-upload-*/part.dcm")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(root.glob("cmrvl-upload-*/part.dcm")), "the upload never reached the gateway"
        call.cancel()
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while list(root.glob("cmrvl-upload-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(root.glob("cmrvl-upload-*"))
