"""A real PACS (Orthanc, started by the test on loopback) pushes a whole study to the receiver.

Orthanc's `/modalities/{id}/store` opens one association per SOP class, so a study with earlier
SR/SEG objects arrives over several associations: exactly one hand-off must hold all its images,
and the SR must not be handed off."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import BasicTextSRStorage

from conftest import SUNNYBROOK_STUDY, require
from orthanc_server import OrthancError, OrthancServer
from services.preprocess.cstore import StudyReceiver
from services.preprocess.reader import quiet_pydicom
from test_preprocess_cstore import HandOffs, _sop_names


def basic_text_sr(image: Path) -> Dataset:
    """An SR of the image's study (patient and study attributes copied), as a report would be."""
    with quiet_pydicom():  # the Sunnybrook study's UIDs and dates are invalid: copied as they are
        ref = pydicom.dcmread(image, stop_before_pixels=True)
        return _sr_of(ref)


def _sr_of(ref: Dataset) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, getattr(ref, keyword, ""))
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 999, 1
    ds.Modality = "SR"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [concept]
    ds.CompletionFlag, ds.VerificationFlag = "PARTIAL", "UNVERIFIED"
    return ds


@pytest.fixture()
def orthanc_and_receiver(tmp_path):
    handoffs = HandOffs()
    receiver = StudyReceiver(tmp_path / "incoming", handoffs, port=0, quiet_s=2.0)
    receiver.start()
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"cmrvl": ("CMRVL", "127.0.0.1", receiver.port)})
    try:
        orthanc.start()
    except OrthancError as exc:
        receiver.stop()
        pytest.fail(str(exc))
    yield orthanc, receiver, handoffs
    orthanc.stop()
    receiver.stop()


def test_orthanc_pushes_a_study_with_an_earlier_sr_as_one_hand_off_of_all_its_images(
        orthanc_and_receiver, tmp_path, caplog):
    orthanc, receiver, handoffs = orthanc_and_receiver
    study = require(SUNNYBROOK_STUDY)
    files = sorted(study.glob("*.dcm"))
    sr = basic_text_sr(files[0])
    (tmp_path / "sr.dcm").write_bytes(_encoded(sr))
    answers = orthanc.upload([*files, tmp_path / "sr.dcm"])
    orthanc_study = {a["ParentStudy"] for a in answers}
    assert len(orthanc_study) == 1  # Orthanc sees one study: 240 MR + 1 SR
    orthanc_study = orthanc_study.pop()
    assert orthanc.get(f"/studies/{orthanc_study}/statistics")["CountInstances"] == 241

    caplog.set_level(logging.INFO, logger="services.preprocess.cstore")
    answer = orthanc.post("/modalities/cmrvl/store", {"Resources": [orthanc_study], "Synchronous": True})
    assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (241, 0)  # the SR acknowledged too

    study_uid, folder, names, _ = handoffs.get(timeout=60)
    handoffs.assert_no_more(6.0)  # Orthanc keeps an idle association open a few seconds
    assert names == _sop_names(files) and len(names) == 240
    assert f"{sr.SOPInstanceUID}.dcm" not in names
    messages = [r.getMessage() for r in caplog.records if r.name == "services.preprocess.cstore"]
    assert any("not images" in m and "Basic Text SR Storage" in m for m in messages), messages


def test_orthanc_jobs_pushing_one_study_over_parallel_associations_are_one_hand_off(orthanc_and_receiver, caplog):
    """Two store jobs at once (Orthanc runs them concurrently, each with its own association), the
    second one with the SR: what lost images when each released association was taken as a study."""
    orthanc, receiver, handoffs = orthanc_and_receiver
    files = sorted(require(SUNNYBROOK_STUDY).glob("*.dcm"))
    ids = [a["ID"] for a in orthanc.upload(files)]
    sr = basic_text_sr(files[0])
    sr_id = orthanc.request("POST", "/instances", _encoded(sr), "application/dicom")["ID"]
    caplog.set_level(logging.INFO, logger="services.preprocess.cstore")
    jobs = [orthanc.post("/modalities/cmrvl/store", {"Resources": part, "Asynchronous": True})["ID"]
            for part in (ids[0::2], [*ids[1::2], sr_id])]
    deadline = time.monotonic() + 120
    while {orthanc.get(f"/jobs/{job}")["State"] for job in jobs} - {"Success"}:
        states = {orthanc.get(f"/jobs/{job}")["State"] for job in jobs}
        assert not states & {"Failure", "Paused"} and time.monotonic() < deadline, states
        time.sleep(0.2)
    _, _, names, _ = handoffs.get(timeout=60)
    handoffs.assert_no_more(6.0)
    assert names == _sop_names(files) and len(names) == 240
    released = [r.getMessage() for r in caplog.records if r.getMessage().startswith("association from ORTHANC@")]
    assert len(released) >= 2, released


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

