"""`cmrvl receive`: a DICOM C-STORE receiver that hands every pushed study to the gateway.

A modality or PACS pushes a study to this AE; once the study is complete (no image for
`--quiet-s` seconds and no association carrying it still open, see services/preprocess/cstore.py),
its images are submitted to the gateway like a RIS upload. Objects that are not images (the
platform's own SR/SEG sent back by a PACS, presentation states...) are acknowledged, not
submitted. The client request id is derived from the set of SOP instances, so an identical
re-push is the same submission (not a second run) while a push with different images (late
images join the earlier ones) is a new one. When the run of that image set ended failed or
cancelled, the re-push is submitted again with the request id marked `:retry-N`. If the gateway
cannot take the study, the files stay on disk and the next push of the study retries with them."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger("cmrvl.dicom_ingest")

MAX_RETRIES = 100


def push_request_id(study_uid: str, folder: Path) -> str:
    instances = sorted(p.name for p in folder.glob("*.dcm"))
    digest = hashlib.sha256("\n".join(instances).encode()).hexdigest()[:16]
    return f"dicom-push:{study_uid}:{digest}"


def request_id_to_run(client, study_uid: str, request_id: str) -> str:
    """`request_id`, unless its study ended failed or cancelled: then the first `:retry-N` of it
    that the gateway does not know yet or that did not end that way (an identical push is idempotent)."""
    import grpc

    from cmrvl.v1 import study_pb2
    from services.gateway.records import study_id_for

    ended = (study_pb2.STUDY_STATUS_FAILED, study_pb2.STUDY_STATUS_CANCELLED)
    for attempt in range(MAX_RETRIES + 1):
        candidate = request_id if attempt == 0 else f"{request_id}:retry-{attempt}"
        try:
            study = client.get_study(study_id_for(study_uid, candidate))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return candidate
            raise
        if study.status not in ended:
            return candidate
        log.info("study %s: earlier run %s of these images ended %s", study_uid, study.study_id,
                 study_pb2.StudyStatus.Name(study.status))
    raise RuntimeError(f"study {study_uid}: {MAX_RETRIES} runs of the same images failed; not submitting again")


def make_submitter(target: str, token: str, submitted: list | None = None):
    """The receiver's callback: submit the study folder to the gateway. Raising keeps the files."""
    import grpc

    from services.gateway.client import StudyClient

    def on_study(study_uid: str, folder: Path) -> None:
        client = StudyClient(target, token)
        try:
            request_id = request_id_to_run(client, study_uid, push_request_id(study_uid, folder))
            study = client.submit_folder(folder, request_id)
        except grpc.RpcError as exc:
            raise RuntimeError(f"gateway {target}: {exc.code().name}: {exc.details()}") from None
        finally:
            client.close()
        log.info("study %s submitted to %s as %s (request id %s)", study_uid, target, study.study_id, request_id)
        if submitted is not None:
            submitted.append(study)

    return on_study


def quiet_dicom_libraries() -> None:
    """One log line per association and per study, not per file: pynetdicom's standard handlers
    log every DIMSE message, and pydicom warns about every invalid UID it decodes (real studies
    have them, in each file's C-STORE command too). This process only passes data on as sent."""
    import pydicom
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "none"  # read when the server and each association are created
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # "Non-conformant 'Affected SOP Instance UID'", once per C-STORE: preprocessing reports the
    # study's invalid UIDs once, in its issues.
    logging.getLogger("pynetdicom.utils").addFilter(lambda record: not record.getMessage().startswith("Non-conformant"))


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def register(subparsers) -> None:
    receive = subparsers.add_parser("receive", help="DICOM C-STORE receiver that submits pushed studies to a gateway")
    receive.add_argument("--target", required=True, help="gateway HOST:PORT")
    receive.add_argument("--token", default=os.environ.get("CMRVL_TOKEN", ""), help="bearer token (default $CMRVL_TOKEN)")
    receive.add_argument("--ae-title", default="CMRVL", help="the AE title senders must call (default CMRVL)")
    receive.add_argument("--allow-calling-aet", action="append", default=[], metavar="AET",
                         help="accept associations only from this calling AE title (repeatable; default any)")
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--port", type=int, default=11112)
    receive.add_argument("--incoming", type=Path, default=Path("incoming"), help="where received files wait")
    receive.add_argument("--quiet-s", type=_seconds, default=30.0,
                         help="a study is complete after this many seconds without a new image (default 30)")
    receive.add_argument("--keep-s", type=_seconds, default=3600.0,
                         help="how long a submitted study's files are kept so that late images re-run with them "
                              "(default 3600)")
    receive.set_defaults(handler=_receive)


def _receive(args) -> int:
    from services.cli import CommandError
    from services.preprocess.cstore import StudyReceiver
    from services.runtime.server import configure_logging

    configure_logging("INFO")
    quiet_dicom_libraries()
    try:
        receiver = StudyReceiver(args.incoming, make_submitter(args.target, args.token), ae_title=args.ae_title,
                                 host=args.host, port=args.port, quiet_s=args.quiet_s, keep_s=args.keep_s,
                                 allowed_calling_aets=args.allow_calling_aet)
    except ValueError as exc:  # pynetdicom's AE title checks
        raise CommandError(str(exc)) from None
    try:
        port = receiver.start()
    except OSError as exc:
        raise CommandError(f"cannot listen on {args.host}:{args.port} or use {args.incoming}: {exc}") from None
    log.info("receiving DICOM as %s on %s:%d for gateway %s", args.ae_title, args.host, port, args.target)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=receiver.stop).start())
    try:
        receiver.wait(None)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0
