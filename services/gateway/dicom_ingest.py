"""`cmrvl receive`: a DICOM C-STORE receiver that hands every pushed study to the gateway.

A modality or PACS pushes a study to this AE; when the association is released, the received
files are submitted to the gateway like a RIS upload. The client request id is derived from the
set of received SOP instances, so an identical re-push is the same submission (not a second run)
while a push with different images is a new one. Files are removed only after the gateway has
accepted them; on failure they stay in the incoming folder, and the error is logged."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("cmrvl.dicom_ingest")


def push_request_id(study_uid: str, folder: Path) -> str:
    instances = sorted(p.name for p in folder.glob("*.dcm"))
    digest = hashlib.sha256("\n".join(instances).encode()).hexdigest()[:16]
    return f"dicom-push:{study_uid}:{digest}"


def make_submitter(target: str, token: str, submitted: list | None = None):
    """The receiver's callback: submit the study folder to the gateway, then delete it."""
    from services.gateway.client import StudyClient

    def on_study(study_uid: str, folder: Path) -> None:
        client = StudyClient(target, token)
        try:
            study = client.submit_folder(folder, push_request_id(study_uid, folder))
        except Exception:  # noqa: BLE001 - keep the files; a later push or an operator retries
            log.exception("submitting pushed study %s failed; files kept in %s", study_uid, folder)
            return
        finally:
            client.close()
        log.info("pushed study %s submitted as %s", study_uid, study.study_id)
        if submitted is not None:
            submitted.append(study)
        shutil.rmtree(folder, ignore_errors=True)

    return on_study


def register(subparsers) -> None:
    receive = subparsers.add_parser("receive", help="DICOM C-STORE receiver that submits pushed studies to a gateway")
    receive.add_argument("--target", required=True, help="gateway HOST:PORT")
    receive.add_argument("--token", default=os.environ.get("CMRVL_TOKEN", ""), help="bearer token (default $CMRVL_TOKEN)")
    receive.add_argument("--ae-title", default="CMRVL")
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--port", type=int, default=11112)
    receive.add_argument("--incoming", type=Path, default=Path("incoming"), help="where received files wait")
    receive.set_defaults(handler=_receive)


def _receive(args) -> int:
    from services.preprocess.cstore import StudyReceiver
    from services.runtime.server import configure_logging

    configure_logging("INFO")
    receiver = StudyReceiver(args.incoming, make_submitter(args.target, args.token), ae_title=args.ae_title,
                             host=args.host, port=args.port)
    port = receiver.start()
    log.info("receiving DICOM as %s on %s:%d", args.ae_title, args.host, port)
    try:
        receiver.wait(None)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
    return 0
