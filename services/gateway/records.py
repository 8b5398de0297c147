"""The durable study record: one JSON object a study, `cmrvl-studies/<study_id>/study.json`.

It is the RIS-facing view of a study (status, stages, events, report outputs); the workflow
engine's own state (DBOS, workflow.py) is in the workflow database. `run` counts the runs of a
study (a retry of a failed or cancelled one is the next run)."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone

from services.runtime.storage import ObjectNotFound, ObjectStore, WriteConflict

# Stage names in workflow order, and the overall progress once each is done.
STAGES = ("preprocess", "segmentation", "findings", "report")
PROGRESS_AFTER = {"received": 5.0, "preprocess": 25.0, "segmentation": 60.0, "findings": 85.0, "report": 100.0}
TERMINAL = frozenset({"completed", "partial", "failed", "cancelled"})
log = logging.getLogger("cmrvl.records")
_NAMESPACE = uuid.UUID("6f1d7a52-4c1e-4c55-9d2b-1c7e0b9a4e21")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def study_id_for(study_instance_uid: str, client_request_id: str) -> str:
    """Deterministic id: the same study + client request id is the same submission."""
    if not client_request_id:
        return uuid.uuid4().hex
    return uuid.uuid5(_NAMESPACE, f"{study_instance_uid}\n{client_request_id}").hex


def run_of(record: dict) -> int:
    return record.get("run", 1)


def _fresh_stages() -> dict:
    return {name: {"state": "pending", "attempts": 0, "seconds": 0.0, "error": "", "outputs": {}} for name in STAGES}


def new_record(study_id: str, study_instance_uid: str, client_request_id: str, dicom_prefix: dict,
               height_m: float | None, weight_kg: float | None) -> dict:
    created = now()
    return {
        "schema": "cmrvl.study/v1",
        "study_id": study_id,
        "study_instance_uid": study_instance_uid,
        "client_request_id": client_request_id,
        "dicom_prefix": dicom_prefix,
        "height_m": height_m,
        "weight_kg": weight_kg,
        "run": 1,
        "status": "queued",
        "current_stage": "received",
        "error": "",
        "stages": _fresh_stages(),
        "events": [{"sequence": 0, "stage": "received", "status": "queued",
                    "percent": PROGRESS_AFTER["received"], "message": "study received", "time": created}],
        "created_at": created,
        "updated_at": created,
    }


def restart_record(record: dict, dicom_prefix: dict, height_m: float | None, weight_kg: float | None) -> dict:
    """A failed or cancelled study run again on request: every stage anew, its history kept."""
    previous = record["status"]
    record.update(status="queued", current_stage="received", error="", dicom_prefix=dicom_prefix,
                  height_m=height_m, weight_kg=weight_kg, stages=_fresh_stages(), run=run_of(record) + 1)
    record["events"].append({"sequence": len(record["events"]), "stage": "received", "status": "queued",
                             "percent": PROGRESS_AFTER["received"],
                             "message": f"study submitted again after it was {previous} (run {record['run']})",
                             "time": now()})
    return record


class RecordStore:
    def __init__(self, store: ObjectStore):
        self.store = store
        self.bucket = store.bucket("studies")

    @staticmethod
    def key(study_id: str) -> str:
        return f"{study_id}/study.json"

    def get(self, study_id: str) -> dict | None:
        try:
            return self.store.get_json(self.bucket, self.key(study_id))
        except ObjectNotFound:
            return None

    def get_tagged(self, study_id: str) -> tuple[dict | None, str | None]:
        """The record and its ETag, to write it back with put(record, etag)."""
        try:
            return self.store.get_json_tagged(self.bucket, self.key(study_id))
        except ObjectNotFound:
            return None, None

    def put(self, record: dict, etag: str | None) -> None:
        """Write the record back over the version read with `etag`, or (None) as a new one.
        WriteConflict: another writer (a cancel, another replica) got there first; read again."""
        record["updated_at"] = now()
        self.store.put_json(self.bucket, self.key(record["study_id"]), record, if_match=etag, if_absent=etag is None)

    def update(self, study_id: str, run: int, change) -> dict | None:
        """Read the record, let `change(record)` edit it (False: nothing to write) and write it
        back over the version read; a write that lost to another writer is read and decided
        again. None: no record, another run's, or final (a cancel won)."""
        while True:
            record, etag = self.get_tagged(study_id)
            if record is None or run_of(record) != run or record["status"] in TERMINAL:
                return None
            if change(record) is False:
                return record
            try:
                self.put(record, etag)
                return record
            except WriteConflict:
                continue

    def check_write_conditions(self) -> None:
        """Say it once at start-up if the store ignores conditional writes: concurrent writers
        (a cancel and a stage's end) could then overwrite each other's record."""
        if not self.store.keeps_write_conditions(self.bucket):
            log.warning("the object store ignores conditional writes (If-Match / If-None-Match): "
                        "a study record written by two replicas at once may lose one write; "
                        "MinIO keeps them from RELEASE.2024-05-07 (the chart's is newer), AWS S3 too")

    @staticmethod
    def add_event(record: dict, stage: str, message: str, percent: float | None = None) -> None:
        events = record["events"]
        events.append({
            "sequence": len(events), "stage": stage, "status": record["status"],
            "percent": PROGRESS_AFTER.get(stage, events[-1]["percent"]) if percent is None else percent,
            "message": message, "time": now(),
        })

    def all(self) -> list[dict]:
        records = []
        for prefix in self.store.list_keys(self.bucket, "", recursive=False):
            record = self.get(prefix.rstrip("/"))
            if record is not None:
                records.append(record)
        return records
