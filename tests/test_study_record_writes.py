"""The study record is written only over the version its writer read (S3 conditional writes on
the real SeaweedFS of the local stack): a cancel and a stage's end racing each other, two
replicas writing events at once, or one submission arriving twice never lose a write or
overwrite a final record."""

from __future__ import annotations

import threading
import uuid

import pytest

from services.gateway.records import RecordStore, WriteConflict, new_record


@pytest.fixture()
def records(store):
    return RecordStore(store)


def _new(records: RecordStore) -> dict:
    record = new_record(uuid.uuid4().hex, "1.2.3", "req", {"bucket": "b", "key": "k"}, None, None)
    records.put(record, None)
    return record


def test_a_write_over_a_version_someone_else_replaced_is_refused(records):
    record = _new(records)
    with pytest.raises(WriteConflict):
        records.put(dict(record), None)  # the same study created twice
    mine, etag = records.get_tagged(record["study_id"])
    theirs, their_etag = records.get_tagged(record["study_id"])
    theirs["status"] = "cancelled"
    records.put(theirs, their_etag)
    mine["stages"]["segmentation"]["state"] = "done"
    with pytest.raises(WriteConflict):
        records.put(mine, etag)
    assert records.get(record["study_id"])["stages"]["segmentation"]["state"] == "pending"


def test_a_stage_end_that_loses_the_race_to_a_cancel_leaves_the_cancelled_record(records):
    study_id = _new(records)["study_id"]
    calls = []

    def stage_done(record: dict) -> None:
        calls.append(1)
        if len(calls) == 1:  # between this writer's read and its write, a cancel lands
            records.update(study_id, 1, lambda r: r.update(status="cancelled"))
        record["stages"]["segmentation"].update(state="done", outputs={"labels": "x"})

    assert records.update(study_id, 1, stage_done) is None  # read again: final, nothing written
    final = records.get(study_id)
    assert final["status"] == "cancelled"
    assert final["stages"]["segmentation"] == {"state": "pending", "attempts": 0, "seconds": 0.0, "error": "",
                                               "outputs": {}}
    assert len(calls) == 1


def test_replicas_writing_events_at_once_lose_none(records):
    study_id = _new(records)["study_id"]
    writers, events_each = 4, 8

    def write(name: str) -> None:
        for i in range(events_each):
            records.update(study_id, 1, lambda r: records.add_event(r, "preprocess", f"{name} {i}"))

    threads = [threading.Thread(target=write, args=(f"replica-{n}",)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events = records.get(study_id)["events"]
    assert len(events) == 1 + writers * events_each
    assert [e["sequence"] for e in events] == list(range(len(events)))
    assert {e["message"] for e in events[1:]} == {f"replica-{n} {i}" for n in range(writers)
                                                  for i in range(events_each)}


def test_the_store_keeps_write_conditions(store):
    assert store.keeps_write_conditions(store.bucket("studies"))
