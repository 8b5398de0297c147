"""The study workflow on DBOS, on both of its databases (the embedded SQLite file and a real
PostgreSQL cluster started here on loopback): a gateway killed mid-study continues from the
database, two replicas share the studies, a killed replica's studies continue on the other, and a
cancel reaches a study wherever it runs. Real processes throughout (local stack, SeaweedFS)."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from cmrvl.v1 import common_pb2, study_pb2
from tests.conftest import object_store, stage_of, wait_for
from tests.dicom_factory import write_cine_study
from tests.pg_fixtures import postgres_cluster

FINAL = {study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL}


@pytest.fixture(scope="module")
def postgres():
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    """extra_env naming the workflow database: none (the SQLite file in the gateway's state folder)
    or a fresh database in the Postgres cluster."""
    if request.param == "sqlite":
        return {}
    return {"CMRVL_WORKFLOW_DATABASE_URL": request.getfixturevalue("postgres").new_database()}


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    return write_cine_study(tmp_path_factory.mktemp("study") / "dicom", n_slices=4, n_phases=5).files[0].parent


@pytest.fixture()
def engine_stack(tmp_path, database):
    from services.runtime.stack import Stack, free_base_port

    stack = Stack(tmp_path / "stack")
    stack.up(base_port=free_base_port(), extra_env={
        **database, "CMRVL_OUTAGE_RETRY_S": "120", "CMRVL_RETRY_BACKOFF_S": "0.2", "CMRVL_MAX_BACKOFF_S": "1",
        "CMRVL_GATEWAY_REPLICA": "gw-a", "CMRVL_REPLICA_HEARTBEAT_S": "0.5", "CMRVL_REPLICA_DEAD_S": "3"})
    stack.database = database.get("CMRVL_WORKFLOW_DATABASE_URL") or f"sqlite:///{stack.dir / 'gateway' / 'workflow.sqlite'}"
    yield stack
    stack.down()


def _client(target, token):
    from services.gateway.client import StudyClient

    return StudyClient(target, token)




def _workflow_status(stack, study_id: str, run: int = 1):
    """The study's workflow as DBOS has it in the database (read with DBOS's own client)."""
    from dbos import DBOSClient

    client = DBOSClient(system_database_url=stack.database)
    try:
        return client.retrieve_workflow(f"study-{study_id}-run{run}").get_status()
    finally:
        client.destroy()


def test_gateway_killed_mid_study_continues_from_the_workflow_database(engine_stack, small_study):
    info = engine_stack.info()
    engine_stack.stop_service("segmentation")  # the study waits in segmentation's retries
    client = _client(info.target("gateway"), info.ris_token)
    study = client.submit_folder(small_study, f"kill-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: stage_of(client, study.study_id, common_pb2.STAGE_SEGMENTATION).attempts >= 1,
              what="segmentation attempted")
    assert _workflow_status(engine_stack, study.study_id).status == "PENDING"
    client.close()

    engine_stack.stop_service("gateway", signal.SIGKILL)  # a crash: nothing written at exit
    engine_stack.start_service("segmentation")
    engine_stack.start_service("gateway")  # the same replica name: DBOS recovers its workflows

    client = _client(info.target("gateway"), info.ris_token)
    events = list(client.watch(study.study_id, timeout_s=300))
    final = client.get_study(study.study_id)
    client.close()
    assert final.status in FINAL, final.error
    stages = {s.stage: s for s in final.stages}
    assert stages[common_pb2.STAGE_PREPROCESS].attempts == 1  # checkpointed: not run again
    assert stages[common_pb2.STAGE_SEGMENTATION].state == "done"
    assert stages[common_pb2.STAGE_REPORT].attempts == 1
    assert sum(1 for e in events if e.message == "preprocess done") == 1
    assert sum(1 for e in events if e.status in FINAL) == 1
    assert _workflow_status(engine_stack, study.study_id).status == "SUCCESS"


def test_two_replicas_share_studies_and_a_killed_replicas_study_continues_on_the_other(
        engine_stack, small_study):
    info = engine_stack.info()
    engine_stack.stop_service("segmentation")
    a = _client(info.target("gateway"), info.ris_token)
    first = a.submit_folder(small_study, f"shared-{uuid.uuid4().hex[:6]}")  # runs on gw-a (alone so far)
    wait_for(lambda: stage_of(a, first.study_id, common_pb2.STAGE_SEGMENTATION).attempts >= 1,
              what="segmentation attempted on gw-a")
    assert _workflow_status(engine_stack, first.study_id).executor_id == "gw-a"

    b = _client(engine_stack.start_gateway_replica("gw-b"), info.ris_token)
    # Any replica answers about any study, and a submission to one is the same study on the other.
    assert b.get_study(first.study_id).status == a.get_study(first.study_id).status
    again = b.submit_folder(small_study, first.client_request_id)
    assert again.study_id == first.study_id
    # A study submitted to gw-b waits for the one segmentation slot (held by the first study,
    # whichever replica runs it): cancelled through gw-a, it never starts.
    second = b.submit_folder(small_study, f"queued-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: stage_of(b, second.study_id, common_pb2.STAGE_PREPROCESS).state == "done",
              what="second study preprocessed")
    cancelled = a.stub.CancelStudy(study_pb2.CancelStudyRequest(study_id=second.study_id), metadata=a.metadata,
                                   timeout=30)
    assert cancelled.status == study_pb2.STUDY_STATUS_CANCELLED
    a.close()

    engine_stack.stop_service("gateway", signal.SIGKILL)  # gw-a dies and does not come back
    engine_stack.start_service("segmentation")
    events = list(b.watch(first.study_id, timeout_s=300))  # gw-b recovers it once gw-a is silent
    final = b.get_study(first.study_id)
    assert final.status in FINAL, final.error
    assert events[-1].status in FINAL
    assert sum(1 for e in events if e.message == "preprocess done") == 1
    assert {s.stage: s.attempts for s in final.stages}[common_pb2.STAGE_PREPROCESS] == 1
    assert _workflow_status(engine_stack, first.study_id).executor_id == "gw-b"

    time.sleep(2)  # the segmentation slot is free: a wrongly started cancelled study would run now
    assert b.get_study(second.study_id).status == study_pb2.STUDY_STATUS_CANCELLED
    assert stage_of(b, second.study_id, common_pb2.STAGE_SEGMENTATION).attempts == 0
    store = object_store(engine_stack.info())
    assert not list(store.list_keys(store.bucket("artifacts"), f"{second.study_id}/segmentation/"))
    assert _workflow_status(engine_stack, second.study_id).status == "CANCELLED"
    b.close()


def test_an_unreachable_workflow_database_is_one_line_at_start_without_its_password(tmp_path):
    from services.gateway.workflow import Workflow
    from services.runtime.settings import SettingsError, load_settings
    from services.runtime.stack import free_base_port

    closed_port = free_base_port()  # nothing listens there
    settings = load_settings(workflow_database_url=f"postgresql://cmrvl:s3cret@127.0.0.1:{closed_port}/wf",
                             state_dir=str(tmp_path))
    with pytest.raises(SettingsError) as err:
        Workflow(settings, None, None)
    message = str(err.value)
    assert message.startswith("CMRVL_WORKFLOW_DATABASE_URL: workflow database ")
    assert "s3cret" not in message and "\n" not in message
    with pytest.raises(SettingsError, match="CMRVL_WORKFLOW_DATABASE_URL"):
        load_settings(workflow_database_url="mysql://cmrvl@127.0.0.1/wf")
