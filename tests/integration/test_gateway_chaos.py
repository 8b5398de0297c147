"""Bounded chaos on the local stack with two gateway replicas on one workflow database (SQLite and
Postgres): while studies run, a gateway replica, a stage and the object store are killed and
started again. Every study ends exactly once with its report, none is stuck or duplicated, and a
study cancelled meanwhile has no stage output written after its cancel."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest

from cmrvl.v1 import common_pb2, study_pb2
from tests.conftest import object_store, stage_of, wait_for
from tests.dicom_factory import write_cine_study
from tests.test_gateway_workflow_engine import (  # noqa: F401 - fixtures
    FINAL, _client, _workflow_status, database, engine_stack, postgres)

pytestmark = pytest.mark.integration
N_STUDIES = 6


def test_studies_survive_a_killed_replica_stage_and_store(engine_stack, tmp_path):
    info = engine_stack.info()
    folders = [write_cine_study(tmp_path / f"s{i}", n_slices=4, n_phases=5, rows=24, cols=24, seed=i).files[0].parent
               for i in range(N_STUDIES)]
    b_target = engine_stack.start_gateway_replica("gw-b")
    a, b = _client(info.target("gateway"), info.ris_token), _client(b_target, info.ris_token)
    studies = [(a if i % 2 else b).submit_folder(folder, f"chaos-{i}-{uuid.uuid4().hex[:4]}")
               for i, folder in enumerate(folders)]
    victim = b.submit_folder(folders[0], f"chaos-cancel-{uuid.uuid4().hex[:4]}")

    events: dict[str, list] = {}

    def watch(study):
        events[study.study_id] = list(b.watch(study.study_id, timeout_s=600, reconnect_s=120))

    watchers = [threading.Thread(target=watch, args=(s,)) for s in studies]
    for w in watchers:
        w.start()
    wait_for(lambda: any(stage_of(b, s.study_id, common_pb2.STAGE_PREPROCESS).state == "done" for s in studies),
              what="a study past preprocessing")
    assert b.stub.CancelStudy(study_pb2.CancelStudyRequest(study_id=victim.study_id), metadata=b.metadata,
                              timeout=30).status == study_pb2.STUDY_STATUS_CANCELLED
    engine_stack.stop_service("gateway", signal.SIGKILL)  # replica gw-a dies for good
    engine_stack.stop_service("segmentation", signal.SIGKILL)
    time.sleep(3)
    engine_stack.stop_service("s3", signal.SIGKILL)
    time.sleep(3)
    engine_stack.up()  # starts what is missing: the store, segmentation and gw-a again
    for w in watchers:
        w.join(900)
    a.close()

    store = object_store(engine_stack.info())
    for study in studies:
        final = b.get_study(study.study_id)
        assert final.status in FINAL, (study.study_id, final.error)
        got = events[study.study_id]
        assert [e.sequence for e in got] == list(range(len(got)))  # every event once, in order
        assert sum(1 for e in got if e.status in FINAL) == 1  # ended exactly once
        assert sum(1 for e in got if e.message == "preprocess done") == 1  # never run twice
        assert b.get_report(study.study_id).report_json
        assert _workflow_status(engine_stack, study.study_id).status == "SUCCESS"
    record = store.get_json(store.bucket("studies"), f"{victim.study_id}/study.json")
    assert record["status"] == "cancelled"
    assert all(not s["outputs"] for name, s in record["stages"].items() if name != "preprocess"), record["stages"]
    assert record["stages"]["report"]["attempts"] == 0
    # It was cancelled before segmentation could start (one slot, six studies ahead of it).
    assert not list(store.list_keys(store.bucket("artifacts"), f"{victim.study_id}/segmentation/"))
    assert _workflow_status(engine_stack, victim.study_id).status == "CANCELLED"
    b.close()
