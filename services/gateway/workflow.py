"""Runs studies through the stages: durable, resumable, bounded, with retries.

Each stage's state is written to the study record when it finishes (and each attempt when it
starts), so a restarted gateway continues from the last completed stage and never re-runs a
finished one. Per-stage semaphores queue a burst of studies instead of overloading the model
servers. Outages (a stage or the object store unreachable) are waited out for
`outage_retry_s`; a study fails only for its own reason or after that. A cancel reaches the
stage call in flight."""

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
from services.runtime.clients import Backoff, CallAbandoned, call_with_retry, open_channel
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


class _Stopping(Exception):
    """The gateway is shutting down: leave the study for the next start."""


class _Abandon:
    """What a study's stage calls and waits watch: a cancel of the study, or the gateway stopping.
    Quacks like the threading.Event that call_with_retry takes."""

    def __init__(self, stopping: threading.Event):
        self.cancelled, self.stopping = threading.Event(), stopping

    def is_set(self) -> bool:
        return self.cancelled.is_set() or self.stopping.is_set()

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_set() and time.monotonic() < deadline:
            self.cancelled.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.is_set()


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
        # Per study: who may write its record now (the run, or a cancel of a study not running)
        # and what its calls watch to stop.
        self._owners: dict[str, threading.Lock] = {}
        self._abandon: dict[str, _Abandon] = {}
        self._again: set[str] = set()
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

    def enqueue(self, study_id: str, fresh: bool = False) -> None:
        """Run a study (once at a time). `fresh`: a new run of a study that ended (a retry), which
        an earlier cancel no longer concerns."""
        with self._active_lock:
            if fresh:
                self._abandon.pop(study_id, None)
            if study_id in self._active:
                self._again.add(study_id)  # its thread is ending: it runs the study once more
                return
            self._active.add(study_id)
        self.pool.submit(self._run_guarded, study_id)

    def stop(self) -> None:
        """Stop: stage calls in flight are cancelled and waits end; every unfinished study resumes
        at the next start from its last completed stage (stage outputs have fixed keys)."""
        self._stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for channel in self.channels.values():
            channel.close()

    def _owner(self, study_id: str) -> threading.Lock:
        with self._active_lock:
            return self._owners.setdefault(study_id, threading.Lock())

    def _abandon_of(self, study_id: str) -> _Abandon:
        with self._active_lock:
            return self._abandon.setdefault(study_id, _Abandon(self._stopping))

    def cancel(self, study_id: str) -> None:
        """Stop a study now (the caller has written the durable cancel marker): its stage call in
        flight is cancelled, its waits end; a study no thread is running is marked cancelled here."""
        self._abandon_of(study_id).cancelled.set()
        owner = self._owner(study_id)
        if owner.acquire(blocking=False):  # no run holds it: queued, or left by a stopped gateway
            try:
                record = self.records.get(study_id)
                if record is not None and record["status"] not in TERMINAL:
                    self._mark_cancelled(record, retry_write=False)
            finally:
                owner.release()

    # -- one study ---------------------------------------------------------------------------
    def _run_guarded(self, study_id: str) -> None:
        # The object store out of reach (the record cannot be read or written) is waited out:
        # the study runs on from its stored record once the store is back, never left hanging.
        backoff = Backoff(self.settings.retry_backoff_s, self.settings.max_backoff_s, float("inf"))
        try:
            while not self._stopping.is_set():
                try:
                    self.run(study_id)
                    return
                except _Stopping:
                    return  # resumed at the next start
                except ConnectionError as exc:
                    delay = backoff.next_delay()
                    log.warning("study %s: %s; trying again in %.1fs", study_id, exc, delay)
                    self._stopping.wait(delay)
                except Exception as exc:  # noqa: BLE001 - a bug: fail the study rather than leave it running
                    log.exception("study %s: workflow error", study_id)
                    self._fail_unexpected(study_id, exc)
                    return
        finally:
            with self._active_lock:
                again = study_id in self._again and not self._stopping.is_set()
                self._again.discard(study_id)
                if not again:
                    self._active.discard(study_id)
                    self._owners.pop(study_id, None)
                    self._abandon.pop(study_id, None)
            if again:
                self.pool.submit(self._run_guarded, study_id)

    def _fail_unexpected(self, study_id: str, exc: Exception) -> None:
        try:
            with self._owner(study_id):
                record = self.records.get(study_id)
                if record is not None and record["status"] not in TERMINAL:
                    record["status"], record["error"] = "failed", f"gateway error: {type(exc).__name__}: {exc}"
                    STUDIES_FINISHED.labels("failed").inc()
                    self.records.add_event(record, record["current_stage"], record["error"])
        except Exception:  # noqa: BLE001 - the next start resumes it
            log.exception("study %s: could not record the failure", study_id)

    def _mark_cancelled(self, record: dict, retry_write: bool = True) -> None:
        record["status"] = "cancelled"
        for state in record["stages"].values():
            if state["state"] in ("running", "waiting"):
                state["state"] = "pending"
        STUDIES_FINISHED.labels("cancelled").inc()
        if retry_write:
            self._commit(record, record["current_stage"], "study cancelled")
        else:  # a RIS call: it answers UNAVAILABLE instead (the marker stays for the run)
            self.records.add_event(record, record["current_stage"], "study cancelled")

    def _commit(self, record: dict, stage: str, message: str, percent: float | None = None) -> None:
        """An event that must be kept (a stage's or the study's end): its write is retried in place
        until the store takes it, so that the stage's work is not done again."""
        self.records.add_event(record, stage, message, percent, save=False)
        backoff = Backoff(self.settings.retry_backoff_s, self.settings.max_backoff_s, float("inf"))
        while True:
            try:
                self.records.put(record)
                return
            except ConnectionError as exc:
                delay = backoff.next_delay()
                log.warning("study %s: record not written (%s); trying again in %.1fs", record["study_id"], exc, delay)
                if self._stopping.wait(delay):
                    raise _Stopping() from None

    def _save(self, record: dict) -> None:
        """Progress worth keeping (an attempt started, a wait): kept if the store takes it now."""
        try:
            self.records.put(record)
        except ConnectionError as exc:
            log.warning("study %s: progress not saved: %s", record["study_id"], exc)

    def run(self, study_id: str) -> None:
        with self._owner(study_id):
            record = self.records.get(study_id)
            if record is None or record["status"] in TERMINAL:
                return
            abandon = self._abandon_of(study_id)
            if self.records.cancel_requested(study_id):
                abandon.cancelled.set()
            try:
                self._run_stages(record, abandon)
            except Cancelled:
                self._mark_cancelled(record)
            except _Stopping:
                log.info("study %s: left for the next start", study_id)

    def _run_stages(self, record: dict, abandon: _Abandon) -> None:
        for stage in STAGES:
            state = record["stages"][stage]
            if state["state"] in ("done", "skipped", "failed"):
                continue  # finished before a restart: never run twice
            if abandon.cancelled.is_set():
                raise Cancelled()
            if self._stopping.is_set():
                raise _Stopping()
            if stage == "findings" and record["stages"]["segmentation"]["state"] != "done":
                state.update(state="skipped", error="needs the segmentation masks")
                self.records.add_event(record, stage, "findings skipped: no segmentation masks")
                continue
            self._run_stage(record, stage, abandon)
            if record["status"] == "failed":
                return
        skipped = [s for s in STAGES if record["stages"][s]["state"] in ("skipped", "failed")]
        record["status"] = "partial" if skipped else "completed"
        STUDIES_FINISHED.labels(record["status"]).inc()
        record["current_stage"] = "report"
        self._commit(record, "report", f"study {record['status']}"
                     + (f" (without {', '.join(skipped)})" if skipped else ""), 100.0)

    def _acquire(self, stage: str, abandon: _Abandon) -> None:
        """A slot of the stage, waiting as long as it takes unless cancelled or stopping."""
        while not self.limits[stage].acquire(timeout=0.2):
            if abandon.cancelled.is_set():
                raise Cancelled()
            if abandon.stopping.is_set():
                raise _Stopping()

    def _run_stage(self, record: dict, stage: str, abandon: _Abandon) -> None:
        state = record["stages"][stage]
        record["current_stage"] = stage
        state.update(state="waiting", error="")
        self._save(record)  # waiting for a slot: shown as such, not as running
        spent = {"since": None}  # when this run's first attempt started

        def clock() -> float:
            return round(state["seconds"] + (time.perf_counter() - spent["since"] if spent["since"] else 0.0), 3)

        def on_attempt() -> None:  # saved when the stage run starts (a crash does not lose it)
            if spent["since"] is None:
                spent["since"] = time.perf_counter()
                state.update(state="running", attempts=state["attempts"] + 1)
                if record["status"] == "queued":
                    record["status"] = "running"
                self.records.add_event(record, stage, f"{stage} started", percent=record["events"][-1]["percent"])
            elif state["state"] != "running":  # a retry inside this run, after a wait
                state.update(state="running")
                self._save({**record, "stages": {**record["stages"], stage: {**state, "seconds": clock()}}})

        def on_wait(delay_s: float, reason: str) -> None:
            state.update(state="waiting", error=f"retrying in {delay_s:.1f}s: {reason}")
            self._save({**record, "stages": {**record["stages"], stage: {**state, "seconds": clock()}}})

        try:
            self._acquire(stage, abandon)
            try:
                with self._inside(stage):
                    outputs = self._call(record, stage, abandon, on_attempt, on_wait)
            finally:
                self.limits[stage].release()
            if abandon.cancelled.is_set():
                raise CallAbandoned(stage)  # cancelled while it ran: its output is not recorded
            state.update(state="done", outputs=outputs, error="")
            message = f"{stage} done"
        except CallAbandoned:
            state.update(state="pending", seconds=clock())
            if abandon.cancelled.is_set():
                raise Cancelled() from None
            self._save(record)
            raise _Stopping() from None
        except grpc.RpcError as exc:
            state["error"] = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the details name the stage's address
                log.warning("study %s: %s unavailable: %s", record["study_id"], stage, exc.details())
                state["error"] = (f"UNAVAILABLE: the {stage} service stayed unavailable for "
                                  f"{self.settings.outage_retry_s:g}s")
            skippable = SKIPPABLE.get(stage)
            if skippable == "any" or (skippable and exc.code() in skippable):
                state["state"] = "skipped"
                message = f"{stage} skipped: {state['error']}"
            else:
                state["state"] = "failed"
                record["status"] = "failed"
                record["error"] = f"{stage} failed: {state['error']}"
                message = record["error"]
        except (Cancelled, _Stopping):  # while waiting for a slot
            state.update(state="pending", seconds=clock())
            raise
        except ConnectionError:
            state.update(state="pending", seconds=clock())
            raise  # the object store (report stage): waited out by _run_guarded
        except Exception as exc:  # noqa: BLE001 - the report stage runs here, in-process
            state.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            record["status"] = "failed"
            record["error"] = f"{stage} failed: {state['error']}"
            message = record["error"]
            log.exception("study %s: %s", record["study_id"], stage)
        state["seconds"] = clock()
        self._commit(record, stage, message)

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

    def _call(self, record: dict, stage: str, abandon, on_attempt, on_wait) -> dict:
        """Run one stage; returns what later stages need (object refs, model identities)."""
        if stage == "report":
            on_attempt()
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
            backoff_s=self.settings.retry_backoff_s, max_backoff_s=self.settings.max_backoff_s,
            outage_s=self.settings.outage_retry_s, what=f"{study_id} {stage}",
            abandon=abandon, on_attempt=on_attempt, on_wait=on_wait,
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
