"""A study pushed by C-STORE (as a modality or PACS does) becomes a gateway submission."""

from __future__ import annotations

import time

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from tests.dicom_factory import write_cine_study


def _push(port: int, files) -> list[int]:
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(MRImageStorage)
    assoc = scu.associate("127.0.0.1", port, ae_title="CMRVL")
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    assoc.release()
    return statuses


def test_pushed_study_is_submitted_once_and_the_incoming_files_are_removed(stack_info, gateway, tmp_path):
    from services.gateway.dicom_ingest import make_submitter
    from services.preprocess.cstore import StudyReceiver

    spec = write_cine_study(tmp_path / "scanner", n_slices=4, n_phases=5)
    submitted = []
    incoming = tmp_path / "incoming"
    with StudyReceiver(incoming, make_submitter(stack_info.target("gateway"), stack_info.ris_token, submitted),
                       port=0) as receiver:
        assert set(_push(receiver.port, spec.files)) == {0x0000}
        deadline = time.monotonic() + 60
        while not submitted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(submitted) == 1
        study = submitted[0]
        assert study.study_instance_uid == spec.study_instance_uid
        assert not any(incoming.rglob("*.dcm"))  # handed over, nothing left behind
        # The same push again is the same submission, not a second study.
        assert set(_push(receiver.port, spec.files)) == {0x0000}
        deadline = time.monotonic() + 60
        while len(submitted) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert submitted[1].study_id == study.study_id
    final = list(gateway.watch(study.study_id, timeout_s=300))[-1]
    assert final.percent == 100.0


def test_pushed_study_stays_on_disk_when_the_gateway_is_unreachable(tmp_path):
    from services.gateway.dicom_ingest import make_submitter
    from services.preprocess.cstore import StudyReceiver

    spec = write_cine_study(tmp_path / "scanner", n_slices=4, n_phases=5)
    incoming = tmp_path / "incoming"
    submitted = []
    with StudyReceiver(incoming, make_submitter("127.0.0.1:9", "token", submitted), port=0) as receiver:
        assert set(_push(receiver.port, spec.files)) == {0x0000}
        time.sleep(1.0)
    assert not submitted
    assert len(list(incoming.rglob("*.dcm"))) == len(spec.files)  # no data lost
