"""Runs studies through the stages: durable, resumable, bounded, with retries.

Each stage's state is written to the study record when it finishes, so a restarted gateway
continues from the last completed stage and never re-runs a finished one. Per-stage semaphores
queue a burst of studies instead of overloading the model servers."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import Counter, Gauge

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from services.gateway.records import STAGES, TERMINAL, RecordStore
from services.runtime.clients import CallAbandoned, call_with_retry, open_channel
from services.runtime.settings import Settings

log = logging.getLogger("cmrvl.workflow")

# A stage that answers FAILED_PRECONDITION has nothing installed to run with (no model):
# the study goes on without it and the report says so (partial).
SKIPPABLE = {"segmentation": {grpc.StatusCode.FAILED_PRECONDITION},
             "findings": "any"}  # findings never block the measurements


STAGE_INFLIGHT = Gauge("cmrvl_stage_inflight", "Studies inside a stage now", ["stage"])
STAGE_INFLIGHT_PEAK = Gauge("cmrvl_stage_inflight_peak", "Most studies inside a stage at once since start", ["stage"])
STUDIES_FINISHED = Counter("cmrvl_studies_finished_total", "Studies that reached a final status", ["status"])


class Cancelled(Exception):
    pass


def _ref(d: dict) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(**d)


def _ref_dict(ref: common_pb2.ObjectRef) -> dict:
    return {"bucket": ref.bucket, "key": ref.key, "sha256": ref.sha256, "size_bytes": ref.size_bytes}


def _model_dict(model: common_pb2.ModelInfo) -> dict:
    return {"name": model.name, "version": model.version, "backend": model.backend}


class Workflow:
    def __init__(self, settings: Settings, records: RecordStore, build_report):
        self.settings, self.records, self.build_report = settings, records, build_report
        self.pool = ThreadPoolExecutor(max_workers=settings.workflow_workers, thread_name_prefix="study")
        self.limits = {
            "preprocess": threading.BoundedSemaphore(settings.preprocess_concurrency),
            "segmentation": threading.BoundedSemaphore(settings.segmentation_concurrency),
            "findings": threading.BoundedSemaphore(settings.findings_concurrency),
            "report": threading.BoundedSemaphore(settings.workflow_workers),
        }
        self._inflight = {stage: 0 for stage in self.limits}
        self._peak = dict(self._inflight)
        self._inflight_lock = threading.Lock()
        self._active: set[str] = set()
        self._active_lock = threading.Lock()
        self._stopping = threading.Event()
        self.channels = {name: open_channel(target, settings.max_message_mb) for name, target in (
            ("preprocess", settings.preprocess_target),
            ("segmentation", settings.segmentation_target),
            ("findings", settings.findings_target),
        )}
        self.stubs = {
            "preprocess": stages_pb2_grpc.PreprocessServiceStub(self.channels["preprocess"]).Preprocess,
            "segmentation": stages_pb2_grpc.SegmentationServiceStub(self.channels["segmentation"]).Segment,
            "findings": stages_pb2_grpc.FindingsServiceStub(self.channels["findings"]).GenerateFindings,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def resume_unfinished(self) -> int:
        """Queue every study a previous gateway left unfinished."""
        unfinished = [r["study_id"] for r in self.records.all() if r["status"] not in TERMINAL]
        for study_id in unfinished:
            self.enqueue(study_id)
        if unfinished:
            log.info("resuming %d unfinished studies", len(unfinished))
        return len(unfinished)

    def enqueue(self, study_id: str) -> None:
        with self._active_lock:
            if study_id in self._active:
                return
            self._active.add(study_id)
        self.pool.submit(self._run_guarded, study_id)

    def stop(self) -> None:
        """Stop taking work; running stages finish, the rest resumes at the next start."""
        self._stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for channel in self.channels.values():
            channel.close()

    # -- one study ---------------------------------------------------------------------------
    def _run_guarded(self, study_id: str) -> None:
        try:
            self.run(study_id)
        except Exception:  # noqa: BLE001 - log and leave the record for the next start
            log.exception("study %s: workflow error", study_id)
        finally:
            with self._active_lock:
                self._active.discard(study_id)

    def run(self, study_id: str) -> None:
        record = self.records.get(study_id)
        if record is None or record["status"] in TERMINAL:
            return
        if record["status"] == "queued":
            record["status"] = "running"
            self.records.put(record)
        try:
            for stage in STAGES:
                state = record["stages"][stage]
                if state["state"] in ("done", "skipped", "failed"):
                    continue  # finished before a restart: never run twice
                if self._stopping.is_set():
                    return
                if self.records.cancel_requested(study_id):
                    raise Cancelled()
                if stage == "findings" and record["stages"]["segmentation"]["state"] != "done":
                    state.update(state="skipped", error="needs the segmentation masks")
                    self.records.add_event(record, stage, "findings skipped: no segmentation masks")
                    continue
                self._run_stage(record, stage)
                if record["status"] == "failed":
                    return
            skipped = [s for s in STAGES if record["stages"][s]["state"] in ("skipped", "failed")]
            record["status"] = "partial" if skipped else "completed"
            STUDIES_FINISHED.labels(record["status"]).inc()
            record["current_stage"] = "report"
            self.records.add_event(record, "report", f"study {record['status']}"
                                   + (f" (without {', '.join(skipped)})" if skipped else ""), 100.0)
        except Cancelled:
            record["status"] = "cancelled"
            STUDIES_FINISHED.labels("cancelled").inc()
            self.records.add_event(record, record["current_stage"], "study cancelled")

    def _run_stage(self, record: dict, stage: str) -> None:
        state = record["stages"][stage]
        state["state"] = "running"
        record["current_stage"] = stage
        self.records.add_event(record, stage, f"{stage} started", percent=record["events"][-1]["percent"])
        started = time.perf_counter()
        try:
            with self.limits[stage], self._inside(stage):
                state["attempts"] += 1
                outputs = self._call(record, stage)
            state.update(state="done", outputs=outputs)
            message = f"{stage} done"
        except CallAbandoned:
            state.update(state="pending", seconds=round(state["seconds"] + time.perf_counter() - started, 3))
            raise Cancelled() from None
        except grpc.RpcError as exc:
            state["error"] = f"{exc.code().name}: {exc.details()}"
            skippable = SKIPPABLE.get(stage)
            if skippable == "any" or (skippable and exc.code() in skippable):
                state["state"] = "skipped"
                message = f"{stage} skipped: {state['error']}"
            else:
                state["state"] = "failed"
                record["status"] = "failed"
                record["error"] = f"{stage} failed: {state['error']}"
                message = record["error"]
        except Exception as exc:  # noqa: BLE001 - the report stage runs here, in-process
            state.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            record["status"] = "failed"
            record["error"] = f"{stage} failed: {state['error']}"
            message = record["error"]
            log.exception("study %s: %s", record["study_id"], stage)
        state["seconds"] = round(state["seconds"] + time.perf_counter() - started, 3)
        self.records.add_event(record, stage, message)

    @contextlib.contextmanager
    def _inside(self, stage: str):
        with self._inflight_lock:
            self._inflight[stage] += 1
            STAGE_INFLIGHT.labels(stage).set(self._inflight[stage])
            self._peak[stage] = max(self._peak[stage], self._inflight[stage])
            STAGE_INFLIGHT_PEAK.labels(stage).set(self._peak[stage])
        try:
            yield
        finally:
            with self._inflight_lock:
                self._inflight[stage] -= 1
                STAGE_INFLIGHT.labels(stage).set(self._inflight[stage])

    def _call(self, record: dict, stage: str) -> dict:
        """Run one stage; returns what later stages need (object refs, model identities)."""
        if stage == "report":
            return self.build_report(record)
        outputs = {name: s["outputs"] for name, s in record["stages"].items()}
        study_id = record["study_id"]
        if stage == "preprocess":
            request = stages_pb2.PreprocessRequest(study_id=study_id, dicom_prefix=_ref(record["dicom_prefix"]))
        elif stage == "segmentation":
            request = stages_pb2.SegmentRequest(study_id=study_id, manifest=_ref(outputs["preprocess"]["manifest"]))
            if record.get("height_m") is not None:
                request.height_m = record["height_m"]
            if record.get("weight_kg") is not None:
                request.weight_kg = record["weight_kg"]
        else:
            request = stages_pb2.FindingsRequest(study_id=study_id, manifest=_ref(outputs["preprocess"]["manifest"]),
                                                 labels=_ref(outputs["segmentation"]["labels"]))
        response = call_with_retry(
            self.stubs[stage], request, timeout_s=self.settings.stage_timeout_s,
            token=self.settings.internal_token, attempts=self.settings.stage_attempts,
            backoff_s=self.settings.retry_backoff_s, what=f"{study_id} {stage}",
            still_wanted=lambda: not self.records.cancel_requested(study_id),
        )
        result = {}
        for field, value in response.ListFields():
            if isinstance(value, common_pb2.ObjectRef):
                result[field.name] = _ref_dict(value)
            elif isinstance(value, common_pb2.ModelInfo):
                result[field.name] = _model_dict(value)
            elif field.label != field.LABEL_REPEATED:
                result[field.name] = value
            else:
                result[field.name] = list(value)
        if stage == "preprocess" and result.get("study_instance_uid"):
            record["study_instance_uid"] = result["study_instance_uid"]
        return result
