"""Runs studies through the stages as DBOS workflows: durable, resumable, bounded, cancellable.

One DBOS workflow per study run (id `study-<study_id>-run<N>`, so a resubmission finds the
run it started). Each stage is a child workflow on the stage's DBOS queue, whose concurrency
limit lives in the database and so holds across all gateway replicas; the child's one step
calls the stage. DBOS checkpoints every step in the workflow database (SQLite file by default,
Postgres in the cluster): a gateway killed mid-study continues at its next start (or on another
replica, see replicas.py) from the last finished stage and never runs a finished one again.

The study record in the object store (records.py) stays the RIS-facing view (status, stages,
WatchStudy events, partial reports): every write reads it afresh and writes it back only over the
version it read (a conditional write), so it never overwrites a final record or another run's,
also when the writers (a study's workflow, its stage child, a cancel) are different replicas.

Outages (a stage answering UNAVAILABLE, the object store out of reach) are waited out for
`outage_retry_s` with capped backoff (call_with_retry); a study fails only for its own reason
or after that. A cancel is DBOS.cancel_workflow of the study and its stage children; the step
in flight sees it within CANCEL_POLL_S and cancels its gRPC call (CallAbandoned)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import grpc
import sqlalchemy.exc
from dbos import DBOS, SetWorkflowID
from dbos import error as dbos_error
from prometheus_client import Counter, Gauge

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from services.gateway.records import STAGES, TERMINAL, RecordStore, run_of
from services.gateway.replicas import Replicas, database_url, redacted
from services.runtime.clients import Backoff, CallAbandoned, call_with_retry, open_channel
from services.runtime.settings import Settings, SettingsError

log = logging.getLogger("cmrvl.workflow")

# A stage that answers FAILED_PRECONDITION has nothing installed to run with (no model):
# the study goes on without it and the report says so (partial).
SKIPPABLE = {"segmentation": {grpc.StatusCode.FAILED_PRECONDITION},
             "findings": "any"}  # findings never block the measurements

# Bumped when the sequence of steps of the workflows below changes: DBOS recovers a pending
# workflow only with the application version that started it.
APP_VERSION = "cmrvl-workflow-1"
# How often each replica looks for queued stage work (DBOS's default is 1 s). Each poll is a
# database query: 0.2 s cost an idle gateway 15% of a core (SQLite), 0.5 s about 6%.
QUEUE_POLL_S = 0.5
RESULT_POLL_S = 0.2  # how often a study's workflow looks whether its stage has ended
CANCEL_POLL_S = 0.5  # how often a running stage call checks whether its study was cancelled
FINISHED = ("done", "skipped", "failed")

STAGE_INFLIGHT = Gauge("cmrvl_stage_inflight", "Studies inside a stage now", ["stage"])
STAGE_INFLIGHT_PEAK = Gauge("cmrvl_stage_inflight_peak", "Most studies inside a stage at once since start", ["stage"])
STUDIES_FINISHED = Counter("cmrvl_studies_finished_total", "Studies that reached a final status", ["status"])

# The gateway's workflow engine in this process, for the DBOS functions below (DBOS runs them by
# name, also when it recovers them, so they are module functions, not bound methods).
_engine: Workflow | None = None


class WorkflowDatabaseUnavailable(ConnectionError):
    """The workflow database cannot be reached (the RIS gets UNAVAILABLE; no host named)."""


class _Stopping(BaseException):
    """The gateway is shutting down. A BaseException, so that DBOS records neither the step nor
    the workflow as ended: the workflow stays PENDING and is recovered at the next start."""


def workflow_id(study_id: str, run: int) -> str:
    return f"study-{study_id}-run{run}"


class _Abandon:
    """What a stage call watches: its workflow cancelled (in the database, by any replica), or
    the gateway stopping. Quacks like the threading.Event that call_with_retry takes."""

    def __init__(self, stopping: threading.Event, wf_id: str):
        self.stopping, self.wf_id = stopping, wf_id
        self._cancelled, self._checked = False, 0.0

    def cancelled(self, fresh: bool = False) -> bool:
        if not self._cancelled and (fresh or time.monotonic() - self._checked >= CANCEL_POLL_S):
            self._checked = time.monotonic()
            try:
                status = DBOS.get_workflow_status(self.wf_id)
            except Exception as exc:  # noqa: BLE001 - the database away for a moment: asked again next poll
                log.warning("workflow %s: status not read: %s", self.wf_id, exc)
                return False
            self._cancelled = status is not None and status.status == "CANCELLED"
        return self._cancelled

    def is_set(self) -> bool:
        return self.stopping.is_set() or self.cancelled()

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_set() and time.monotonic() < deadline:
            self.stopping.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.is_set()


# -- the DBOS workflows and steps -----------------------------------------------------------------
@DBOS.workflow(name="cmrvl.study")
def study_workflow(study_id: str, run: int) -> str:
    engine = _engine
    try:
        for stage in STAGES:
            step = prepare_stage(study_id, run, stage)
            if step == "stop":  # the record ended meanwhile (cancelled) or is another run's
                return step
            if step == "skip":
                continue
            with SetWorkflowID(f"{DBOS.workflow_id}:{stage}"):
                handle = engine.queues[stage].enqueue(stage_workflow, study_id, run, stage)
            # (DBOS polls for the result once a second by default: most of a study's overhead)
            if handle.get_result(polling_interval_sec=RESULT_POLL_S) in ("failed", "stop"):
                return "failed"
        return finish_study(study_id, run)
    except _Stopping:
        raise
    except (dbos_error.DBOSWorkflowCancelledError, dbos_error.DBOSAwaitedWorkflowCancelledError,
            dbos_error.DBOSWorkflowConflictIDError):
        if engine.stopping.is_set():
            raise _Stopping() from None
        # The cancel's record is normally written by CancelStudy; this covers a cancel made
        # elsewhere (DBOS's tools). Plain code, not a step: the workflow is over.
        with contextlib.suppress(Exception, dbos_error.DBOSBaseException):
            status = DBOS.get_workflow_status(DBOS.workflow_id)
            if status is not None and status.status == "CANCELLED":
                engine.mark_cancelled(study_id, run)
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: fail the study rather than leave it running
        if engine.stopping.is_set():
            raise _Stopping() from None
        log.exception("study %s: workflow error", study_id)
        engine.fail_unexpected(study_id, run, exc)
        return "failed"


@DBOS.workflow(name="cmrvl.stage")
def stage_workflow(study_id: str, run: int, stage: str) -> str:
    return run_stage(study_id, run, stage)


@DBOS.step(name="cmrvl.prepare_stage")
def prepare_stage(study_id: str, run: int, stage: str) -> str:
    return _engine.prepare_stage(study_id, run, stage)


@DBOS.step(name="cmrvl.run_stage")
def run_stage(study_id: str, run: int, stage: str) -> str:
    return _engine.run_stage(study_id, run, stage, DBOS.workflow_id)


@DBOS.step(name="cmrvl.finish_study")
def finish_study(study_id: str, run: int) -> str:
    return _engine.finish(study_id, run)


def _ref(d: dict) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(**d)


def _ref_dict(ref: common_pb2.ObjectRef) -> dict:
    return {"bucket": ref.bucket, "key": ref.key, "sha256": ref.sha256, "size_bytes": ref.size_bytes}


def _model_dict(model: common_pb2.ModelInfo) -> dict:
    return {"name": model.name, "version": model.version, "backend": model.backend}


@contextlib.contextmanager
def _database(what: str):
    """Database errors in a RIS call: UNAVAILABLE with a message that names no host."""
    try:
        yield
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
        log.warning("workflow database: %s failed: %s", what, exc)
        raise WorkflowDatabaseUnavailable("workflow database unavailable; try again") from None


class Workflow:
    def __init__(self, settings: Settings, records: RecordStore, build_report):
        global _engine
        self.settings, self.records, self.build_report = settings, records, build_report
        self.stopping = threading.Event()
        self.replica = settings.gateway_replica or socket.gethostname()
        state_dir = Path(settings.state_dir).expanduser() if settings.state_dir else Path.home() / ".cmrvl" / "gateway"
        self.database_url = database_url(settings.workflow_database_url, state_dir)
        self.replicas = Replicas(self.database_url, self.replica, settings.replica_dead_s)
        try:  # at start-up, one line naming the setting, not a traceback later
            self.replicas.beat()
        except Exception as exc:  # noqa: BLE001 - any driver error
            raise SettingsError(self._unusable(exc)) from None
        self.queues: dict = {}
        self._inflight = {stage: 0 for stage in STAGES}
        self._peak = dict(self._inflight)
        self._inflight_lock = threading.Lock()
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
        _engine = self
        DBOS(config={
            "name": "cmrvl-gateway", "system_database_url": self.database_url, "executor_id": self.replica,
            "application_version": APP_VERSION, "log_level": "WARNING",
        })

    def _unusable(self, exc: Exception) -> str:
        """One line naming the setting and the database (no password) and what went wrong."""
        return (f"CMRVL_WORKFLOW_DATABASE_URL: workflow database {redacted(self.database_url)} not usable: "
                f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Launch DBOS (it recovers this replica's unfinished workflows), declare the queues,
        start the heartbeat, and put back on track any record a crash left without its workflow."""
        try:
            self.replicas.beat()  # first: a live replica's workflows are never taken for a dead one's
            DBOS.launch()
        except Exception as exc:  # noqa: BLE001 - one line naming the setting, not a traceback
            raise RuntimeError(self._unusable(exc)) from None
        s = self.settings
        # Per-stage limits in the database, shared by every replica; the report is built in
        # this process, so its limit is per replica.
        self.limits = {"preprocess": s.preprocess_concurrency, "segmentation": s.segmentation_concurrency,
                       "findings": s.findings_concurrency, "report": s.workflow_workers}
        self.queues = {stage: DBOS.register_queue(
            f"cmrvl-{stage}", polling_interval_sec=QUEUE_POLL_S, on_conflict="always_update",
            **{"worker_concurrency" if stage == "report" else "global_concurrency": limit})
            for stage, limit in self.limits.items()}
        threading.Thread(target=self._watch_replicas, name="replicas", daemon=True).start()
        self.reconcile()

    def stop(self) -> None:
        """Stop: stage calls in flight are cancelled and waits end, and the workflows stay pending
        in the database: they continue at the next start (or on another replica)."""
        self.stopping.set()
        DBOS.destroy(workflow_completion_timeout_sec=0)
        for channel in self.channels.values():
            channel.close()
        self.replicas.close()

    def _watch_replicas(self) -> None:
        while not self.stopping.wait(self.settings.replica_heartbeat_s):
            try:
                self.replicas.beat()
                owners = {w.executor_id for w in DBOS.list_workflows(status="PENDING", load_input=False,
                                                                    load_output=False) if w.executor_id}
                dead = self.replicas.dead(owners)
                if dead:
                    log.warning("replicas %s are silent: recovering their unfinished studies", ", ".join(dead))
                    DBOS._recover_pending_workflows(dead)
            except Exception as exc:  # noqa: BLE001 - the database away for a moment: next beat
                log.warning("replica heartbeat: %s", exc)

    def reconcile(self) -> int:
        """Records a crash left out of step with their workflows: a study whose enqueue was lost
        (the gateway died between the record and the enqueue) is enqueued; one whose workflow was
        cancelled or ended in error while its record was not written, gets its final status."""
        fixed = 0
        for record in self.records.all():
            if record["status"] in TERMINAL:
                continue
            study_id, run = record["study_id"], run_of(record)
            status = DBOS.get_workflow_status(workflow_id(study_id, run))
            if status is None:
                self.enqueue(study_id, run)
            elif status.status == "CANCELLED":
                self.mark_cancelled(study_id, run)
            elif status.status in ("ERROR", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"):
                self.fail_unexpected(study_id, run, RuntimeError(f"workflow ended {status.status}"))
            else:
                continue
            fixed += 1
        if fixed:
            log.info("%d studies put back in step with their workflows", fixed)
        return fixed

    # -- RIS calls ----------------------------------------------------------------------------
    def enqueue(self, study_id: str, run: int) -> None:
        """Start a study run on this replica (idempotent: the same run's workflow id finds the one
        there is). Not queued: a study's own workflow only waits for its stages, which are."""
        with _database("enqueue"), SetWorkflowID(workflow_id(study_id, run)):
            DBOS.start_workflow(study_workflow, study_id, run)

    def cancel(self, study_id: str, run: int) -> None:
        """Cancel a study run: its workflow and stage children in the database (whichever replica
        runs them stops there, its stage call in flight is cancelled) and its record, written
        here at once: the runner's later writes find the record final and leave it."""
        wf_id = workflow_id(study_id, run)
        with _database("cancel"):
            if DBOS.get_workflow_status(wf_id) is not None:
                DBOS.cancel_workflow(wf_id, cancel_children=True)
        self.mark_cancelled(study_id, run, keep=False)

    # -- the record (the RIS-facing view) -------------------------------------------------------
    def _update(self, study_id: str, run: int, change, keep: bool = True) -> dict | None:
        """RecordStore.update (a conditional read-change-write) through store outages. None: the
        record is another run's or already final (a cancel won), or (not `keep`) the store is out
        of reach. `keep`: an end that must be kept: a store outage is waited out (until the
        gateway stops), so that the stage's work is not done again."""
        backoff = Backoff(self.settings.retry_backoff_s, self.settings.max_backoff_s, float("inf"))
        while True:
            try:
                return self.records.update(study_id, run, change)
            except ConnectionError as exc:
                if not keep:
                    log.warning("study %s: progress not saved: %s", study_id, exc)
                    return None
                delay = backoff.next_delay()
                log.warning("study %s: record not written (%s); trying again in %.1fs", study_id, exc, delay)
                if self.stopping.wait(delay):
                    raise _Stopping() from None

    def mark_cancelled(self, study_id: str, run: int, keep: bool = True) -> None:
        def change(record: dict) -> None:
            record["status"] = "cancelled"
            for state in record["stages"].values():
                if state["state"] in ("running", "waiting"):
                    state["state"] = "pending"
            self.records.add_event(record, record["current_stage"], "study cancelled")

        if self._update(study_id, run, change, keep=keep) is not None:
            STUDIES_FINISHED.labels("cancelled").inc()

    def fail_unexpected(self, study_id: str, run: int, exc: BaseException) -> None:
        def change(record: dict) -> None:
            record["status"], record["error"] = "failed", f"gateway error: {type(exc).__name__}: {exc}"
            self.records.add_event(record, record["current_stage"], record["error"])

        if self._update(study_id, run, change) is not None:
            STUDIES_FINISHED.labels("failed").inc()

    # -- the steps' work ----------------------------------------------------------------------
    def _stage_full(self, stage: str) -> bool:
        """Every slot of the stage taken now (by any replica): a study enqueued now waits."""
        running = DBOS.list_workflows(queue_name=f"cmrvl-{stage}", status="PENDING", load_input=False,
                                      load_output=False)
        return len(running) >= self.limits[stage]

    def prepare_stage(self, study_id: str, run: int, stage: str) -> str:
        """'run' (to be enqueued; shown waiting when the stage has no free slot), 'skip' (finished
        before a restart, or findings without masks) or 'stop' (the record ended meanwhile)."""
        decision = {"next": "run"}
        full = self._stage_full(stage)

        def change(record: dict) -> bool:
            state = record["stages"][stage]
            if state["state"] in FINISHED:
                decision["next"] = "skip"  # finished before a restart: never run twice
                return False
            if stage == "findings" and record["stages"]["segmentation"]["state"] != "done":
                state.update(state="skipped", error="needs the segmentation masks")
                self.records.add_event(record, stage, "findings skipped: no segmentation masks")
                decision["next"] = "skip"
                return True
            record["current_stage"] = stage
            # Waiting for a slot: shown as such, not as running. With a free slot the stage's run
            # starts within a queue poll and shows itself as running.
            state.update(state="waiting" if full else "pending", error="")
            return True

        return decision["next"] if self._update(study_id, run, change) is not None else "stop"

    def finish(self, study_id: str, run: int) -> str:
        def change(record: dict) -> None:
            skipped = [s for s in STAGES if record["stages"][s]["state"] in ("skipped", "failed")]
            record["status"] = "partial" if skipped else "completed"
            record["current_stage"] = "report"
            self.records.add_event(record, "report", f"study {record['status']}"
                                   + (f" (without {', '.join(skipped)})" if skipped else ""), 100.0)

        record = self._update(study_id, run, change)
        if record is None:
            return "stop"
        STUDIES_FINISHED.labels(record["status"]).inc()
        return record["status"]

    def run_stage(self, study_id: str, run: int, stage: str, wf_id: str) -> str:
        """Run one stage of a study and record its end; returns the stage's state."""
        record = self._update(study_id, run, lambda r: False)
        if record is None:
            return "stop"
        state = record["stages"][stage]
        if state["state"] in FINISHED:
            return state["state"]  # recorded before a crash lost the step's checkpoint
        abandon = _Abandon(self.stopping, wf_id)
        spent = {"since": None, "before": state["seconds"]}

        def clock() -> float:
            return round(spent["before"] + (time.perf_counter() - spent["since"] if spent["since"] else 0.0), 3)

        def progress(**fields) -> None:  # kept if the store takes it now
            def change(r: dict) -> None:
                r["stages"][stage].update(seconds=clock(), **fields)
            if not abandon.is_set():
                self._update(study_id, run, change, keep=False)

        def on_attempt() -> None:  # saved when the stage run starts (a crash does not lose it)
            if spent["since"] is not None:  # a retry inside this run, after a wait
                progress(state="running")
                return
            spent["since"] = time.perf_counter()

            def change(r: dict) -> None:
                s = r["stages"][stage]
                s.update(state="running", attempts=s["attempts"] + 1)
                r["current_stage"] = stage
                if r["status"] == "queued":
                    r["status"] = "running"
                self.records.add_event(r, stage, f"{stage} started", percent=r["events"][-1]["percent"])
            self._update(study_id, run, change, keep=False)

        def on_wait(delay_s: float, reason: str) -> None:
            progress(state="waiting", error=f"retrying in {delay_s:.1f}s: {reason}")

        error, outputs = "", {}
        try:
            with self._inside(stage):
                outputs = self._call(record, stage, abandon, on_attempt, on_wait)
            if abandon.is_set():
                raise CallAbandoned(stage)  # cancelled while it ran: its output is not recorded
            new_state, message = "done", f"{stage} done"
        except CallAbandoned:
            if self.stopping.is_set():
                progress(state="pending")
                raise _Stopping() from None
            # Not recorded as the step's result: the study's workflow writes the cancel.
            raise dbos_error.DBOSWorkflowCancelledError(f"{wf_id} cancelled") from None
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the details name the stage's address
                log.warning("study %s: %s unavailable: %s", study_id, stage, exc.details())
                error = f"UNAVAILABLE: the {stage} service stayed unavailable for {self.settings.outage_retry_s:g}s"
            skippable = SKIPPABLE.get(stage)
            if skippable == "any" or (skippable and exc.code() in skippable):
                new_state, message = "skipped", f"{stage} skipped: {error}"
            else:
                new_state, message = "failed", f"{stage} failed: {error}"
        except Exception as exc:  # noqa: BLE001 - the report stage runs here, in-process
            error = f"{type(exc).__name__}: {exc}"
            new_state, message = "failed", f"{stage} failed: {error}"
            log.exception("study %s: %s", study_id, stage)

        def commit(r: dict) -> bool:
            if abandon.cancelled(fresh=True):  # cancelled since the last poll: nothing recorded
                return False
            r["stages"][stage].update(state=new_state, error=error, outputs=outputs, seconds=clock())
            if stage == "preprocess" and outputs.get("study_instance_uid"):
                r["study_instance_uid"] = outputs["study_instance_uid"]
            if new_state == "failed":
                r["status"], r["error"] = "failed", message
            self.records.add_event(r, stage, message)
            return True

        if self._update(study_id, run, commit) is None or abandon.cancelled():
            return "stop"
        if new_state == "failed":
            STUDIES_FINISHED.labels("failed").inc()
        return new_state

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

    def _build_report(self, record: dict, abandon: _Abandon) -> dict:
        """The report, built here; an object-store outage is waited out (the build is repeatable)."""
        backoff = Backoff(self.settings.retry_backoff_s, self.settings.max_backoff_s, float("inf"))
        while True:
            try:
                return self.build_report(record)
            except ConnectionError as exc:
                delay = backoff.next_delay()
                log.warning("study %s: report not built (%s); trying again in %.1fs", record["study_id"], exc, delay)
                if abandon.wait(delay):
                    raise CallAbandoned("report") from None

    def _call(self, record: dict, stage: str, abandon, on_attempt, on_wait) -> dict:
        """Run one stage; returns what later stages need (object refs, model identities)."""
        if stage == "report":
            on_attempt()
            return self._build_report(record, abandon)
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
        return result
