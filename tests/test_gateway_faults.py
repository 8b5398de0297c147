"""Faults the gateway rides out or reports, with the real processes of a stack of this module's own:
stage and object-store outages waited out, cancels that reach the running stage, retries of a
failed study, watches that survive a gateway restart, temporary folders that go with their process.

The studies are small synthetic ones (tests/dicom_factory.py), so that each stage takes a moment."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request
import uuid

import grpc
import pydicom
import pytest

from cmrvl.v1 import common_pb2, study_pb2
from tests.conftest import object_store, stage_of, wait_for
from tests.dicom_factory import write_cine_study

FINAL = {study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL}
OUTAGE_RETRY_S = 30  # long enough for every outage made here, short enough to be a test setting


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory):
    """One preprocess slot, so that a second study waits for it; temp folders in a folder of its own."""
    from services.runtime.stack import Stack, free_base_port

    root = tmp_path_factory.mktemp("faults")
    (root / "tmp").mkdir()
    stack = Stack(root / "stack")
    stack.up(base_port=free_base_port(), extra_env={
        "CMRVL_OUTAGE_RETRY_S": str(OUTAGE_RETRY_S), "CMRVL_RETRY_BACKOFF_S": "0.2", "CMRVL_MAX_BACKOFF_S": "1",
        "CMRVL_PREPROCESS_CONCURRENCY": "1", "TMPDIR": str(root / "tmp")})
    stack.tmp = root / "tmp"
    yield stack
    stack.down()


@pytest.fixture()
def client(fault_stack):
    from services.gateway.client import StudyClient

    fault_stack.up()  # whatever an earlier test stopped is started again
    info = fault_stack.info()
    client = StudyClient(info.target("gateway"), info.ris_token)
    yield client
    client.close()


def _segment_calls(stack) -> float:
    """Segment RPCs the segmentation service has finished (its Prometheus counter)."""
    url = f"http://127.0.0.1:{stack.info().base_port + 13}/metrics"
    lines = urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("cmrvl_rpc_total{") and "SegmentationService/Segment" in line)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    return write_cine_study(tmp_path_factory.mktemp("study") / "dicom", n_slices=4, n_phases=5)




def _cancel(client, study_id):
    return client.stub.CancelStudy(study_pb2.CancelStudyRequest(study_id=study_id), metadata=client.metadata,
                                   timeout=30)


def test_a_stage_down_longer_than_the_old_retry_budget_is_waited_out_and_the_watch_survives_a_gateway_restart(
        fault_stack, client, small_study):
    fault_stack.stop_service("segmentation", signal.SIGKILL)
    study = client.submit_folder(small_study.files[0].parent, f"outage-{uuid.uuid4().hex[:6]}")
    events, errors = [], []

    def watch():
        try:
            events.extend(client.watch(study.study_id, timeout_s=180))
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_for(lambda: stage_of(client, study.study_id, common_pb2.STAGE_SEGMENTATION).state == "waiting",
              what="segmentation waiting")
    assert stage_of(client, study.study_id, common_pb2.STAGE_SEGMENTATION).attempts == 1  # saved at its start

    fault_stack.stop_service("gateway", signal.SIGKILL)  # the watch's stream goes with it
    fault_stack.start_service("gateway")

    time.sleep(8)  # more than the old 1.2 s + 2.5 s retry budget, after the gateway's restart
    assert client.get_study(study.study_id).status == study_pb2.STUDY_STATUS_RUNNING
    fault_stack.start_service("segmentation")
    watcher.join(120)
    assert not errors, errors
    assert [e.sequence for e in events] == list(range(len(events)))  # every event once, in order
    assert events[-1].status in FINAL
    final = client.get_study(study.study_id)
    assert final.status in FINAL, final.error
    assert stage_of(client, study.study_id, common_pb2.STAGE_SEGMENTATION).state == "done"


def test_cancel_reaches_the_running_stage_and_nothing_it_returns_is_recorded(fault_stack, client, tmp_path):
    # A larger study: its segmentation takes seconds, time to cancel it.
    spec = write_cine_study(tmp_path / "dicom", n_slices=8, n_phases=8, rows=64, cols=64)
    study = client.submit_folder(spec.files[0].parent, f"cancel-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: stage_of(client, study.study_id, common_pb2.STAGE_SEGMENTATION).state == "running",
              what="segmentation running")
    calls = _segment_calls(fault_stack)
    started = time.monotonic()
    answer = _cancel(client, study.study_id)
    assert answer.status == study_pb2.STUDY_STATUS_CANCELLED
    assert time.monotonic() - started < 3
    # The segmentation service sees its call cancelled; once its handler has returned, the record
    # must still say cancelled with no segmentation output.
    wait_for(lambda: _segment_calls(fault_stack) > calls, 120, "the segmentation handler to return")
    time.sleep(1)
    store = object_store(fault_stack.info())
    record = store.get_json(store.bucket("studies"), f"{study.study_id}/study.json")
    assert record["status"] == "cancelled"
    assert record["stages"]["segmentation"]["outputs"] == {}
    assert record["stages"]["report"]["attempts"] == 0
    assert record["events"][-1]["message"] == "study cancelled"


def test_a_queued_study_that_is_cancelled_never_starts(fault_stack, client, small_study):
    fault_stack.stop_service("preprocess")
    holder = client.submit_folder(small_study.files[0].parent, f"holder-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: stage_of(client, holder.study_id, common_pb2.STAGE_PREPROCESS).state == "waiting",
              what="the first study retrying preprocess")
    queued = client.submit_folder(small_study.files[0].parent, f"queued-{uuid.uuid4().hex[:6]}")
    time.sleep(1)
    waiting = client.get_study(queued.study_id)
    assert waiting.status == study_pb2.STUDY_STATUS_QUEUED  # waiting for the one slot, not running
    assert stage_of(client, queued.study_id, common_pb2.STAGE_PREPROCESS).state == "waiting"
    assert stage_of(client, queued.study_id, common_pb2.STAGE_PREPROCESS).attempts == 0

    assert _cancel(client, queued.study_id).status == study_pb2.STUDY_STATUS_CANCELLED
    assert _cancel(client, holder.study_id).status == study_pb2.STUDY_STATUS_CANCELLED  # cancelled in its backoff
    fault_stack.start_service("preprocess")
    time.sleep(2)
    for study in (queued, holder):
        final = client.get_study(study.study_id)
        assert final.status == study_pb2.STUDY_STATUS_CANCELLED
    assert stage_of(client, queued.study_id, common_pb2.STAGE_PREPROCESS).attempts == 0
    store = object_store(fault_stack.info())
    assert not list(store.list_keys(store.bucket("artifacts"), f"{queued.study_id}/"))


def test_a_failed_study_runs_again_when_resubmitted_with_retry(fault_stack, client, small_study, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_study.files[0].parent, broken)
    for path in broken.glob("*.dcm"):  # no geometry: preprocessing refuses the study (its own fault)
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(path)
    request_id = f"retry-{uuid.uuid4().hex[:6]}"
    failed = client.submit_folder(broken, request_id)
    assert list(client.watch(failed.study_id, timeout_s=60))[-1].status == study_pb2.STUDY_STATUS_FAILED

    again = client.submit_folder(small_study.files[0].parent, request_id)  # no retry: idempotent
    assert (again.study_id, again.status) == (failed.study_id, study_pb2.STUDY_STATUS_FAILED)

    from services.gateway.client import upload_messages

    messages = list(upload_messages(small_study.files[0].parent, request_id))
    messages[0].header.retry = True
    rerun = client.stub.SubmitStudy(iter(messages), metadata=client.metadata, timeout=60)
    assert rerun.study_id == failed.study_id and rerun.status == study_pb2.STUDY_STATUS_QUEUED
    events = list(client.watch(rerun.study_id, timeout_s=120))
    final = client.get_study(rerun.study_id)
    assert final.status in FINAL, final.error
    assert final.error == ""
    assert any(e.message.startswith("study submitted again after it was failed") for e in events)
    assert stage_of(client, rerun.study_id, common_pb2.STAGE_PREPROCESS).attempts == 1  # this run's


def test_object_store_outage_is_unavailable_for_the_ris_and_waited_out_by_the_workflow(
        fault_stack, client, small_study):
    fault_stack.stop_service("segmentation")
    study = client.submit_folder(small_study.files[0].parent, f"store-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: stage_of(client, study.study_id, common_pb2.STAGE_SEGMENTATION).state == "waiting",
              what="segmentation waiting")
    fault_stack.stop_service("s3")
    fault_stack.start_service("segmentation")  # it answers UNAVAILABLE while the store is down
    info = fault_stack.info()
    for call in (lambda: client.get_study(study.study_id),
                 lambda: client.submit_folder(small_study.files[0].parent, f"down-{uuid.uuid4().hex[:6]}")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("object store unavailable")
        assert info.s3_endpoint not in err.value.details() and "127.0.0.1" not in err.value.details()
    time.sleep(2)
    before = dict(fault_stack.info().pids)
    fault_stack.up()  # half running: `up` starts the S3 server again (on its data), and only it
    after = fault_stack.info().pids
    assert set(after) == set(before) | {"s3"} and {k: after[k] for k in before} == before
    events = list(client.watch(study.study_id, timeout_s=120))  # (reconnects while the store starts)
    assert events[-1].status in FINAL, events[-1].message


def test_stage_services_leave_no_temp_folders(fault_stack, client):
    """A drained stage removes its folder at exit; a killed one's is removed by the next start."""
    import os

    from services.runtime import scratch

    pids = fault_stack.info().pids
    killed, live = (wait_for(lambda: list(fault_stack.tmp.glob(f"cmrvl-proc-{pids[name]}-*")), what=name)[0]
                    for name in ("segmentation", "preprocess"))
    fault_stack.stop_service("segmentation", signal.SIGKILL)
    assert killed.exists()  # a killed process cannot clean up
    old = time.time() - scratch.MIN_AGE_S - 1
    for folder in (killed, live):
        os.utime(folder, (old, old))
    fault_stack.stop_service("gateway")
    fault_stack.start_service("gateway")  # its start sweeps the folders of dead processes
    assert not killed.exists()
    assert live.exists()  # a live process's folder stays, however old
    fault_stack.stop_service("preprocess")  # SIGTERM: drained, then its folder goes at exit
    assert not live.exists()
    assert not list(fault_stack.tmp.glob("cmrvl-pre-*")) and not list(fault_stack.tmp.glob("cmrvl-seg-*"))
