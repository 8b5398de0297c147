"""Gaps never turn into numbers (issue 14), on the real Sunnybrook study.

The gaps: the odd phases of slices 6-11 (60 cells, what the issue's study looked like). For the
measurements they are the real preprocessing's manifest of the complete study with those cells
null, as preprocessing represents deleted files (their labels zero, as a model labels the zeros
there); the label maps are the expert contours (LV at ED = phase 18 and ES = phase 7, slices
1-9). ES is odd: counting its zeros as "no cavity" inflates EF, which is the bug. The report test
runs the real preprocessing on the study with those 60 files deleted.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"
STUDY = SUNNYBROOK / "SCD0000101"
pytestmark = [
    pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(), reason=f"sample data absent: {SUNNYBROOK}"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns about the study's invalid UID
]
GAP_SLICES, GAP_PHASES = range(6, 12), range(1, 20, 2)


def _cine(manifest: dict) -> dict:
    from services.preprocess.study import primary_series

    return primary_series(manifest, "cine_sax")


@pytest.fixture(scope="module")
def sunnybrook(tmp_path_factory):
    import pydicom

    from services.preprocess.study import preprocess_study
    from training.nnunet.sunnybrook import load_case

    complete = preprocess_study(STUDY, tmp_path_factory.mktemp("complete"))
    entry = _cine(complete)
    file_of = {pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID: p
               for p in STUDY.glob("*.dcm")}
    deleted = {entry["sop_instance_uids"][z][t] for z in GAP_SLICES for t in GAP_PHASES}
    gapped_dir = tmp_path_factory.mktemp("gapped_dicom")
    for uid, path in file_of.items():
        if uid not in deleted:
            shutil.copy(path, gapped_dir / path.name)
    preprocessed = preprocess_study(gapped_dir, tmp_path_factory.mktemp("gapped"))
    gapped = copy.deepcopy(complete)
    for z in GAP_SLICES:
        for t in GAP_PHASES:
            _cine(gapped)["sop_instance_uids"][z][t] = None

    case = load_case(STUDY, SUNNYBROOK / "contours" / "SC-HF-I-1")
    labels = np.zeros((entry["columns"], entry["rows"], entry["n_slices"], entry["n_phases"]), np.uint8)
    labels[..., case.ed_phase], labels[..., case.es_phase] = case.labels["ed"], case.labels["es"]
    return SimpleNamespace(complete=complete, gapped=gapped, preprocessed=preprocessed, labels=labels,
                           affine=np.array(entry["affine"]), ed=case.ed_phase, es=case.es_phase)


def _measure(labels, affine, series=None):
    from services.segmentation.function import measure_labels, present_cells

    present, flags = present_cells(series, labels.shape[2], labels.shape[3]) if series else (None, [])
    result = measure_labels(labels, affine, height_m=1.75, weight_kg=70, present=present, predicted_classes={1, 2})
    result["quality"][:0] = flags
    return result


def _with_gaps(labels, series):
    """The label map a model gives the gapped volume: nothing where the volume holds zeros."""
    labels = labels.copy()
    for z, row in enumerate(series["sop_instance_uids"]):
        for t, uid in enumerate(row):
            if uid is None:
                labels[:, :, z, t] = 0
    return labels


def _codes(result) -> dict[str, dict]:
    return {q["code"]: q for q in result["quality"]}


def _absent(series) -> list[tuple[int, int]]:
    return [(z, t) for z, row in enumerate(series["sop_instance_uids"]) for t, uid in enumerate(row) if uid is None]


def test_no_complete_es_gives_null_ef_with_reason_not_garbage(sunnybrook):
    s, series = sunnybrook, _cine(sunnybrook.gapped)
    assert (s.ed, s.es) == (18, 7)  # ED complete, ES among the gaps
    full = _measure(s.labels, s.affine, _cine(s.complete))
    labels = _with_gaps(s.labels, series)
    blind = _measure(labels, s.affine)  # the zeros measured as images: the bug
    assert blind["lv_ef_pct"] > full["lv_ef_pct"] + 15
    result = _measure(labels, s.affine, series)
    # ED is complete: its values are those of the complete study, to the voxel.
    assert result["ed_phase"] == 18 and result["lv_edv_ml"] == full["lv_edv_ml"]
    assert result["lv_mass_g"] == full["lv_mass_g"]
    # ES has gaps and no other complete phase is labelled: null, with the reason.
    assert result["es_phase"] is None
    for key in ("lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "lv_esvi_ml_m2"):
        assert result[key] is None
    flags = _codes(result)
    assert {"lv_esv_ml", "lv_sv_ml", "lv_ef_pct"} <= set(flags["es_not_measurable"]["keys"])
    assert {tuple(c) for c in flags["incomplete_phases"]["cells"]} == {(z, t) for z in GAP_SLICES for t in GAP_PHASES}
    assert "slices 6-11 at phases 1, 3, 5, 7, 9, 11, 13, 15, 17, 19" in flags["incomplete_phases"]["message"]
    assert [v is None for v in result["lv_volume_curve_ml"]] == [t % 2 == 1 for t in range(20)]


def test_es_chosen_among_complete_phases_matches_the_complete_study(sunnybrook):
    # Phase 8 labelled like ES (as a model labels the phase next to ES) and itself gapped: counted
    # as zeros it would be the smallest phase, hence ES. Only the complete phase 7 may be ES.
    s = sunnybrook
    gapped_phases = [8, 10]
    series = {"sop_instance_uids": [[None if z in GAP_SLICES and t in gapped_phases else "x" for t in range(20)]
                                    for z in range(12)]}
    labels = s.labels.copy()
    labels[..., 8] = labels[..., s.es]
    full = _measure(labels, s.affine, _cine(s.complete))
    assert (full["ed_phase"], full["es_phase"]) == (18, 7)
    labels = _with_gaps(labels, series)
    assert _measure(labels, s.affine)["es_phase"] == 8  # blind: the gap is the "ES"
    result = _measure(labels, s.affine, series)
    assert (result["ed_phase"], result["es_phase"]) == (18, 7)
    for key in ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g"):
        assert result[key] == full[key]
    flags = _codes(result)
    assert "incomplete phase(s) 8, 10" in flags["ed_es_from_complete_phases"]["message"]


def test_report_quality_lists_every_gap(sunnybrook):
    from services.gateway.records import STAGES
    from services.gateway.report import build_report, render_text
    from services.segmentation.function import describe_cells

    # The real preprocessing of the study without the 60 files, whichever cells it left empty.
    s, series = sunnybrook, _cine(sunnybrook.preprocessed)
    assert len(_absent(series)) == 60
    gaps = describe_cells(_absent(series))
    measurements = _measure(_with_gaps(s.labels, series), s.affine, series)
    record = {"study_id": "gaps", "stages": {name: {"state": "done", "seconds": 1.0, "error": "", "outputs": {}}
                                             for name in STAGES}}
    report = build_report(record, s.preprocessed, measurements, {})
    quality = {q["code"]: q for q in report["quality"]}
    # What preprocessing found (one entry, all 60 cells) and what it did to the measurements.
    assert quality["missing_phase"]["source"] == "preprocess"
    assert quality["missing_phase"]["message"].startswith(f"60 slice/phase cell(s): {gaps}")
    assert gaps in quality["incomplete_phases"]["message"] and quality["incomplete_phases"]["source"] == "segmentation"
    # EF is null (ES, or ED too, has gaps), and says which flag says why.
    ef = report["measurement_details"]["lv_ef_pct"]
    assert ef["value"] is None and "lv_ef_pct" in quality[ef["reason"]["code"]]["keys"]

    text = render_text(report)
    quality_section = text.split("\nQUALITY\n", 1)[1]
    for code in ("missing_phase", "incomplete_phases", ef["reason"]["code"]):
        assert f"  - {code}: {quality[code]['message']}" in quality_section
    assert gaps in quality_section
    ef_line = next(line for line in text.splitlines() if "LV ejection fraction" in line)
    assert f"not measured ({ef['reason']['code']})" in ef_line
    assert "not available" not in text.split("FINDINGS")[0]
