"""Pods restart and model servers go away: no study is lost, done twice, or left hanging."""

from __future__ import annotations

import signal
import uuid

import pytest

from cmrvl.v1 import common_pb2, study_pb2
from tests.conftest import wait_for


@pytest.fixture()
def own_stack(tmp_path):
    """A stack of its own: this test kills and restarts its processes."""
    from services.runtime.stack import Stack, free_base_port

    stack = Stack(tmp_path / "stack")
    stack.up(base_port=free_base_port(),
             extra_env={"CMRVL_OUTAGE_RETRY_S": "120", "CMRVL_RETRY_BACKOFF_S": "0.5", "CMRVL_STAGE_TIMEOUT_S": "120"})
    yield stack
    stack.down()


def _client(stack):
    from services.gateway.client import StudyClient

    info = stack.info()
    return StudyClient(info.target("gateway"), info.ris_token)



def test_gateway_killed_mid_study_resumes_without_rerunning_finished_stages(own_stack, small_sunnybrook):
    folder = small_sunnybrook
    own_stack.stop_service("segmentation")  # the next stage is down: the study waits in retries
    client = _client(own_stack)
    study = client.submit_folder(folder, f"restart-{uuid.uuid4().hex[:6]}")

    def stage_state(stage):
        return {s.stage: s for s in client.get_study(study.study_id).stages}[stage]

    wait_for(lambda: stage_state(common_pb2.STAGE_PREPROCESS).state == "done", what="preprocess done")
    wait_for(lambda: stage_state(common_pb2.STAGE_SEGMENTATION).state == "waiting", what="segmentation retrying")
    assert stage_state(common_pb2.STAGE_SEGMENTATION).attempts >= 1  # saved when the attempt started
    client.close()

    own_stack.stop_service("gateway", signal.SIGKILL)  # a crash, not a drain
    own_stack.start_service("segmentation")
    own_stack.start_service("gateway")

    client = _client(own_stack)
    events = list(client.watch(study.study_id, timeout_s=300))
    final = client.get_study(study.study_id)
    client.close()
    assert final.status in (study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL), final.error
    stages = {s.stage: s for s in final.stages}
    assert stages[common_pb2.STAGE_PREPROCESS].attempts == 1  # not re-run after the restart
    assert stages[common_pb2.STAGE_SEGMENTATION].state in ("done", "skipped")
    assert stages[common_pb2.STAGE_REPORT].attempts == 1
    assert sum(1 for e in events if e.message == "preprocess done") == 1
    final_statuses = (study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL)
    assert sum(1 for e in events if e.status in final_statuses) == 1  # completed once


def test_a_stage_that_stays_down_fails_the_study_with_stage_and_reason(tmp_path, small_sunnybrook):
    from services.runtime.stack import Stack, free_base_port

    folder = small_sunnybrook
    stack = Stack(tmp_path / "stack")
    stack.up(base_port=free_base_port(), extra_env={"CMRVL_OUTAGE_RETRY_S": "1", "CMRVL_RETRY_BACKOFF_S": "0.1"})
    try:
        stack.stop_service("preprocess")
        client = _client(stack)
        study = client.submit_folder(folder, "down")
        events = list(client.watch(study.study_id, timeout_s=120))
        final = client.get_study(study.study_id)
        client.close()
    finally:
        stack.down()
    assert final.status == study_pb2.STUDY_STATUS_FAILED
    assert final.error.startswith("preprocess failed: UNAVAILABLE: the preprocess service stayed unavailable for 1s")
    assert "127.0.0.1" not in final.error  # the stage's address stays in the gateway's log
    assert {s.stage: s.attempts for s in final.stages}[common_pb2.STAGE_PREPROCESS] == 1  # one stage run, retried inside
    assert events[-1].status == study_pb2.STUDY_STATUS_FAILED


def test_cancel_stops_a_study_waiting_on_a_down_stage(own_stack, small_sunnybrook):
    folder = small_sunnybrook
    own_stack.stop_service("segmentation")
    client = _client(own_stack)
    study = client.submit_folder(folder, f"cancel-{uuid.uuid4().hex[:6]}")

    def segmentation_waiting():
        stages = {s.stage: s for s in client.get_study(study.study_id).stages}
        return stages[common_pb2.STAGE_SEGMENTATION].state == "waiting"

    wait_for(segmentation_waiting, what="segmentation retrying")
    answer = client.stub.CancelStudy(study_pb2.CancelStudyRequest(study_id=study.study_id), metadata=client.metadata)
    assert answer.status == study_pb2.STUDY_STATUS_CANCELLED  # stopped now, not after the retries
    events = list(client.watch(study.study_id, timeout_s=120))
    final = client.get_study(study.study_id)
    with pytest.raises(Exception) as err:
        client.get_report(study.study_id)
    client.close()
    assert final.status == study_pb2.STUDY_STATUS_CANCELLED
    assert events[-1].message == "study cancelled"
    assert "FAILED_PRECONDITION" in str(err.value.code())


def test_findings_server_down_still_delivers_the_measurements_as_a_partial_report(tmp_path, small_sunnybrook):
    import json

    from services.runtime.stack import Stack, free_base_port

    folder = small_sunnybrook
    stack = Stack(tmp_path / "stack")
    stack.up(base_port=free_base_port(), extra_env={
        "CMRVL_VLM_BASE_URL": "http://127.0.0.1:9/v1", "CMRVL_VLM_MAX_ATTEMPTS": "1",
        "CMRVL_OUTAGE_RETRY_S": "1", "CMRVL_RETRY_BACKOFF_S": "0.1"})
    try:
        client = _client(stack)
        study = client.submit_folder(folder, "vlm-down")
        list(client.watch(study.study_id, timeout_s=600))
        final = client.get_study(study.study_id)
        report = json.loads(client.get_report(study.study_id).report_json)
        client.close()
    finally:
        stack.down()
    assert final.status == study_pb2.STUDY_STATUS_PARTIAL
    stages = {s.stage: s for s in final.stages}
    assert stages[common_pb2.STAGE_SEGMENTATION].state == "done"  # the shipped default model
    assert report["measurements"]["lv_edv_ml"] > 0
    assert stages[common_pb2.STAGE_FINDINGS].state == "skipped"
    assert "UNAVAILABLE" in stages[common_pb2.STAGE_FINDINGS].error
    assert any(q["code"] == "findings_not_run" and "UNAVAILABLE" in q["message"] for q in report["quality"])
