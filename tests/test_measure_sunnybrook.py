"""LV function on the Sunnybrook expert contours (../shared/data/sunnybrook), checked against an
independent polygon computation: shoelace area of each contour x pixel area x slice spacing.

Tolerance: 5% on volumes and mass, 2 EF points. The label maps count the pixels whose centres lie
inside (or on) each contour; the expert contours run along a half-pixel grid, so edges pass
through pixel centres and the rasterized area is ~2-3% larger than the polygon area (the
myocardium, having both borders, differs less).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"
pytestmark = [
    pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(), reason=f"sample data absent: {SUNNYBROOK}"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns about the study's invalid UID
]


@pytest.fixture(scope="module")
def case():
    from training.nnunet.sunnybrook import find_cases, load_case

    (study_id, case_id, dicom_dir, contour_dir), = find_cases(SUNNYBROOK)
    return load_case(dicom_dir, contour_dir, study_id, case_id)


@pytest.fixture(scope="module")
def polygon_reference():
    """EDV, ESV and myocardial volume (ml) from the contour polygons and the DICOM header only."""
    import pydicom

    from training.nnunet.sunnybrook import contour_files, polygon_area_px, read_contour

    files = contour_files(SUNNYBROOK / "contours" / "SC-HF-I-1")
    header = pydicom.dcmread(next((SUNNYBROOK / "SCD0000101").glob("*.dcm")), stop_before_pixels=True)
    mm3_per_px = float(header.PixelSpacing[0]) * float(header.PixelSpacing[1]) * float(header.SpacingBetweenSlices)
    area = lambda path: polygon_area_px(read_contour(path))  # noqa: E731
    ed_instances = set(files["o"])  # epicardium is drawn at ED only
    edv = sum(area(p) for n, p in files["i"].items() if n in ed_instances) * mm3_per_px / 1000
    esv = sum(area(p) for n, p in files["i"].items() if n not in ed_instances) * mm3_per_px / 1000
    myo = sum(area(files["o"][n]) - area(files["i"][n]) for n in ed_instances) * mm3_per_px / 1000
    return {"edv": edv, "esv": esv, "myo": myo}


def test_polygon_area_of_unit_square():
    from training.nnunet.sunnybrook import polygon_area_px

    assert polygon_area_px(np.array([[0, 0], [2, 0], [2, 3], [0, 3]], float)) == pytest.approx(6.0)


def test_phases_from_instance_numbers(case):
    # Endocardium drawn at two phases, epicardium at one: that one is ED.
    assert case.ed_phase != case.es_phase
    assert case.contoured_slices["ed"] and case.contoured_slices["ed"] == case.contoured_slices["es"]
    assert set(np.unique(case.labels["ed"])) == {0, 1, 2}
    assert set(np.unique(case.labels["es"])) == {0, 1}
    assert case.study.slice_spacing_mm == pytest.approx(10.0, abs=0.01)


def test_lv_function_matches_polygons(case, polygon_reference):
    from services.segmentation.function import measure_labels

    labels = np.stack([case.labels["ed"], case.labels["es"]], axis=-1)
    result = measure_labels(labels, case.study.affine, ed_phase=0, es_phase=1, height_m=1.75, weight_kg=70)
    ref = polygon_reference
    ref_ef = 100 * (ref["edv"] - ref["esv"]) / ref["edv"]
    assert result["lv_edv_ml"] == pytest.approx(ref["edv"], rel=0.05)
    assert result["lv_esv_ml"] == pytest.approx(ref["esv"], rel=0.05)
    assert result["lv_ef_pct"] == pytest.approx(ref_ef, abs=2.0)
    assert result["lv_mass_g"] == pytest.approx(ref["myo"] * 1.05, rel=0.05)
    assert result["rv_edv_ml"] is None  # Sunnybrook annotates the LV only
    # Without given phases the curve picks the same ED (max) and ES (min).
    auto = measure_labels(labels, case.study.affine)
    assert (auto["ed_phase"], auto["es_phase"]) == (0, 1)
