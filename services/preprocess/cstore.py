"""DICOM network ingest: a C-STORE SCP that receives studies pushed by a modality or PACS.

    def submit(study_uid: str, folder: Path) -> None: ...   # e.g. hand it to the gateway
    with StudyReceiver(Path("/var/cmrvl/incoming"), submit, port=11112) as receiver:
        receiver.wait()                                         # or do other work

Each received instance is written unchanged (as encoded by the sender, with file meta) to
`storage_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm`. When the sending association is released
normally, `on_study(study_uid, folder)` is called once per study it carried. An aborted
association calls nothing (the study may be incomplete); its files stay for a later push.
The server binds to 127.0.0.1 unless told otherwise; it also answers C-ECHO.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

log = logging.getLogger(__name__)

OnStudy = Callable[[str, Path], None]
_SAFE = re.compile(r"[^0-9A-Za-z.\-]")

# DIMSE status codes (PS3.4 Annex B.2.3 / PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def _safe_name(uid: str) -> str:
    """A UID as a file name: UIDs are digits and dots, but never trust a sender's bytes."""
    name = _SAFE.sub("_", uid.strip())[:128]
    return name if name and name not in (".", "..") else "_"


class StudyReceiver:
    """C-STORE SCP writing one folder per StudyInstanceUID and reporting finished pushes."""

    def __init__(self, storage_dir: Path, on_study: OnStudy, *, ae_title: str = "CMRVL",
                 host: str = "127.0.0.1", port: int = 11112, require_called_aet: bool = False):
        self.storage_dir = Path(storage_dir)
        self.on_study = on_study
        self.host, self.port = host, port
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = require_called_aet
        for context in AllStoragePresentationContexts:  # accept compressed syntaxes too
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server = None
        self._lock = threading.Lock()
        self._pending: dict[int, dict[str, Path]] = {}  # association id -> studies received
        self._done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> int:
        """Start listening in background threads; returns the bound port (port=0 picks one)."""
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        handlers = [(evt.EVT_C_STORE, self._handle_store), (evt.EVT_RELEASED, self._handle_release),
                    (evt.EVT_ABORTED, self._handle_abort)]
        self._server = self.ae.start_server((self.host, self.port), block=False,
                                            evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("C-STORE receiver %s listening on %s:%d", self.ae.ae_title, self.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() (from another thread or a signal handler) or timeout."""
        return self._done.wait(timeout)

    def __enter__(self) -> StudyReceiver:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- event handlers (run in the association's thread) ---------------------------------------
    def _handle_store(self, event) -> int:
        try:
            ds = event.dataset
            study_uid = str(ds.StudyInstanceUID)
            sop_uid = str(ds.SOPInstanceUID)
        except Exception as exc:  # undecodable or missing UIDs: refuse this instance only
            log.warning("C-STORE refused: %s", exc)
            return CANNOT_UNDERSTAND
        folder = self.storage_dir / _safe_name(study_uid)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / (_safe_name(sop_uid) + ".part")
            tmp.write_bytes(event.encoded_dataset(include_meta=True))
            tmp.replace(folder / (_safe_name(sop_uid) + ".dcm"))  # never a half-written .dcm
        except OSError as exc:
            log.error("C-STORE could not write %s: %s", sop_uid, exc)
            return OUT_OF_RESOURCES
        with self._lock:
            self._pending.setdefault(id(event.assoc), {})[study_uid] = folder
        return SUCCESS

    def _handle_release(self, event) -> None:
        with self._lock:
            studies = self._pending.pop(id(event.assoc), {})
        for study_uid, folder in studies.items():
            try:
                self.on_study(study_uid, folder)
            except Exception:  # one failing hand-off must not break the receiver
                log.exception("on_study failed for study %s", study_uid)

    def _handle_abort(self, event) -> None:
        with self._lock:
            studies = self._pending.pop(id(event.assoc), {})
        if studies:
            log.warning("association aborted; not submitting %s", ", ".join(studies))
