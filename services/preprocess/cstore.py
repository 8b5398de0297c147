"""DICOM network ingest: a C-STORE SCP that receives studies pushed by a modality or PACS.

    def submit(study_uid: str, folder: Path) -> None: ...   # e.g. hand it to the gateway
    with StudyReceiver(Path("/var/cmrvl/incoming"), submit, port=11112, quiet_s=30) as receiver:
        receiver.wait()                                         # or do other work

A sender splits one study over several associations (Orthanc opens one per SOP class, a router
may push in parallel), so the end of an association says nothing about the end of a study. As
PACS routers do (Orthanc's StableAge), a study counts as complete once no association that
carried it is still open and none of its images has arrived for `quiet_s` seconds. Then, and
only then, `on_study(study_uid, folder)` is called, from the receiver's own hand-off thread, one
study at a time. Layout under `storage_dir`:

    <StudyInstanceUID>/<SOPInstanceUID>.dcm    images being received (as encoded by the sender)
    .submissions/<StudyInstanceUID>/<n>/       one folder per hand-off
    .partial/                                  files being written

A hand-off moves the study's receiving folder to a new submission folder in one rename, under
the lock every write takes: each image is either in that hand-off or waits for the next one,
nothing another association is writing is ever removed. After the callback the receiver keeps
the submission folder: if more images of the study arrive (late images, a re-push), the next
hand-off holds the earlier images too, so the study is re-run whole. A folder whose hand-off
succeeded is deleted after `keep_s` (images of the study arriving later still go, on their own,
with a warning); one whose callback raised stays until the next push of the study retries with it. A study whose last association aborted is not handed off (it may be
incomplete); its files wait for a complete push. Images left by an earlier run of the receiver
are handed off after the quiet period.

Only images are handed off: other objects (SR, SEG, presentation states, ..., among them the
platform's own SR/SEG coming back from a PACS) are acknowledged, so the sender does not retry
them, then dropped, with one log line per study. With `on_study=None` the receiver is a plain
storage SCP: every instance is kept under `<StudyInstanceUID>/` and nothing is handed off.

Associations must call the receiver's AE title (and, when `allowed_calling_aets` is given, come
from one of those); a refused association is logged with the reason. The server binds to
127.0.0.1 unless told otherwise; it also answers C-ECHO.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


log = logging.getLogger(__name__)

OnStudy = Callable[[str, Path], None]
_SAFE = re.compile(r"[^0-9A-Za-z.\-]")
SUBMISSIONS, PARTIAL = ".submissions", ".partial"
# Objects with pixel data that are not images of the patient: segmentations, registrations,
# fiducials, raw data (all of PS3.4's "...66.*" classes).
_DERIVED_OBJECT_CLASSES = "1.2.840.10008.5.1.4.1.1.66"
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_SOP_CLASS_UID, _SOP_INSTANCE_UID, _STUDY_UID = 0x00080016, 0x00080018, 0x0020000D

# DIMSE status codes (PS3.4 Annex B.2.3 / PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def _safe_name(uid: str) -> str:
    """A UID as a file name: UIDs are digits and dots, but never trust a sender's bytes. The name
    never starts with a dot, so it cannot be one of the receiver's own folders."""
    name = _SAFE.sub("_", uid.strip())[:128]
    return name if name[:1].isalnum() else "_" + name


def _raw_uid(dataset, tag: int) -> str:
    """A UID element's text as sent, without pydicom's value conversion: that validates, and real
    studies carry invalid UIDs (one warning per file otherwise)."""
    element = dataset.get_item(tag)
    if element is None or not element.value:
        raise ValueError(f"no {Tag(tag)} in the dataset")
    value = element.value
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)).strip("\0 ")


def is_image(dataset, sop_class: str) -> bool:
    """True for an image of the patient; False for SR, SEG, presentation states, documents..."""
    if sop_class.startswith(_DERIVED_OBJECT_CLASSES):
        return False
    return any(tag in dataset for tag in _PIXEL_TAGS)


@dataclass
class _Receiving:
    """A study some of whose images are in its receiving folder, not yet handed off."""
    study_uid: str  # as sent (the folder name is its file-safe form)
    last_activity: float
    open_associations: set[int] = field(default_factory=set)
    senders: set[str] = field(default_factory=set)
    aborted: bool = False


class StudyReceiver:
    """C-STORE SCP collecting each study's images and handing every completed study off once."""

    def __init__(self, storage_dir: Path, on_study: OnStudy | None, *, ae_title: str = "CMRVL",
                 host: str = "127.0.0.1", port: int = 11112, quiet_s: float = 30.0, keep_s: float = 3600.0,
                 allowed_calling_aets: Iterable[str] = ()):
        self.storage_dir = Path(storage_dir)
        self.on_study = on_study
        self.host, self.port = host, port
        self.quiet_s, self.keep_s = quiet_s, keep_s
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.require_calling_aet = list(allowed_calling_aets)
        for context in AllStoragePresentationContexts:  # accept compressed syntaxes too
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self._server = None
        self._lock = threading.Lock()
        self._receiving: dict[str, _Receiving] = {}  # StudyInstanceUID -> images waiting
        self._assoc_studies: dict[int, set[str]] = {}  # open association -> the studies it carried
        self._ignored: dict[str, tuple[dict[str, int], float]] = {}  # study -> ({SOP class: count}, last)
        self._submitted: dict[str, tuple[Path, float | None]] = {}  # last hand-off: folder, time if it succeeded
        self._released: dict[str, float] = {}  # studies whose submitted files were deleted after keep_s: when
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> int:
        """Start listening in background threads; returns the bound port (port=0 picks one)."""
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        (self.storage_dir / PARTIAL).mkdir(exist_ok=True)
        if self.on_study is not None:
            self._resume()
        handlers = [(evt.EVT_ESTABLISHED, _release_when_idle), (evt.EVT_C_STORE, self._handle_store),
                    (evt.EVT_RELEASED, self._handle_release), (evt.EVT_ABORTED, self._handle_abort),
                    (evt.EVT_REJECTED, self._handle_rejected)]
        self._server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        if self.on_study is not None:
            self._stop.clear()
            self._worker = threading.Thread(target=self._hand_off_loop, name="cstore-hand-off", daemon=True)
            self._worker.start()
        log.info("C-STORE receiver %s listening on %s:%d (study complete after %g s without images)",
                 self.ae.ae_title, self.host, self.port, self.quiet_s)
        return self.port

    def stop(self) -> None:
        """Stop listening; a hand-off in progress finishes. Studies still receiving stay on disk
        and are handed off by the next start."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() (from another thread or a signal handler) or timeout."""
        return self._done.wait(timeout)

    def __enter__(self) -> StudyReceiver:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _resume(self) -> None:
        """Pick up what an earlier run left: receiving folders and the last submission of each study."""
        for partial in (self.storage_dir / PARTIAL).glob("*.part"):  # never acknowledged: the sender resends
            partial.unlink()
        now = time.monotonic()
        for folder in self.storage_dir.iterdir():
            first = next(folder.glob("*.dcm"), None) if folder.is_dir() and not folder.name.startswith(".") else None
            if first is not None:
                try:
                    uid = _raw_uid(pydicom.dcmread(first, specific_tags=[_STUDY_UID]), _STUDY_UID)
                except Exception:  # noqa: BLE001 - written by this receiver; the name is the UID then
                    uid = folder.name
                self._receiving[folder.name] = _Receiving(uid, now, senders={"an earlier run"})
        for study in (self.storage_dir / SUBMISSIONS).glob("*"):
            folders = sorted(p for p in study.iterdir() if p.is_dir())
            if folders:  # without its .done mark the outcome is unknown: kept, retried with the next push
                marker = folders[-1].with_suffix(".done")
                self._submitted[study.name] = (folders[-1], marker.stat().st_mtime if marker.exists() else None)
        if self._receiving:
            log.info("resuming %d studies received before a restart: %s", len(self._receiving),
                     ", ".join(sorted(self._receiving)))

    # -- event handlers (run in the association's thread) ---------------------------------------
    def _handle_store(self, event) -> int:
        try:
            ds = event.dataset
            study_uid, sop_uid = _raw_uid(ds, _STUDY_UID), _raw_uid(ds, _SOP_INSTANCE_UID)
            sop_class = UID(_raw_uid(ds, _SOP_CLASS_UID))
            image = is_image(ds, sop_class)
        except Exception as exc:  # undecodable or missing UIDs: refuse this instance only
            log.warning("C-STORE from %s refused: %s", _peer(event.assoc), exc)
            return CANNOT_UNDERSTAND
        name = _safe_name(study_uid)
        if self.on_study is not None and not image:
            with self._lock:  # acknowledged so the sender does not retry; never handed off
                counts, _ = self._ignored.get(name, ({}, 0.0))
                counts[sop_class.name] = counts.get(sop_class.name, 0) + 1
                self._ignored[name] = (counts, time.monotonic())
                self._assoc_studies.setdefault(id(event.assoc), set()).add(name)
            return SUCCESS
        partial = self.storage_dir / PARTIAL / f"{uuid.uuid4().hex}.part"
        try:
            partial.write_bytes(event.encoded_dataset(include_meta=True))
            with self._lock:  # a hand-off renames the folder under this lock: all or nothing
                folder = self.storage_dir / name
                folder.mkdir(exist_ok=True)
                os.replace(partial, folder / (_safe_name(sop_uid) + ".dcm"))  # never a half-written .dcm
                if self.on_study is not None:
                    study = self._receiving.setdefault(name, _Receiving(study_uid, time.monotonic()))
                    study.last_activity = time.monotonic()
                    study.senders.add(_peer(event.assoc))
                    study.open_associations.add(id(event.assoc))
                    self._assoc_studies.setdefault(id(event.assoc), set()).add(name)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            log.error("C-STORE could not write %s of study %s: %s", sop_uid, study_uid, exc)
            return OUT_OF_RESOURCES
        return SUCCESS

    def _association_ended(self, event, aborted: bool) -> None:
        with self._lock:
            names = self._assoc_studies.pop(id(event.assoc), set())
            for name in names:
                study = self._receiving.get(name)
                if study is not None:
                    study.open_associations.discard(id(event.assoc))
                    study.last_activity = time.monotonic()
                    study.aborted = aborted
        for name in sorted(names):
            log.info("association from %s %s: study %s", _peer(event.assoc), "aborted" if aborted else "released",
                     name)

    def _handle_release(self, event) -> None:
        self._association_ended(event, aborted=False)

    def _handle_abort(self, event) -> None:
        self._association_ended(event, aborted=True)

    def _handle_rejected(self, event) -> None:
        request = event.assoc.requestor.primitive
        called, calling = str(request.called_ae_title).strip(), str(request.calling_ae_title).strip()
        if called != self.ae.ae_title.strip():
            reason = f"called AE title {called!r} is not {self.ae.ae_title!r}"
        elif self.ae.require_calling_aet and calling not in self.ae.require_calling_aet:
            reason = f"calling AE title {calling!r} is not in the allowed list"
        else:
            reason = "too many associations or a failed user identity"
        log.warning("refused association from %s@%s: %s", calling, _address(event.assoc), reason)

    # -- hand-off (the receiver's own thread) -----------------------------------------------------
    def _hand_off_loop(self) -> None:
        while not self._stop.wait(min(0.2, max(self.quiet_s / 4, 0.01))):
            now = time.monotonic()
            with self._lock:
                due = [name for name, s in self._receiving.items()
                       if not s.open_associations and now - s.last_activity >= self.quiet_s]
            for name in due:
                if self._stop.is_set():
                    return
                self._hand_off(name)
            self._forget_ignored()
            self._expire_submissions()

    def _hand_off(self, name: str) -> None:
        target = self.storage_dir / SUBMISSIONS / name / f"{time.time_ns():020d}"
        with self._lock:
            study = self._receiving[name]
            if study.open_associations or time.monotonic() - study.last_activity < self.quiet_s:
                return  # an image came in since the check
            del self._receiving[name]
            if study.aborted:
                log.warning("study %s: the last association sending it aborted; %d images kept in %s until a "
                            "complete push", name, len(list((self.storage_dir / name).glob("*.dcm"))),
                            self.storage_dir / name)
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.storage_dir / name).rename(target)  # later images start a new receiving folder
        received = len(list(target.glob("*.dcm")))
        earlier, previous = 0, self._submitted.pop(name, None)
        if previous is not None and previous[0].is_dir():  # re-run with the images handed off before
            for path in previous[0].glob("*.dcm"):
                if not (target / path.name).exists():  # a re-sent image replaces its earlier copy
                    path.rename(target / path.name)
                    earlier += 1
            shutil.rmtree(previous[0], ignore_errors=True)
            previous[0].with_suffix(".done").unlink(missing_ok=True)
        note, level = "", logging.INFO
        if previous is not None:
            outcome = "handed off" if previous[1] is not None else "whose hand-off had failed"
            note = f" ({received} new, {earlier} from its earlier submission {outcome}: a re-run)"
        elif name in self._released:  # late beyond keep_s: the earlier images are gone from here
            note = (f" (its earlier submission's files were deleted {time.time() - self._released.pop(name):.0f} s "
                    f"ago, after keep_s: these images go on their own)")
            level = logging.WARNING
        log.log(level, "study %s complete: %d images from %s%s; handing off %s", name, received + earlier,
                ", ".join(sorted(study.senders)), note, target)
        try:
            self.on_study(study.study_uid, target)
        except Exception as exc:  # noqa: BLE001 - keep the files: the next push of the study retries
            log.error("study %s: hand-off failed, %d images kept in %s for the next push: %s", name,
                      received + earlier, target, exc)
            self._submitted[name] = (target, None)
            return
        target.with_suffix(".done").touch()
        self._submitted[name] = (target, time.time())

    def _forget_ignored(self) -> None:
        """One log line per study for the objects it sent that are not images, once it is quiet."""
        now = time.monotonic()
        with self._lock:
            still_open = set().union(*self._assoc_studies.values())
            done = {name: counts for name, (counts, last) in self._ignored.items()
                    if name not in still_open and now - last >= self.quiet_s}
            for name in done:
                del self._ignored[name]
        for name, counts in done.items():
            what = ", ".join(f"{n} {sop_class}" for sop_class, n in sorted(counts.items()))
            log.info("study %s: acknowledged but not submitted (not images): %s", name, what)

    def _expire_submissions(self) -> None:
        now = time.time()
        for name, (folder, handed_off_at) in list(self._submitted.items()):
            if handed_off_at is not None and now - handed_off_at >= self.keep_s:
                del self._submitted[name]
                self._released[name] = now
                shutil.rmtree(folder, ignore_errors=True)
                folder.with_suffix(".done").unlink(missing_ok=True)
                try:
                    folder.parent.rmdir()
                except OSError:  # another submission of the study is there
                    pass


def _release_when_idle(event) -> None:
    """A sender idle past the network timeout is released, not aborted: its study is complete as
    far as it is concerned (every image it sent was acknowledged), and an abort would hold it back."""
    event.assoc.network_timeout_response = "A-RELEASE"


def _address(assoc) -> str:
    return f"{assoc.requestor.address}:{assoc.requestor.port}"


def _peer(assoc) -> str:
    return f"{str(assoc.requestor.ae_title).strip()}@{assoc.requestor.address}"
