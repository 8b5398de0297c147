"""A RIS-side client of StudyService, used by `cmrvl submit`, `cmrvl analyze` and the tests."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc

from cmrvl.v1 import study_pb2, study_pb2_grpc
from services.runtime.clients import Backoff, open_channel

CHUNK_BYTES = 1024 * 1024
RECONNECT_S = 300.0  # how long a watch keeps reconnecting to a restarting gateway
FINAL = frozenset({study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL,
                   study_pb2.STUDY_STATUS_FAILED, study_pb2.STUDY_STATUS_CANCELLED})

log = logging.getLogger("cmrvl.client")


def upload_messages(folder: Path, client_request_id: str, height_m=None, weight_kg=None,
                    chunk_bytes: int = CHUNK_BYTES) -> Iterator[study_pb2.SubmitStudyRequest]:
    header = study_pb2.SubmitHeader(client_request_id=client_request_id)
    if height_m is not None:
        header.height_m = height_m
    if weight_kg is not None:
        header.weight_kg = weight_kg
    yield study_pb2.SubmitStudyRequest(header=header)
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                yield study_pb2.SubmitStudyRequest(chunk=study_pb2.FileChunk(path=relative, data=chunk))


class StudyClient:
    def __init__(self, target: str, token: str, tls_root: bytes | None = None):
        self.channel = open_channel(target, tls_root=tls_root)
        self.stub = study_pb2_grpc.StudyServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def submit_folder(self, folder: Path, client_request_id: str | None = None, height_m=None, weight_kg=None,
                      timeout_s: float = 600) -> study_pb2.Study:
        messages = upload_messages(Path(folder), client_request_id or uuid.uuid4().hex, height_m, weight_kg)
        return self.stub.SubmitStudy(messages, timeout=timeout_s, metadata=self.metadata)

    def watch(self, study_id: str, timeout_s: float = 3600, reconnect_s: float = RECONNECT_S,
              backoff_s: float = 0.5) -> Iterator[study_pb2.StudyEvent]:
        """Every event of the study once, in order, until its final one. A gateway that goes away
        (restart, rolling update) or has no stream to spare (RESOURCE_EXHAUSTED: too many watchers)
        is called again with backoff for up to `reconnect_s` without a stream; the watch resumes
        after the last event received."""
        deadline = time.monotonic() + timeout_s
        outage = Backoff(backoff_s, 5.0, reconnect_s)
        next_sequence, last_status = 0, None
        while True:
            stream = self.stub.WatchStudy(study_pb2.WatchStudyRequest(study_id=study_id), metadata=self.metadata,
                                          timeout=max(0.001, deadline - time.monotonic()))
            try:
                for event in stream:
                    outage.reset()
                    if event.sequence >= next_sequence:  # the gateway replays the history first
                        next_sequence = event.sequence + 1
                        last_status = event.status
                        yield event
                if last_status in FINAL:  # (a retried study's history has earlier final events)
                    return
                problem = None  # ended before the final event: a gateway shutting down
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise
                problem = exc
            finally:
                stream.cancel()
            delay = outage.next_delay()
            if delay is None or time.monotonic() + delay > deadline:
                if problem is not None:
                    raise problem
                raise TimeoutError(f"watch of {study_id}: the gateway ended the stream before the study ended")
            log.warning("watch of %s: %s; reconnecting in %.1fs", study_id,
                        f"{problem.code().name} ({problem.details()})" if problem else "stream ended early", delay)
            time.sleep(delay)

    def get_study(self, study_id: str) -> study_pb2.Study:
        return self.stub.GetStudy(study_pb2.GetStudyRequest(study_id=study_id), timeout=30, metadata=self.metadata)

    def get_report(self, study_id: str) -> study_pb2.Report:
        return self.stub.GetReport(study_pb2.GetReportRequest(study_id=study_id), timeout=60, metadata=self.metadata)

    def get_report_object(self, study_id: str, name: str) -> bytes:
        """One report object (e.g. "sr.dcm") streamed through the gateway; checked against its SHA-256."""
        import hashlib

        chunks = list(self.stub.GetReportObject(study_pb2.GetReportObjectRequest(study_id=study_id, name=name),
                                                timeout=120, metadata=self.metadata))
        data = b"".join(c.data for c in chunks)
        if chunks and hashlib.sha256(data).hexdigest() != chunks[0].sha256:
            raise OSError(f"{name} of study {study_id}: content does not match its SHA-256")
        return data
