"""SR and SEG as third-party DICOM tools see them (issue 15): dicom3tools' `dciodvfy` (IOD
conformance) and `dcentvfy` (one patient/study across files), DCMTK's `dsrdump` / `dsr2xml` on
their default settings (what DCMTK-based viewers do), on two sources:

- a synthetic study with valid UIDs whose patient/study attributes are complete: zero errors;
- the real Sunnybrook study, whose UIDs have components with leading zeros, whose StudyDate
  (20120000) and PatientBirthDate (00000000) are not dates and which lacks ReferringPhysicianName.
  SR and SEG must reference and copy those as they are (they are the source's identity), so the
  only errors allowed are the source's own, each recognised by a rule below, and the report's
  quality section must say that the source is not conformant.

Also: a re-run writes a new SR (own series and instance) that names its predecessor, and images
whose ImageOrientationPatient differ by rounding (1e-6) still give SR + SEG.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from tests.conftest import SUNNYBROOK_STUDY, object_store, require

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about invalid UIDs
TOOLS = ("dciodvfy", "dcentvfy", "dsrdump", "dsr2xml")
MODEL = {"name": "conformance-test", "version": "2.1", "backend": "onnxruntime"}
# dciodvfy's closing line whenever any element failed its VR check (then listed above it).
VR_SUMMARY = "Error - Dicom dataset contains invalid data values for Value Representations"


@pytest.fixture(scope="module", autouse=True)
def tools():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"DICOM tools not installed ({missing}): bash infra/tools/install-dicom-tools.sh")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dciodvfy: its lines start with "Error - " or "Warning - "; the rest
    (the IOD name it recognised) is neither."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    return [x for x in lines if x.startswith("Error - ")], [x for x in lines if x.startswith("Warning - ")]


def dcmtk_reads(tool: str, path: Path) -> subprocess.CompletedProcess:
    """dsrdump / dsr2xml with DCMTK's defaults; they log E:/F: lines for what makes them refuse."""
    return subprocess.run([tool, str(path)], capture_output=True, text=True)


def dcentvfy(paths: list[Path]) -> list[str]:
    out = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True)
    return [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]


def study_level_mismatches(lines: list[str]) -> list[str]:
    """dcentvfy's findings about the patient/study across the files. "Different information
    entities" is left out: it says that dicom3tools' IOD tables file AccessionNumber and
    ReferencedStudySequence under another entity for MR, SR and SEG (it compares no values)."""
    return [x for x in lines if "Different information entities" not in x]


def _save(objects: dict[str, pydicom.Dataset], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, ds in objects.items():
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


def _labels(entry: dict) -> np.ndarray:
    """LV cavity, myocardium ring and RV disc on every slice, contracting over the phases."""
    cols, rows, n_slices, n_phases = entry["columns"], entry["rows"], entry["n_slices"], entry["n_phases"]
    labels = np.zeros((cols, rows, n_slices, n_phases), np.uint8)
    x, y = np.ogrid[:cols, :rows]
    for t in range(n_phases):
        r = 10 - t
        d = (x - 20) ** 2 + (y - 24) ** 2
        plane = np.zeros((cols, rows), np.uint8)
        plane[d <= (r + 3) ** 2] = 2
        plane[d <= r ** 2] = 1
        plane[(x - 37) ** 2 + (y - 24) ** 2 <= (r - 2) ** 2] = 3
        labels[:, :, :, t] = plane[:, :, None]
    return labels


def _labels_rv_larger_at_es(entry: dict) -> np.ndarray:
    """_labels, but the RV at ES larger than at ED on slice 0: the measuring code keeps the RV
    values and flags them doubtful (es_larger_than_ed_on_slices)."""
    labels = _labels(entry)
    x, y = np.ogrid[:entry["columns"], :entry["rows"]]
    plane = labels[:, :, 0, entry["n_phases"] - 1]
    plane[((x - 37) ** 2 + (y - 24) ** 2 <= 11 ** 2) & (plane == 0)] = 3
    return labels


def write_conformant_study(folder: Path, **kwargs):
    """The test factory's cine plus the patient/study attributes it leaves out, so that nothing
    the SR/SEG copy from it is non-conformant."""
    from dicom_factory import write_cine_study

    spec = write_cine_study(folder, n_slices=4, n_phases=5, rows=48, cols=48, **kwargs)
    for path in spec.files:
        ds = pydicom.dcmread(path)
        ds.ReferringPhysicianName, ds.StudyID, ds.PatientBirthDate = "Ref^Doctor", "42", "19700101"
        ds.save_as(path, enforce_file_format=True)
    return spec


def build_outputs(dicom_dir: Path, work: Path, labels_of=_labels, run: str = "run-1"):
    from services.gateway.dicom_sr import build_sr, seg_source_uids
    from services.preprocess.study import preprocess_study
    from services.segmentation.dicom_seg import build_segs, cine_entry, read_source_headers
    from services.segmentation.function import measure_labels

    manifest = preprocess_study(dicom_dir, work / "pre")
    entry = cine_entry(manifest)
    labels = labels_of(entry)
    measurements = measure_labels(labels, np.array(entry["affine"]), height_m=1.75, weight_kg=70)
    segs = build_segs(dicom_dir, manifest, labels, MODEL, measurements=measurements, run=run)
    headers = list(read_source_headers(dicom_dir, seg_source_uids(segs.values())).values())
    report = {"measurements": {k: v for k, v in measurements.items()
                               if k not in ("quality", "model", "lv_volume_curve_ml", "rv_volume_curve_ml")},
              "models": {"segmentation": MODEL}, "quality": measurements["quality"]}
    sr = build_sr(segs, headers, report, run=run)
    paths = _save({"sr": sr, **{f"seg_{t}": s for t, s in segs.items()}}, work / "out")
    return SimpleNamespace(manifest=manifest, entry=entry, labels=labels, measurements=measurements, segs=segs,
                           sr=sr, headers=headers, paths=paths, report=report)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    work = tmp_path_factory.mktemp("valid")
    spec = write_conformant_study(work / "dicom")
    return SimpleNamespace(spec=spec, dicom=work / "dicom", **vars(build_outputs(work / "dicom", work)))


def _sunnybrook_labels(entry: dict) -> np.ndarray:
    from training.nnunet.sunnybrook import load_case

    case = load_case(SUNNYBROOK_STUDY, SUNNYBROOK_STUDY.parent / "contours" / "SC-HF-I-1")
    labels = np.zeros((entry["columns"], entry["rows"], entry["n_slices"], entry["n_phases"]), np.uint8)
    labels[..., case.ed_phase], labels[..., case.es_phase] = case.labels["ed"], case.labels["es"]
    return labels


@pytest.fixture(scope="module")
def sunnybrook(tmp_path_factory):
    require(SUNNYBROOK_STUDY)
    return build_outputs(SUNNYBROOK_STUDY, tmp_path_factory.mktemp("sunnybrook"), _sunnybrook_labels)


# --- a source with valid UIDs: no error at all ------------------------------------------------

def test_valid_source_gives_sr_and_segs_without_dciodvfy_errors(valid):
    for name, path in valid.paths.items():
        errors, _ = dciodvfy(path)
        assert errors == [], f"{name}: {errors}"
    # Here the structure groups are TID 1411 ones, naming the SEG segment and its source images.
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(valid.sr)
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 5


def test_valid_source_sr_reads_in_dcmtk(valid):
    for tool in ("dsrdump", "dsr2xml"):
        result = dcmtk_reads(tool, valid.paths["sr"])
        assert result.returncode == 0, f"{tool}: {result.stderr}"
        assert not re.search(r"^[EF]: ", result.stderr, re.M), result.stderr
    assert "Referenced Segment" in dcmtk_reads("dsrdump", valid.paths["sr"]).stdout


def test_doubted_values_are_marked_in_the_sr_and_it_stays_conformant(valid, tmp_path):
    from services.gateway.dicom_sr import FLAG_SCHEME, read_sr_doubts, read_sr_measurements

    code = "es_larger_than_ed_on_slices"
    # The cylinder phantom already has doubted values (no apex, curve not cyclic), but not this flag.
    assert read_sr_doubts(valid.sr) and not any(code in codes for codes in read_sr_doubts(valid.sr).values())
    write_conformant_study(tmp_path / "dicom")
    odd = build_outputs(tmp_path / "dicom", tmp_path, _labels_rv_larger_at_es)
    flag = next(f for f in odd.measurements["quality"] if f["code"] == code)
    assert "rv_ef_pct" in flag["doubts"] and odd.measurements["rv_ef_pct"] is not None
    # Still measured, and each RV group (and no LV group) names the flag.
    written = read_sr_measurements(odd.sr)
    assert written["rv_ef_pct"] == odd.measurements["rv_ef_pct"]
    marked = {group for group, codes in read_sr_doubts(odd.sr).items() if code in codes}
    assert marked == {"RV cavity at ED", "RV cavity at ES", "RV function"}
    assert [s.CodingSchemeDesignator for s in odd.sr.CodingSchemeIdentificationSequence] == [FLAG_SCHEME]
    assert dciodvfy(odd.paths["sr"])[0] == []
    dump = dcmtk_reads("dsrdump", odd.paths["sr"])
    assert dump.returncode == 0 and not re.search(r"^[EF]: ", dump.stderr, re.M), dump.stderr
    assert "Quality Finding" in dump.stdout and "es larger than ed on slices" in dump.stdout


def test_valid_source_patient_and_study_match_across_files(valid):
    lines = dcentvfy([*valid.spec.files, *valid.paths.values()])
    assert study_level_mismatches(lines) == []


# --- Sunnybrook: only the source's own errors -------------------------------------------------

def _source_faults(sunnybrook) -> tuple[set[str], set[str]]:
    """(the source's invalid UIDs, dciodvfy's error lines on the source images themselves)."""
    from pydicom.uid import UID

    uids = {str(ds.get(k)) for ds in sunnybrook.headers
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")}
    invalid = {u for u in uids if not UID(u).is_valid}
    files = {ds.SOPInstanceUID: None for ds in sunnybrook.headers}
    errors: set[str] = set()
    for path in sorted(SUNNYBROOK_STUDY.glob("*.dcm")):
        if pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID in files:
            errors |= set(dciodvfy(path)[0])
    return invalid, errors


def source_own(error: str, invalid_uids: set[str], source_errors: set[str]) -> str | None:
    """Why an error of our SR/SEG is the source's own, or None when it is the platform's:
    - "Leading zeroes" in a UID that is one of the source's (its study, series, image or frame of
      reference UID): SR and SEG must reference the source by its real UIDs;
    - the very same line in dciodvfy's output for the source images (their StudyDate/
      PatientBirthDate values, their missing Type 2 ReferringPhysicianName): patient/study
      attributes are copied as the source has them, so that the PACS files SR/SEG into its study;
    - the VR summary line, which follows any of the first kind."""
    uid = re.search(r"UI \[\d+\] = <([0-9.]+)> - Leading zeroes", error)
    if uid and uid.group(1) in invalid_uids:
        return "source UID"
    if error in source_errors:
        return "same error in the source"
    if error == VR_SUMMARY:
        return "VR summary"
    return None


def test_sunnybrook_sr_and_segs_carry_only_the_sources_errors(sunnybrook):
    invalid_uids, source_errors = _source_faults(sunnybrook)
    assert invalid_uids and source_errors  # the premise: this source is not conformant
    for name, path in sunnybrook.paths.items():
        errors, _ = dciodvfy(path)
        own = [e for e in errors if source_own(e, invalid_uids, source_errors) is None]
        assert own == [], f"{name}: errors of the platform's own making: {own}"
        reasons = {source_own(e, invalid_uids, source_errors) for e in errors}
        assert {"source UID", "same error in the source"} <= reasons, name  # the rules were exercised


def test_sunnybrook_sr_reads_in_dcmtk(sunnybrook):
    for tool in ("dsrdump", "dsr2xml"):
        result = dcmtk_reads(tool, sunnybrook.paths["sr"])
        assert result.returncode == 0, f"{tool}: {result.stderr}"
        # Warnings only, about the source's UIDs and dates in the header (W: ... violates VR).
        assert not re.search(r"^[EF]: ", result.stderr, re.M), result.stderr


def test_sunnybrook_patient_and_study_are_the_sources(sunnybrook):
    files = sorted(SUNNYBROOK_STUDY.glob("*.dcm"))
    assert study_level_mismatches(dcentvfy([*files, *sunnybrook.paths.values()])) == []
    # dcentvfy leaves AccessionNumber out (see study_level_mismatches): compare the elements.
    from services.segmentation.dicom_seg import STUDY_ATTRIBUTES

    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for name, path in sunnybrook.paths.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in STUDY_ATTRIBUTES:
            assert (keyword in ds) == (keyword in source), f"{name} {keyword}"
            if keyword in source:
                assert ds[keyword].value == source[keyword].value, f"{name} {keyword}"
    assert pydicom.dcmread(sunnybrook.paths["sr"]).StudyDate == "20120000"  # odd, and kept


def test_sunnybrook_sr_equipment_is_the_scanner_and_the_model(sunnybrook):
    from services.segmentation.dicom_seg import device_uid

    source = sunnybrook.headers[0]
    for name, ds in {"sr": sunnybrook.sr, **{f"seg_{t}": s for t, s in sunnybrook.segs.items()}}.items():
        acquisition = [e for e in ds.ContributingEquipmentSequence
                       if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
        assert [(e.Manufacturer, e.ManufacturerModelName) for e in acquisition] == \
            [(source.Manufacturer, source.ManufacturerModelName)], name
    for seg in sunnybrook.segs.values():
        assert seg.DeviceSerialNumber == device_uid(MODEL["name"], MODEL["version"])
        assert MODEL["backend"] not in str(seg.DeviceSerialNumber)
        # Sunnybrook has no RV contour: the SEG declares no RV segment.
        assert [i.SegmentLabel for i in seg.SegmentSequence] == ["LV cavity", "LV myocardium"]


def test_source_conformance_names_what_the_source_gets_wrong(sunnybrook, valid):
    from services.segmentation.dicom_seg import source_conformance

    issues = {q["code"]: q["message"] for q in source_conformance(sunnybrook.headers)}
    assert set(issues) == {"source_invalid_uids", "source_invalid_values", "source_missing_type2"}
    assert "leading zero" in issues["source_invalid_uids"]
    assert "20120000" in issues["source_invalid_values"] and "00000000" in issues["source_invalid_values"]
    assert "ReferringPhysicianName" in issues["source_missing_type2"]
    assert source_conformance(valid.headers) == []


# --- orientation rounding ---------------------------------------------------------------------

def _jittered_study(folder: Path, jitter: float):
    from dicom_factory import SAX_IOP

    iop = tuple(round(v + jitter, 7) for v in SAX_IOP[:3]) + tuple(SAX_IOP[3:])
    return write_conformant_study(folder, iop_override={1: iop, 3: iop})


def test_orientation_rounding_still_gives_sr_and_seg(tmp_path):
    spec = _jittered_study(tmp_path / "dicom", 1e-6)
    iops = {tuple(pydicom.dcmread(f).ImageOrientationPatient) for f in spec.files}
    assert len(iops) == 2  # the images really disagree
    outputs = build_outputs(tmp_path / "dicom", tmp_path)
    assert outputs.sr and len(outputs.segs) == 2
    for t, seg in outputs.segs.items():
        (shared,) = seg.SharedFunctionalGroupsSequence
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
            pytest.approx(list(spec.iop), abs=1e-5)
        assert dciodvfy(outputs.paths[f"seg_{t}"])[0] == []


def test_orientations_beyond_rounding_are_refused_clearly(tmp_path):
    from services.preprocess.geometry import IOP_TOLERANCE

    _jittered_study(tmp_path / "dicom", 10 * IOP_TOLERANCE)
    with pytest.raises(ValueError, match=r"ImageOrientationPatient by up to 0\.001 .*one plane orientation"):
        build_outputs(tmp_path / "dicom", tmp_path)


# --- the report stage: re-runs and the quality section -----------------------------------------

def _record(store, dicom_dir: Path, outputs, study_id: str) -> dict:
    """A workflow record whose preprocess and segmentation outputs are in the real store."""
    import gzip

    import nibabel as nib

    studies, artifacts = store.bucket("studies"), store.bucket("artifacts")
    store.upload_folder(dicom_dir, studies, f"{study_id}/dicom/")
    manifest = store.put_json(artifacts, f"{study_id}/preprocess/manifest.json", outputs.manifest)
    nifti = nib.Nifti1Image(outputs.labels, np.array(outputs.entry["affine"])).to_bytes()
    labels = store.put_bytes(artifacts, f"{study_id}/segmentation/labels.nii.gz", gzip.compress(nifti))
    return {"study_id": study_id, "dicom_prefix": {"bucket": studies, "key": f"{study_id}/dicom/"},
            "stages": {"preprocess": {"state": "done", "outputs": {"manifest": vars(manifest)}},
                       "segmentation": {"state": "done", "outputs": {"labels": vars(labels)}}}}


def _report(outputs) -> dict:
    return {"measurements": dict(outputs.report["measurements"]), "models": {"segmentation": MODEL}, "quality": []}


def test_a_rerun_writes_a_new_sr_that_names_its_predecessor(store, tmp_path):
    from services.gateway.report import ReportBuilder

    write_conformant_study(tmp_path / "dicom")  # a study of its own: no SR written for it yet
    valid = build_outputs(tmp_path / "dicom", tmp_path)
    builder = ReportBuilder(store)
    first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
    first = builder.dicom_outputs(_record(store, tmp_path / "dicom", valid, first_id), _report(valid))
    first_sr = pydicom.dcmread(io.BytesIO(first["sr.dcm"]))
    assert "PredecessorDocumentsSequence" not in first_sr  # the study's first SR

    changed = _report(valid)
    changed["measurements"]["lv_ef_pct"] = 41.0  # e.g. a new model version
    second_record = _record(store, tmp_path / "dicom", valid, second_id)
    second = builder.dicom_outputs(second_record, changed)
    second_sr = pydicom.dcmread(io.BytesIO(second["sr.dcm"]))
    assert second_sr.SOPInstanceUID != first_sr.SOPInstanceUID
    assert second_sr.SeriesInstanceUID != first_sr.SeriesInstanceUID  # each run is its own series
    (study,) = second_sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (item,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, item.ReferencedSOPInstanceUID) == \
        (first_sr.StudyInstanceUID, first_sr.SeriesInstanceUID, first_sr.SOPInstanceUID)
    seg_series = {pydicom.dcmread(io.BytesIO(out["seg.dcm"])).SeriesInstanceUID for out in (first, second)}
    assert len(seg_series) == 2
    errors, _ = dciodvfy(_save({"sr": second_sr}, tmp_path / "rerun")["sr"])
    assert errors == []

    # The second run's report stage retried: the same SR again, still naming the first run's.
    again = pydicom.dcmread(io.BytesIO(builder.dicom_outputs(second_record, changed)["sr.dcm"]))
    assert again.SOPInstanceUID == second_sr.SOPInstanceUID
    assert again.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == first_sr.SOPInstanceUID


def test_two_replicas_recording_srs_of_one_study_at_once_keep_both(stack_info, store, tmp_path, monkeypatch):
    from services.gateway.report import ReportBuilder

    write_conformant_study(tmp_path / "dicom")
    valid = build_outputs(tmp_path / "dicom", tmp_path)
    first_record = _record(store, tmp_path / "dicom", valid, str(uuid.uuid4()))
    second_record = _record(store, tmp_path / "dicom", valid, str(uuid.uuid4()))
    replica_b = ReportBuilder(store)
    store_a = object_store(stack_info)  # replica A's own client
    read_history = store_a.get_json_tagged
    interleaved = []

    def b_records_between_a_read_and_a_write(bucket, key):
        try:
            return read_history(bucket, key)  # (no history yet: ObjectNotFound)
        finally:
            if key.startswith("sr-history/") and not interleaved:
                interleaved.append(replica_b.dicom_outputs(second_record, _report(valid)))

    monkeypatch.setattr(store_a, "get_json_tagged", b_records_between_a_read_and_a_write)
    a_sr = pydicom.dcmread(io.BytesIO(ReportBuilder(store_a).dicom_outputs(first_record, _report(valid))["sr.dcm"]))
    b_sr = pydicom.dcmread(io.BytesIO(interleaved[0]["sr.dcm"]))
    history = store.get_json(store.bucket("reports"), f"sr-history/{a_sr.StudyInstanceUID}.json")["srs"]
    assert [e["sop_instance_uid"] for e in history] == [b_sr.SOPInstanceUID, a_sr.SOPInstanceUID]
    assert a_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0] \
        .ReferencedSOPInstanceUID == b_sr.SOPInstanceUID  # A read again after losing the write


def test_report_quality_says_the_source_is_not_conformant(store, sunnybrook, valid):
    from services.gateway.report import ReportBuilder

    builder = ReportBuilder(store)
    report = _report(sunnybrook)
    files = builder.dicom_outputs(_record(store, SUNNYBROOK_STUDY, sunnybrook, str(uuid.uuid4())), report)
    assert {"sr.dcm", "seg.dcm", "seg_es.dcm"} <= set(files)
    codes = {q["code"] for q in report["quality"] if q["source"] == "report"}
    assert codes == {"source_invalid_uids", "source_invalid_values", "source_missing_type2"}

    clean = _report(valid)
    builder.dicom_outputs(_record(store, valid.dicom, valid, str(uuid.uuid4())), clean)
    assert clean["quality"] == []
