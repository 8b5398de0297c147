"""StudyService: the RIS-facing API (see proto/cmrvl/v1/study.proto)."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import threading
import time
from pathlib import Path, PurePosixPath

import grpc

from cmrvl.v1 import common_pb2, study_pb2, study_pb2_grpc
from services.gateway.records import (STAGES, TERMINAL, RecordStore, WriteConflict, new_record, restart_record,
                                      run_of, study_id_for)
from services.gateway.workflow import Workflow
from services.runtime import scratch
from services.runtime.errors import StageError, grpc_errors, status_for
from services.runtime.settings import Settings
from services.runtime.storage import ObjectStore

log = logging.getLogger("cmrvl.gateway")

STATUS = {
    "queued": study_pb2.STUDY_STATUS_QUEUED, "running": study_pb2.STUDY_STATUS_RUNNING,
    "completed": study_pb2.STUDY_STATUS_COMPLETED, "partial": study_pb2.STUDY_STATUS_PARTIAL,
    "failed": study_pb2.STUDY_STATUS_FAILED, "cancelled": study_pb2.STUDY_STATUS_CANCELLED,
}
STATUS_NAME = {v: k for k, v in STATUS.items()}
STAGE = {
    "received": common_pb2.STAGE_RECEIVED, "preprocess": common_pb2.STAGE_PREPROCESS,
    "segmentation": common_pb2.STAGE_SEGMENTATION, "findings": common_pb2.STAGE_FINDINGS,
    "report": common_pb2.STAGE_REPORT,
}
WATCH_POLL_S = 0.3
# Each open WatchStudy stream holds a worker thread for its study's whole run; a quarter of the
# threads stays for every other call, so that watchers cannot starve GetStudy and SubmitStudy.
WATCH_SHARE_OF_WORKERS = 0.75
REPORT_CHUNK_BYTES = 64 * 1024  # well under gRPC's default 4 MiB message limit
CONTENT_TYPES = {".dcm": "application/dicom", ".json": "application/json", ".txt": "text/plain",
                 ".pdf": "application/pdf", ".png": "image/png"}
MAX_NAME_BYTES = 255  # one path component (file systems' NAME_MAX)
MAX_PATH_BYTES = 900  # the whole relative path: S3 keys are at most 1024 bytes with the study prefix
RETRYABLE_ENDS = ("failed", "cancelled")


def study_message(record: dict) -> study_pb2.Study:
    return study_pb2.Study(
        study_id=record["study_id"], study_instance_uid=record.get("study_instance_uid", ""),
        client_request_id=record.get("client_request_id", ""), status=STATUS[record["status"]],
        current_stage=STAGE[record["current_stage"]], error=record.get("error", ""),
        created_at=record["created_at"], updated_at=record["updated_at"],
        stages=[study_pb2.StageRecord(stage=STAGE[name], state=s["state"], attempts=s["attempts"],
                                      seconds=s["seconds"], error=s["error"])
                # Pipeline order: the stored record's keys come back sorted by name.
                for name, s in sorted(record["stages"].items(), key=lambda item: _stage_order(item[0]))],
    )


def _stage_order(name: str) -> int:
    return STAGES.index(name) if name in STAGES else len(STAGES)


def event_message(record: dict, event: dict) -> study_pb2.StudyEvent:
    return study_pb2.StudyEvent(
        study_id=record["study_id"], sequence=event["sequence"], stage=STAGE[event["stage"]],
        status=STATUS[event["status"]], percent=event["percent"], message=event["message"], time=event["time"],
    )


def safe_relative_path(path: str) -> str:
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if not parts or path.startswith("/") or "\0" in path or any(p in ("..", "") for p in parts):
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid file path in upload: {path!r}")
    if max(len(p.encode()) for p in parts) > MAX_NAME_BYTES or len(path.encode()) > MAX_PATH_BYTES:
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"file path in upload too long (a name at most {MAX_NAME_BYTES} bytes, the path "
                         f"{MAX_PATH_BYTES}): {path[:60]!r}...")
    return "/".join(parts)


def study_instance_uid_of(files) -> str:
    """The one StudyInstanceUID of a set of files (paths or bytes); errors if none or several."""
    import pydicom

    uids = set()
    for item in files:
        source = io.BytesIO(item) if isinstance(item, bytes) else item
        try:
            dataset = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - non-DICOM files are reported by preprocessing
            continue
        if getattr(dataset, "StudyInstanceUID", None):
            uids.add(str(dataset.StudyInstanceUID))
    if not uids:
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "no DICOM file with a StudyInstanceUID in the submission")
    if len(uids) > 1:
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"submission mixes {len(uids)} studies; send one study per call")
    return uids.pop()


class StudyServicer(study_pb2_grpc.StudyServiceServicer):
    def __init__(self, settings: Settings, store: ObjectStore, records: RecordStore, workflow: Workflow):
        self.settings, self.store, self.records, self.workflow = settings, store, records, workflow
        self.max_upload_bytes = settings.max_upload_mb * 1024 * 1024
        self.max_watchers = max(1, int(settings.grpc_workers * WATCH_SHARE_OF_WORKERS))
        self._watch_slots = threading.BoundedSemaphore(self.max_watchers)
        scratch.process_root()  # at start: removes what killed processes left in the temp folder

    def _existing_or_new(self, study_uid: str, client_request_id: str, upload, height, weight,
                         retry: bool = False) -> dict:
        study_id = study_id_for(study_uid, client_request_id)
        dicom_prefix = None
        while True:
            existing, etag = self.records.get_tagged(study_id)
            if existing is not None and not (retry and existing["status"] in RETRYABLE_ENDS):
                log.info("submission %s for study %s already exists", client_request_id, study_id)
                if existing["status"] not in TERMINAL:  # (idempotent) in case a crash lost its enqueue
                    self.workflow.enqueue(study_id, run_of(existing))
                return existing
            if dicom_prefix is None:
                dicom_prefix = upload(study_id)
            if existing is not None:
                log.info("study %s: run again after it was %s", study_id, existing["status"])
                record = restart_record(existing, dicom_prefix, height, weight)
            else:
                record = new_record(study_id, study_uid, client_request_id, dicom_prefix, height, weight)
            try:
                self.records.put(record, etag)  # from now on the study (run) exists; it starts below
            except WriteConflict:
                continue  # the same submission came through another call (or replica) meanwhile
            self.workflow.enqueue(study_id, record["run"])
            return record

    @grpc_errors
    def SubmitStudy(self, request_iterator, context):
        header, total = None, 0
        tmp = scratch.mkdtemp("cmrvl-upload-")  # removed below; after a kill, by the next start
        try:
            for message in request_iterator:
                if message.HasField("header"):
                    if header is not None:
                        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "header sent twice")
                    header = message.header
                    continue
                if header is None:
                    raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the header")
                total += len(message.chunk.data)
                if total > self.max_upload_bytes:
                    raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"upload exceeds the limit of {self.settings.max_upload_mb} MB; nothing was stored")
                target = tmp / safe_relative_path(message.chunk.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "ab") as handle:
                    handle.write(message.chunk.data)
            if header is None:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            study_uid = study_instance_uid_of(files)

            def upload(study_id: str) -> dict:
                bucket, prefix = self.store.bucket("studies"), f"{study_id}/dicom/"
                self.store.delete_prefix(bucket, prefix)  # a retry's files replace the earlier run's
                self.store.upload_folder(tmp, bucket, prefix)
                return {"bucket": bucket, "key": prefix}

            record = self._existing_or_new(
                study_uid, header.client_request_id, upload,
                header.height_m if header.HasField("height_m") else None,
                header.weight_kg if header.HasField("weight_kg") else None,
                retry=header.retry,
            )
            return study_message(record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @grpc_errors
    def SubmitStudyReference(self, request, context):
        bucket, prefix = request.dicom_prefix.bucket, request.dicom_prefix.key
        if not bucket or not prefix.endswith("/"):
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "dicom_prefix needs a bucket and a key ending in '/'")
        # Only where studies are meant to be, not anything the gateway's credentials can read.
        allowed = self.settings.allowed_reference_prefixes
        if not any(f"{bucket}/{prefix}".startswith(a if "/" in a else a + "/") for a in allowed):
            raise StageError(grpc.StatusCode.PERMISSION_DENIED,
                             f"s3://{bucket}/{prefix} is outside the prefixes studies may be referenced from "
                             f"({', '.join('s3://' + a for a in allowed)})")
        keys = list(self.store.list_keys(bucket, prefix))
        if not keys:
            raise StageError(grpc.StatusCode.NOT_FOUND, f"no objects under s3://{bucket}/{prefix}")
        # Reading a few headers is enough to identify the study; preprocessing checks the rest.
        study_uid = study_instance_uid_of(self.store.get_bytes(bucket, key) for key in keys[:8])
        record = self._existing_or_new(
            study_uid, request.client_request_id, lambda _id: {"bucket": bucket, "key": prefix},
            request.height_m if request.HasField("height_m") else None,
            request.weight_kg if request.HasField("weight_kg") else None,
            retry=request.retry,
        )
        return study_message(record)

    def _record(self, study_id: str) -> dict:
        record = self.records.get(study_id) if study_id else None
        if record is None:
            raise StageError(grpc.StatusCode.NOT_FOUND, f"unknown study {study_id!r}")
        return record

    @grpc_errors
    def GetStudy(self, request, context):
        return study_message(self._record(request.study_id))

    def WatchStudy(self, request, context):
        try:
            record = self._record(request.study_id)
        except Exception as exc:  # noqa: BLE001 - a stream's failure reaches the caller as its status
            context.abort(status_for(exc), str(exc) or type(exc).__name__)
        if not self._watch_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_watchers} WatchStudy streams are open, the most this gateway serves at once "
                          f"(the rest of its {self.settings.grpc_workers} worker threads stays for other calls): "
                          "watch again later, or poll GetStudy")
        try:
            sent = 0
            while context.is_active():
                for event in record["events"][sent:]:
                    yield event_message(record, event)
                sent = len(record["events"])
                if record["status"] in TERMINAL:  # the final event was written with the final status
                    return
                time.sleep(WATCH_POLL_S)
                try:
                    record = self.records.get(request.study_id) or record
                except ConnectionError:  # the store is out of reach for a moment: the stream waits
                    pass
        finally:
            self._watch_slots.release()

    @grpc_errors
    def GetReport(self, request, context):
        record = self._record(request.study_id)
        if record["status"] not in ("completed", "partial"):
            raise StageError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"study is {record['status']}" + (f": {record['error']}" if record["error"] else ""))
        outputs = record["stages"]["report"]["outputs"]
        report = study_pb2.Report(study_id=record["study_id"], status=STATUS[record["status"]])
        for name in ("json", "text", "sr", "seg"):
            if name in outputs:
                getattr(report, name).CopyFrom(common_pb2.ObjectRef(**outputs[name]))
        report.segs.extend(common_pb2.ObjectRef(**ref) for name, ref in sorted(outputs.items())
                           if name.startswith("seg"))
        report.report_json = self.store.get_bytes(outputs["json"]["bucket"], outputs["json"]["key"]).decode()
        report.report_text = self.store.get_bytes(outputs["text"]["bucket"], outputs["text"]["key"]).decode()
        return report

    def _report_object(self, request) -> tuple[bytes, str]:
        record = self._record(request.study_id)
        if record["status"] not in ("completed", "partial"):
            raise StageError(grpc.StatusCode.FAILED_PRECONDITION, f"study is {record['status']}")
        refs = {ref["key"].rsplit("/", 1)[-1]: ref for ref in record["stages"]["report"]["outputs"].values()}
        if request.name not in refs:
            raise StageError(grpc.StatusCode.NOT_FOUND, f"study {request.study_id} has no report object "
                                                        f"{request.name!r} (it has {sorted(refs)})")
        ref = refs[request.name]
        return self.store.get_bytes(ref["bucket"], ref["key"]), CONTENT_TYPES.get(Path(request.name).suffix, "")

    def GetReportObject(self, request, context):
        try:
            data, content_type = self._report_object(request)
        except Exception as exc:  # noqa: BLE001 - a stream's failure reaches the caller as its status
            context.abort(status_for(exc), str(exc) or type(exc).__name__)
        yield study_pb2.ReportObjectChunk(data=data[:REPORT_CHUNK_BYTES], content_type=content_type,
                                          size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        for start in range(REPORT_CHUNK_BYTES, len(data), REPORT_CHUNK_BYTES):
            yield study_pb2.ReportObjectChunk(data=data[start:start + REPORT_CHUNK_BYTES])

    @grpc_errors
    def ListStudies(self, request, context):
        page_size = min(request.page_size or 50, 500)
        offset = int(request.page_token or 0)
        records = sorted(self.records.all(), key=lambda r: r["created_at"], reverse=True)
        if request.status:
            records = [r for r in records if r["status"] == STATUS_NAME[request.status]]
        page = records[offset:offset + page_size]
        next_token = str(offset + page_size) if offset + page_size < len(records) else ""
        return study_pb2.ListStudiesResponse(studies=[study_message(r) for r in page], next_page_token=next_token)

    @grpc_errors
    def CancelStudy(self, request, context):
        record = self._record(request.study_id)
        if record["status"] not in TERMINAL:
            self.workflow.cancel(record["study_id"], run_of(record))
            record = self.records.get(record["study_id"]) or record
        return study_message(record)
