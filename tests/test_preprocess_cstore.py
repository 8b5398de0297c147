"""C-STORE receiver: a study pushed over loopback arrives intact and is handed off once."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, Verification

import dicom_factory as factory
from services.preprocess.cstore import StudyReceiver
from services.preprocess.study import load_volume, preprocess_study


def _push(port: int, files: list[Path], ae_title: str = "CMRVL") -> list[int]:
    scu = AE(ae_title="TESTSCU")
    scu.add_requested_context(MRImageStorage)
    scu.add_requested_context(EnhancedMRImageStorage)
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    return statuses


def test_pushed_study_arrives_intact(tmp_path):
    source = tmp_path / "source"
    spec = factory.write_cine_study(source)
    factory.write_enhanced_cine(source / "enhanced.dcm", study_uid=spec.study_instance_uid)
    files = sorted(source.iterdir())
    arrived: queue.Queue = queue.Queue()
    with StudyReceiver(tmp_path / "incoming", lambda uid, folder: arrived.put((uid, folder)),
                       port=0) as receiver:
        assert _push(receiver.port, files) == [0] * len(files)
        study_uid, folder = arrived.get(timeout=20)
    assert arrived.empty()  # one hand-off per study per association
    assert study_uid == spec.study_instance_uid
    assert folder == tmp_path / "incoming" / study_uid
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
                for p in folder.glob("*.dcm")}
    assert len(received) == len(files) and not list(folder.glob("*.part"))
    for path in files:
        sent = pydicom.dcmread(path)
        got = received[sent.SOPInstanceUID]
        assert got == sent  # every element, pixel data included (transfer syntax may differ)
    # The received folder is a usable study with the same cine as the source.
    m1 = preprocess_study(source, tmp_path / "out1")
    m2 = preprocess_study(folder, tmp_path / "out2")
    assert [s["series_instance_uid"] for s in m1["series"]] == \
        [s["series_instance_uid"] for s in m2["series"]]
    for e1, e2 in zip(m1["series"], m2["series"]):
        (d1, a1), (d2, a2) = load_volume(tmp_path / "out1", e1), load_volume(tmp_path / "out2", e2)
        assert np.array_equal(d1, d2) and np.array_equal(a1, a2) and d1.size > 0


def test_aborted_push_is_not_submitted(tmp_path):
    spec = factory.write_cine_study(tmp_path / "source", n_slices=3, n_phases=5, rows=8, cols=8)
    arrived: queue.Queue = queue.Queue()
    with StudyReceiver(tmp_path / "incoming", lambda uid, folder: arrived.put(uid),
                       port=0) as receiver:
        scu = AE(ae_title="TESTSCU")
        scu.add_requested_context(MRImageStorage)
        assoc = scu.associate("127.0.0.1", receiver.port, ae_title="CMRVL")
        assert assoc.send_c_store(pydicom.dcmread(spec.files[0])).Status == 0
        assoc.abort()
        # A complete push afterwards is still handed off.
        assert _push(receiver.port, spec.files) == [0] * len(spec.files)
        assert arrived.get(timeout=20) == spec.study_instance_uid
    assert arrived.empty()
