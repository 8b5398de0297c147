"""C-STORE receiver: a study pushed over loopback arrives intact and is handed off once, however
many associations carry it; late images re-run the study; non-images are acknowledged, not handed
off; wrong AE titles are refused. The hand-off callback here records what it is given (it is the
receiver's real API); tests/test_gateway_dicom_ingest.py hands off to a real gateway."""

from __future__ import annotations

import logging
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import BasicTextSRStorage, SegmentationStorage, Verification

import dicom_factory as factory
from services.preprocess.cstore import SUBMISSIONS, StudyReceiver
from services.preprocess.reader import quiet_pydicom
from services.preprocess.study import load_volume, preprocess_study

QUIET_S = 0.5


class HandOffs:
    """The receiver's callback, recording each hand-off (the SOP files it held at that moment)."""

    def __init__(self, failures: int = 0):
        self.calls: queue.Queue = queue.Queue()
        self.failures = failures

    def __call__(self, study_uid: str, folder: Path) -> None:
        names = sorted(p.name for p in folder.glob("*.dcm"))
        failed = self.failures > 0
        self.failures -= failed
        self.calls.put((study_uid, folder, names, failed))
        if failed:
            raise RuntimeError("gateway down")

    def get(self, timeout: float = 20):
        return self.calls.get(timeout=timeout)

    def assert_no_more(self, wait_s: float = 4 * QUIET_S) -> None:
        time.sleep(wait_s)
        assert self.calls.empty(), f"unexpected hand-off: {self.calls.get()[:3]}"


def _push(port: int, datasets, ae_title: str = "CMRVL", calling: str = "TESTSCU", abort: bool = False) -> list[int]:
    datasets = [d if isinstance(d, Dataset) else pydicom.dcmread(d) for d in datasets]
    scu = AE(ae_title=calling)
    for sop_class in {str(d.SOPClassUID) for d in datasets} | {Verification}:
        scu.add_requested_context(sop_class)
    assoc = scu.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    statuses = [assoc.send_c_store(d).Status for d in datasets]
    if abort:
        assoc.abort()
    else:
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    return statuses


def _sop_names(files) -> list[str]:
    with quiet_pydicom():  # the Sunnybrook study's UIDs are invalid
        return sorted(f"{pydicom.dcmread(f, specific_tags=['SOPInstanceUID']).SOPInstanceUID}.dcm" for f in files)


def _non_image(sop_class: str, study_uid: str, pixels: bool) -> Dataset:
    """A minimal SR (no pixel data) or SEG-like object (pixel data, derived-object class)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = "SEG" if pixels else "SR"
    if pixels:
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.SamplesPerPixel = 1, 1
        ds.PixelData = bytes(8)
    return ds


def test_pushed_study_arrives_intact(tmp_path):
    source = tmp_path / "source"
    spec = factory.write_cine_study(source)
    factory.write_enhanced_cine(source / "enhanced.dcm", study_uid=spec.study_instance_uid)
    files = sorted(source.iterdir())
    handoffs = HandOffs()
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S) as receiver:
        assert _push(receiver.port, files) == [0] * len(files)
        study_uid, folder, names, _ = handoffs.get()
        handoffs.assert_no_more()
    assert study_uid == spec.study_instance_uid
    assert folder.parent == tmp_path / "incoming" / SUBMISSIONS / study_uid  # its own folder
    assert not (tmp_path / "incoming" / study_uid).exists()
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in folder.glob("*.dcm")}
    assert len(received) == len(files) == len(names) and not list(tmp_path.rglob("*.part"))
    for path in files:
        sent = pydicom.dcmread(path)
        assert received[sent.SOPInstanceUID] == sent  # every element, pixel data included
    # The received folder is a usable study with the same cine as the source.
    m1 = preprocess_study(source, tmp_path / "out1")
    m2 = preprocess_study(folder, tmp_path / "out2")
    assert [s["series_instance_uid"] for s in m1["series"]] == [s["series_instance_uid"] for s in m2["series"]]
    for e1, e2 in zip(m1["series"], m2["series"]):
        (d1, a1), (d2, a2) = load_volume(tmp_path / "out1", e1), load_volume(tmp_path / "out2", e2)
        assert np.array_equal(d1, d2) and np.array_equal(a1, a2) and d1.size > 0


def test_a_study_sent_over_several_associations_is_handed_off_once_whole(tmp_path):
    """As Orthanc does (one association per SOP class, one after the other) and as two parallel
    senders do: one hand-off with every image, never a part of the study."""
    source = tmp_path / "source"
    spec = factory.write_cine_study(source, n_slices=4, n_phases=6, rows=8, cols=8)
    factory.write_enhanced_cine(source / "enhanced.dcm", study_uid=spec.study_instance_uid)
    files = sorted(source.iterdir())
    handoffs = HandOffs()
    quiet_s = 2.0  # longer than any gap between these associations, even on a loaded machine
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=quiet_s) as receiver:
        assert _push(receiver.port, spec.files) == [0] * len(spec.files)   # MR Image Storage
        assert _push(receiver.port, [source / "enhanced.dcm"]) == [0]      # then Enhanced MR
        _, _, names, _ = handoffs.get()
        assert names == _sop_names(files)
        handoffs.assert_no_more(2 * quiet_s)

        other = factory.write_cine_study(tmp_path / "other", n_slices=4, n_phases=10, rows=8, cols=8)
        halves = [other.files[0::2], other.files[1::2]]
        results: list = [None, None]

        def send(i):  # small pauses keep both associations interleaved
            results[i] = [_push(receiver.port, halves[i][j:j + 5]) for j in range(0, len(halves[i]), 5)]

        threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s == 0 for r in results for batch in r for s in batch)
        uid, _, names, _ = handoffs.get()
        assert uid == other.study_instance_uid and names == _sop_names(other.files)
        handoffs.assert_no_more(2 * quiet_s)


def test_objects_that_are_not_images_are_acknowledged_but_never_handed_off(tmp_path, caplog):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    sr = _non_image(BasicTextSRStorage, spec.study_instance_uid, pixels=False)
    seg = _non_image(SegmentationStorage, spec.study_instance_uid, pixels=True)
    handoffs = HandOffs()
    caplog.set_level(logging.INFO, logger="services.preprocess.cstore")
    quiet_s = 2.0  # the SR and the SEG below come in two associations: one log line for both
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=quiet_s) as receiver:
        assert _push(receiver.port, [*spec.files, sr, seg]) == [0] * (len(spec.files) + 2)  # no retry storm
        _, folder, names, _ = handoffs.get()
        assert names == _sop_names(spec.files)
        # The platform's own SR/SEG coming back from a PACS: acknowledged, no study created.
        back = factory.write_cine_study(tmp_path / "back", n_slices=1, n_phases=1, rows=8, cols=8)
        sr2, seg2 = (_non_image(c, back.study_instance_uid, p) for c, p in
                     ((BasicTextSRStorage, False), (SegmentationStorage, True)))
        assert _push(receiver.port, [sr2]) == [0]
        assert _push(receiver.port, [seg2]) == [0]
        handoffs.assert_no_more(2 * quiet_s)
    assert not (tmp_path / "incoming" / back.study_instance_uid).exists()
    ignored = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(ignored) == 2  # one line per study, not one per object
    assert any(back.study_instance_uid in m and "Basic Text SR Storage" in m and "Segmentation Storage" in m
               for m in ignored)


def test_a_late_image_re_runs_the_study_with_the_images_handed_off_before(tmp_path):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    handoffs = HandOffs()
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S, keep_s=600) as receiver:
        _push(receiver.port, spec.files[:-1])
        _, first, names, _ = handoffs.get()
        assert names == _sop_names(spec.files[:-1])
        _push(receiver.port, spec.files[-1:])  # after the hand-off
        _, second, names, _ = handoffs.get()
        assert names == _sop_names(spec.files)  # the whole study again, in a new folder
        assert second != first and not first.exists()
        handoffs.assert_no_more()


def test_submitted_files_are_deleted_after_keep_s_and_a_later_image_is_reported(tmp_path, caplog):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    handoffs = HandOffs()
    caplog.set_level(logging.INFO, logger="services.preprocess.cstore")
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S, keep_s=0.5) as receiver:
        _push(receiver.port, spec.files[:-1])
        _, folder, _, _ = handoffs.get()
        deadline = time.monotonic() + 10
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not folder.exists() and not list((tmp_path / "incoming").rglob("*.dcm"))
        _push(receiver.port, spec.files[-1:])  # later than keep_s: handed off alone, and said so
        _, _, names, _ = handoffs.get()
    assert names == _sop_names(spec.files[-1:])
    late = [r for r in caplog.records if "after keep_s" in r.getMessage()]
    assert len(late) == 1 and late[0].levelno == logging.WARNING


def test_a_failed_hand_off_keeps_the_files_and_the_next_push_retries_with_them(tmp_path):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    handoffs = HandOffs(failures=1)
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S, keep_s=0) as receiver:
        _push(receiver.port, spec.files)
        _, folder, names, failed = handoffs.get()
        assert failed and names == _sop_names(spec.files)
        time.sleep(4 * QUIET_S)  # keep_s=0 only applies to successful hand-offs
        assert sorted(p.name for p in folder.glob("*.dcm")) == names
        _push(receiver.port, spec.files[:1])  # any new push of the study retries the whole of it
        _, _, names, failed = handoffs.get()
        assert not failed and names == _sop_names(spec.files)


def test_aborted_push_is_not_submitted(tmp_path):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    handoffs = HandOffs()
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S) as receiver:
        assert _push(receiver.port, spec.files[:4], abort=True) == [0] * 4
        handoffs.assert_no_more()
        assert len(list((tmp_path / "incoming" / spec.study_instance_uid).glob("*.dcm"))) == 4  # kept
        # A complete push afterwards is handed off, once, whole.
        assert _push(receiver.port, spec.files) == [0] * len(spec.files)
        uid, _, names, _ = handoffs.get()
        assert uid == spec.study_instance_uid and names == _sop_names(spec.files)
        handoffs.assert_no_more()


def test_a_sender_that_stays_idle_is_released_by_the_network_timeout_and_its_study_handed_off(tmp_path):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    handoffs = HandOffs()
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S) as receiver:
        receiver.ae.network_timeout = 1.0
        scu = AE(ae_title="IDLE")
        scu.add_requested_context(str(pydicom.dcmread(spec.files[0]).SOPClassUID))
        assoc = scu.associate("127.0.0.1", receiver.port, ae_title="CMRVL")
        assert all(assoc.send_c_store(pydicom.dcmread(f)).Status == 0 for f in spec.files)
        _, _, names, _ = handoffs.get(timeout=20)  # the association is never released by the sender
        assert names == _sop_names(spec.files)
        assoc.abort()


def test_images_received_before_a_restart_are_handed_off_by_the_next_start(tmp_path):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    handoffs = HandOffs()
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=60) as receiver:
        _push(receiver.port, spec.files)
    assert handoffs.calls.empty()  # stopped within the quiet period
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=QUIET_S):
        _, _, names, _ = handoffs.get()
    assert names == _sop_names(spec.files)


def test_wrong_called_or_calling_ae_title_is_refused_and_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="services.preprocess.cstore")
    echoscu = shutil.which("echoscu")
    with StudyReceiver(tmp_path / "incoming", HandOffs(), port=0, quiet_s=QUIET_S,
                       allowed_calling_aets=["MODALITY"]) as receiver:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(Verification)
        assert not scu.associate("127.0.0.1", receiver.port, ae_title="WRONG").is_established
        assert not AE(ae_title="STRANGER").associate("127.0.0.1", receiver.port, ae_title="CMRVL",
                                                      contexts=scu.requested_contexts).is_established
        assoc = scu.associate("127.0.0.1", receiver.port, ae_title="CMRVL")
        assert assoc.is_established
        assoc.release()
        if echoscu is None:
            pytest.fail("echoscu (DCMTK) missing: run infra/tools/install-dicom-tools.sh")
        port = str(receiver.port)
        assert subprocess.run([echoscu, "-aet", "MODALITY", "-aec", "WRONG", "127.0.0.1", port],
                              capture_output=True).returncode != 0
        assert subprocess.run([echoscu, "-aet", "MODALITY", "-aec", "CMRVL", "127.0.0.1", port],
                              capture_output=True).returncode == 0
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused association")]
    assert len(refused) == 3
    assert "called AE title 'WRONG' is not 'CMRVL'" in refused[0]
    assert "calling AE title 'STRANGER' is not in the allowed list" in refused[1]


def test_two_parallel_storescu_pushes_of_a_real_study_are_one_hand_off(tmp_path, caplog):
    from conftest import SUNNYBROOK_STUDY, require

    study = require(SUNNYBROOK_STUDY)
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.fail("storescu (DCMTK) missing: run infra/tools/install-dicom-tools.sh")
    files = sorted(study.glob("*.dcm"))
    expected = _sop_names(files)
    caplog.set_level(logging.INFO, logger="services.preprocess.cstore")
    handoffs = HandOffs()
    with StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=3.0) as receiver:
        pushes = [subprocess.Popen([storescu, "-aec", "CMRVL", "127.0.0.1", str(receiver.port), *map(str, half)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                  for half in (files[:120], files[120:])]
        for push in pushes:
            output = push.communicate(timeout=120)[0]
            assert push.returncode == 0, output[-2000:]
        _, folder, names, _ = handoffs.get(timeout=60)
        handoffs.assert_no_more(6.0)
    # The receiver logs per association and per study, not per file (see also cmrvl receive's
    # test in test_gateway_dicom_ingest.py, which quiets pydicom and pynetdicom too).
    own = [r.getMessage() for r in caplog.records if r.name == "services.preprocess.cstore"]
    assert len(own) < 10, own
    assert names == expected and len(names) == 240
    cine = preprocess_study(folder, tmp_path / "out")["series"][0]
    assert (cine["n_slices"], cine["n_phases"]) == (12, 20)
