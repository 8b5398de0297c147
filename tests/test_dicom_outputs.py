"""DICOM SEG and SR outputs (issues 4 and 6) on the real Sunnybrook study SCD0000101.

Labels: the expert LV contours at ED and ES (training.nnunet.sunnybrook) plus a synthetic RV disc
beside the LV on the contoured slices (Sunnybrook has no RV contours), so all three segments and
every SR measurement are exercised. Measurements come from services.segmentation.function.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"
STUDY = SUNNYBROOK / "SCD0000101"
pytestmark = [
    pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(), reason=f"sample data absent: {SUNNYBROOK}"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns about the study's invalid UIDs
]
MODEL = {"name": "sunnybrook-contours", "version": "1.0", "backend": "expert"}
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _add_rv(labels: np.ndarray, phase: int, slices: list[int], radius: float) -> None:
    """A disc of RV (3) 35 px beside the LV cavity centre, on background voxels only."""
    cx, cy = np.argwhere(labels[..., phase] == 1)[:, :2].mean(axis=0)
    x, y = np.ogrid[:labels.shape[0], :labels.shape[1]]
    disc = (x - (cx + 35)) ** 2 + (y - (cy - 5)) ** 2 <= radius ** 2
    for z in slices:
        plane = labels[:, :, z, phase]
        plane[disc & (plane == 0)] = 3


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from services.preprocess.study import preprocess_study
    from services.segmentation.dicom_seg import build_segs, cine_entry, read_source_headers
    from services.segmentation.function import measure_labels
    from training.nnunet.sunnybrook import load_case

    manifest = preprocess_study(STUDY, tmp_path_factory.mktemp("pre"))
    entry = cine_entry(manifest)
    case = load_case(STUDY, SUNNYBROOK / "contours" / "SC-HF-I-1")
    ed, es = case.ed_phase, case.es_phase
    labels = np.zeros((entry["columns"], entry["rows"], entry["n_slices"], entry["n_phases"]), np.uint8)
    labels[..., ed], labels[..., es] = case.labels["ed"], case.labels["es"]
    _add_rv(labels, ed, case.contoured_slices["ed"], 16)
    _add_rv(labels, es, case.contoured_slices["es"], 11)
    measurements = measure_labels(labels, np.array(entry["affine"]), height_m=1.75, weight_kg=70)
    assert (measurements["ed_phase"], measurements["es_phase"]) == (ed, es)
    segs = build_segs(STUDY, manifest, labels, MODEL, measurements=measurements)
    sops = entry["sop_instance_uids"]
    headers = read_source_headers(STUDY, [sops[z][t] for t in (ed, es) for z in range(entry["n_slices"])])
    report = {"measurements": {k: v for k, v in measurements.items()
                               if k not in ("quality", "model", "lv_volume_curve_ml", "rv_volume_curve_ml")},
              "models": {"segmentation": MODEL, "vlm": None}}
    return SimpleNamespace(manifest=manifest, entry=entry, labels=labels, ed=ed, es=es, segs=segs,
                           measurements=measurements, report=report, headers=list(headers.values()))


@pytest.fixture(scope="module")
def sr(study):
    import highdicom as hd

    from services.gateway.dicom_sr import build_sr

    # Parsed, as a reader gets it: its content is then a MeasurementReport with group accessors.
    return hd.sr.Comprehensive3DSR.from_dataset(build_sr(study.segs, study.headers, study.report))


def _expected(measurements: dict) -> dict[str, float]:
    from services.gateway.dicom_sr import SR_KEYS

    return {k: measurements[k] for k in SR_KEYS if measurements.get(k) is not None}


# --- SEG ----------------------------------------------------------------------------------------

def test_seg_pixels_are_the_label_map_transposed(study, tmp_path):
    import highdicom as hd

    from services.segmentation.dicom_seg import seg_labels

    assert sorted(study.segs) == sorted([study.ed, study.es])  # default phases: ED and ES
    asymmetric = 0
    for t, seg in study.segs.items():
        seg.save_as(tmp_path / f"seg_{t}.dcm")
        back = hd.seg.segread(tmp_path / f"seg_{t}.dcm")
        for z in range(study.entry["n_slices"]):
            expected = study.labels[:, :, z, t].T  # (x = column, y = row) -> (row, column)
            got = seg_labels(back, study.entry["sop_instance_uids"][z][t])
            np.testing.assert_array_equal(got, expected, err_msg=f"phase {t} slice {z}")
            asymmetric += not np.array_equal(expected, expected.T)
    assert asymmetric > 0  # the comparison tells a transposed map from the right one
    assert set(np.unique(seg_labels(back, study.entry["sop_instance_uids"][9][study.es]))) <= {0, 1, 3}


def test_seg_references_exactly_the_source_instances(study):
    sops = study.entry["sop_instance_uids"]
    for t, seg in study.segs.items():
        (series,) = seg.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == study.entry["series_instance_uid"]
        referenced = {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence}
        assert referenced == {sops[z][t] for z in range(study.entry["n_slices"])}
        per_frame = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                     for f in seg.PerFrameFunctionalGroupsSequence}
        labelled = {sops[z][t] for z in range(study.entry["n_slices"]) if study.labels[:, :, z, t].any()}
        assert per_frame == labelled
        assert seg.StudyInstanceUID == study.manifest["study_instance_uid"]
        assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.SegmentationType == "BINARY"
        assert seg.SeriesInstanceUID != study.entry["series_instance_uid"]
    assert study.segs[study.ed].ContentLabel == "ED" and study.segs[study.es].ContentLabel == "ES"
    assert len({s.SeriesInstanceUID for s in study.segs.values()}) == 1
    assert len({s.SOPInstanceUID for s in study.segs.values()}) == 2


def test_seg_segments_and_codes(study):
    seg = study.segs[study.ed]
    expected = {1: ("LV cavity", "87878005"), 2: ("LV myocardium", "49848007"), 3: ("RV cavity", "53085002")}
    got = {}
    for item in seg.SegmentSequence:
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "91723000")
        assert prop.CodingSchemeDesignator == "SCT"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL["name"], MODEL["version"])
        got[item.SegmentNumber] = (item.SegmentLabel, prop.CodeValue)
    assert got == expected


def test_seg_file_reads_back_with_pydicom(study, tmp_path):
    path = tmp_path / "seg.dcm"
    study.segs[study.es].save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == study.segs[study.es].SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == SEGMENTATION_STORAGE
    assert ds.NumberOfFrames == study.segs[study.es].NumberOfFrames > 0


def test_seg_uids_are_deterministic(study):
    from services.segmentation.dicom_seg import build_seg

    again = build_seg(STUDY, study.manifest, study.labels, MODEL, study.es, study.measurements)
    first = study.segs[study.es]
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (first.SeriesInstanceUID, first.SOPInstanceUID)
    changed = study.labels.copy()
    es_labels = changed[..., study.es]
    es_labels[es_labels == 3] = 0  # different labels at ES: same series, a new instance UID
    other = build_seg(STUDY, study.manifest, changed, MODEL, study.es, study.measurements)
    assert other.SeriesInstanceUID == first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert {i.ReferencedSegmentNumber for f in other.PerFrameFunctionalGroupsSequence
            for i in f.SegmentIdentificationSequence} == {1}  # RV empty at ES only: described, no frames
    assert len(other.SegmentSequence) == 3
    # Another run (a re-submission) writes its own series and instances.
    rerun = build_seg(STUDY, study.manifest, study.labels, MODEL, study.es, study.measurements, run="second")
    assert rerun.SeriesInstanceUID != first.SeriesInstanceUID and rerun.SOPInstanceUID != first.SOPInstanceUID


def test_seg_describes_no_segment_the_label_map_never_has(study):
    """An LV-only model (as the first, Sunnybrook-trained default was) gives a SEG without an RV segment."""
    from services.segmentation.dicom_seg import build_seg

    lv_only = study.labels.copy()
    lv_only[lv_only == 3] = 0
    seg = build_seg(STUDY, study.manifest, lv_only, MODEL, study.ed, study.measurements)
    assert [(i.SegmentNumber, i.SegmentLabel) for i in seg.SegmentSequence] == [(1, "LV cavity"), (2, "LV myocardium")]


def test_seg_rejects_a_label_map_in_another_grid(study):
    from services.segmentation.dicom_seg import build_segs

    with pytest.raises(ValueError, match="does not match the cine grid"):
        build_segs(STUDY, study.manifest, study.labels.transpose(1, 0, 2, 3)[:-1], MODEL)


# --- SR -----------------------------------------------------------------------------------------

def test_sr_round_trip_gives_the_report_values(study, sr, tmp_path):
    from services.gateway.dicom_sr import build_sr, read_sr_measurements

    expected = _expected(study.report["measurements"])
    assert len(expected) == 16  # LV, RV and indexed values all present
    assert read_sr_measurements(sr) == expected
    # From a file, with the sources read from the study folder.
    from_dir = build_sr(study.segs, STUDY, study.report)
    from_dir.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(tmp_path / "sr.dcm")
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR
    assert read_sr_measurements(ds) == expected


def test_sr_codes_and_units(sr):
    import highdicom as hd

    found = {}
    for group in [*sr.content.get_volumetric_roi_measurement_groups(), *sr.content.get_image_measurement_groups()]:
        for m in group.get_measurements():
            method = m.method.value if m.method is not None else None
            found[(m.name.scheme_designator, m.name.value, method)] = m.unit.value
    assert found == {
        ("LN", "8821-1", None): "ml", ("LN", "8821-1", "8277-6"): "ml/m2",
        ("LN", "8823-7", None): "ml", ("LN", "8823-7", "8277-6"): "ml/m2",
        ("LN", "18087-7", None): "g", ("LN", "18087-7", "8277-6"): "g/m2",
        ("SCT", "90096001", None): "ml", ("SCT", "90096001", "8277-6"): "ml/m2",
        ("LN", "8811-2", None): "%",
        ("LN", "8822-9", None): "ml", ("LN", "8822-9", "8277-6"): "ml/m2",
        ("LN", "8824-5", None): "ml", ("LN", "8824-5", "8277-6"): "ml/m2",
        ("SCT", "429483009", None): "ml", ("SCT", "429483009", "8277-6"): "ml/m2",
        ("LN", "8818-7", None): "%",
    }
    (observer,) = [c for c in sr.content.get_observer_contexts() if c.observer_type.value == "121007"]
    assert observer.observer_identifying_attributes.name == MODEL["name"]
    assert isinstance(sr, hd.sr.Comprehensive3DSR)


def structure_groups(sr) -> dict[str, tuple[str, list[int]]]:
    """{tracking identifier: (SEG SOP Instance UID, segment numbers)} of the per-structure groups:
    TID 1411 groups, or (sources with invalid UIDs) TID 1501 groups whose source is the SEG."""
    refs = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        ref = group.referenced_segment
        refs[group.tracking_identifier] = (ref.referenced_sop_instance_uid, ref.referenced_segment_numbers)
    for group in sr.content.get_image_measurement_groups():
        for item in group[0].ContentSequence:
            if item.ValueType == "IMAGE" and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]:
                ref = item.ReferencedSOPSequence[0]
                refs[group.tracking_identifier] = (ref.ReferencedSOPInstanceUID, [int(ref.ReferencedSegmentNumber)])
    return refs


def test_sr_references_the_seg(study, sr):
    seg_by_uid = {s.SOPInstanceUID: t for t, s in study.segs.items()}
    refs = {label: (seg_by_uid[uid], numbers) for label, (uid, numbers) in structure_groups(sr).items()}
    ed, es = study.ed, study.es
    assert refs == {"LV cavity at ED": (ed, [1]), "LV cavity at ES": (es, [1]), "LV myocardium at ED": (ed, [2]),
                    "RV cavity at ED": (ed, [3]), "RV cavity at ES": (es, [3])}
    # Sunnybrook's UIDs are invalid: no content item may carry them (DCMTK refuses the SR), so the
    # per-structure groups are TID 1501 ones referencing the SEG, not TID 1411 ones.
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    content_uids = {str(e.value) for item in sr.ContentSequence for e in item.iterall()
                    if e.VR == "UI" and e.keyword in ("ReferencedSOPInstanceUID", "UID")}
    assert content_uids.isdisjoint(set(study.entry["sop_instance_uids"][0]) | {study.entry["series_instance_uid"]})
    evidence = {(series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
                for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    for seg in study.segs.values():
        assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    assert sr.StudyInstanceUID == study.manifest["study_instance_uid"]


def test_sr_leaves_out_null_values(study):
    import highdicom as hd

    from services.gateway.dicom_sr import build_sr, read_sr_measurements

    measurements = dict(study.report["measurements"])
    for key in list(measurements):
        if key.startswith("rv_") or key.endswith("_m2"):
            measurements[key] = None
    report = dict(study.report, measurements=measurements)
    partial = hd.sr.Comprehensive3DSR.from_dataset(build_sr(study.segs, study.headers, report))
    assert read_sr_measurements(partial) == _expected(measurements)
    assert set(read_sr_measurements(partial)) == {"lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "lv_mass_g"}
    assert set(structure_groups(partial)) == {"LV cavity at ED", "LV cavity at ES", "LV myocardium at ED"}


def test_es_not_measurable_gives_the_ed_seg_alone_and_an_sr_of_the_ed_values(study):
    """Every phase labelled (as the service segments the whole cine) but no ES: one SEG, at ED,
    not one per labelled phase, and the SR groups only ED structures."""
    import highdicom as hd

    from services.gateway.dicom_sr import build_sr, read_sr_measurements
    from services.segmentation.dicom_seg import build_segs
    from services.segmentation.function import INDEXED_KEYS, NEEDS_ES

    labels = np.repeat(study.labels[..., study.ed:study.ed + 1], study.labels.shape[-1], axis=-1)
    unmeasured = {"es_phase", *NEEDS_ES, *(k for k, source in INDEXED_KEYS.items() if source in NEEDS_ES)}
    measurements = {k: (None if k in unmeasured else v) for k, v in study.measurements.items()}
    segs = build_segs(STUDY, study.manifest, labels, MODEL, measurements=measurements)
    assert list(segs) == [study.ed]
    report = dict(study.report, measurements={k: measurements[k] for k in study.report["measurements"]})
    sr = hd.sr.Comprehensive3DSR.from_dataset(build_sr(segs, study.headers, report))
    assert set(structure_groups(sr)) == {"LV cavity at ED", "LV myocardium at ED", "RV cavity at ED"}
    assert "lv_ef_pct" not in read_sr_measurements(sr) and "lv_edv_ml" in read_sr_measurements(sr)


def test_sr_uids_are_deterministic(study, sr):
    from services.gateway.dicom_sr import build_sr

    again = build_sr(study.segs, study.headers, study.report)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)
    changed = dict(study.report, measurements=dict(study.report["measurements"], lv_ef_pct=50.0))
    assert build_sr(study.segs, study.headers, changed).SOPInstanceUID != sr.SOPInstanceUID
    rerun = build_sr(study.segs, study.headers, study.report, run="second")
    assert rerun.SeriesInstanceUID != sr.SeriesInstanceUID and rerun.SOPInstanceUID != sr.SOPInstanceUID


def test_default_phases_are_ed_es_or_the_labelled_ones(study):
    from services.segmentation.dicom_seg import default_phases

    assert default_phases(study.labels, study.measurements) == [study.ed, study.es]
    assert default_phases(study.labels) == sorted([study.ed, study.es])  # only ED/ES hold labels
    one = np.zeros((4, 4, 2, 5), np.uint8)
    one[1, 2, 0, 3] = 2
    assert default_phases(one) == [3]
    assert default_phases(one, {"ed_phase": 3, "es_phase": 3}) == [3]
    # ES not measurable (no complete phase for it): ED alone, not a SEG for every labelled phase
    every = np.ones((4, 4, 2, 5), np.uint8)
    assert default_phases(every, {"ed_phase": 1, "es_phase": None}) == [1]
