"""Cardiac function on phantoms with known volumes (services/segmentation/function.py, `cmrvl measure`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.cli import main
from services.segmentation.function import (
    MEASUREMENT_KEYS,
    bsa_mosteller_m2,
    classify,
    measure_labels,
    normal_range,
    voxel_volume_ml,
)

# 2 x 2 x 10 mm voxels rotated obliquely: 40 mm^3 = 0.04 ml per voxel whatever the rotation.
SPACING = (2.0, 2.0, 10.0)
VOXEL_ML = 0.04


def oblique_affine() -> np.ndarray:
    a, b = math.radians(30), math.radians(-20)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(SPACING)
    affine[:3, 3] = (-100.0, 20.0, 35.0)
    return affine


def heart_phase(lv_half: int, rv_width: int, shape=(64, 64, 8)) -> np.ndarray:
    """LV cavity: square of side 2*lv_half on slices 1..6; myocardium: a 3-voxel frame around it;
    RV: a block of rv_width x 16 on the same slices, beside the LV."""
    labels = np.zeros(shape, dtype=np.uint8)
    c = 24
    labels[c - lv_half - 3:c + lv_half + 3, c - lv_half - 3:c + lv_half + 3, 1:7] = 2
    labels[c - lv_half:c + lv_half, c - lv_half:c + lv_half, 1:7] = 1
    labels[40:40 + rv_width, 16:32, 1:7] = 3
    return labels


def expected(lv_half: int, rv_width: int) -> dict[str, float]:
    lv = (2 * lv_half) ** 2 * 6
    myo = ((2 * lv_half + 6) ** 2 - (2 * lv_half) ** 2) * 6
    rv = rv_width * 16 * 6
    return {"lv": lv * VOXEL_ML, "myo": myo * VOXEL_ML, "rv": rv * VOXEL_ML}


# LV half-widths and RV widths over a 5-phase cycle: ED at phase 1, ES at phase 3.
CYCLE = [(9, 14), (10, 16), (8, 12), (6, 8), (8, 12)]


def cycle_4d() -> np.ndarray:
    return np.stack([heart_phase(h, w) for h, w in CYCLE], axis=-1)


def test_voxel_volume_and_bsa_by_hand():
    assert voxel_volume_ml(oblique_affine()) == pytest.approx(VOXEL_ML)
    assert bsa_mosteller_m2(1.80, 80.0) == pytest.approx(2.0)  # sqrt(180 * 80 / 3600)
    with pytest.raises(ValueError):
        bsa_mosteller_m2(0, 80)


def test_measure_4d_phantom_by_hand():
    result = measure_labels(cycle_4d(), oblique_affine(), height_m=1.80, weight_kg=80.0)
    ed, es = expected(*CYCLE[1]), expected(*CYCLE[3])
    assert (result["ed_phase"], result["es_phase"]) == (1, 3)
    assert result["lv_volume_curve_ml"] == pytest.approx([expected(h, w)["lv"] for h, w in CYCLE])
    assert result["rv_volume_curve_ml"] == pytest.approx([expected(h, w)["rv"] for h, w in CYCLE])
    # LV: 20x20x6 = 2400 voxels at ED (96 ml), 12x12x6 = 864 at ES (34.56 ml).
    assert result["lv_edv_ml"] == pytest.approx(96.0)
    assert result["lv_esv_ml"] == pytest.approx(34.56)
    assert result["lv_sv_ml"] == pytest.approx(96.0 - 34.56)
    assert result["lv_ef_pct"] == pytest.approx(100 * (96.0 - 34.56) / 96.0)
    assert result["lv_mass_g"] == pytest.approx(ed["myo"] * 1.05)
    assert result["rv_edv_ml"] == pytest.approx(ed["rv"])
    assert result["rv_esv_ml"] == pytest.approx(es["rv"])
    assert result["rv_ef_pct"] == pytest.approx(100 * (ed["rv"] - es["rv"]) / ed["rv"])
    assert result["bsa_m2"] == pytest.approx(2.0)
    assert result["lv_edvi_ml_m2"] == pytest.approx(48.0)
    assert result["lv_massi_g_m2"] == pytest.approx(ed["myo"] * 1.05 / 2.0)
    assert result["rv_svi_ml_m2"] == pytest.approx((ed["rv"] - es["rv"]) / 2.0)
    assert result["quality"] == []


def test_caller_phases_override_curve():
    result = measure_labels(cycle_4d(), oblique_affine(), ed_phase=0, es_phase=2)
    assert (result["ed_phase"], result["es_phase"]) == (0, 2)
    assert result["lv_edv_ml"] == pytest.approx(expected(*CYCLE[0])["lv"])
    assert result["lv_esv_ml"] == pytest.approx(expected(*CYCLE[2])["lv"])
    assert result["lv_edvi_ml_m2"] is None and result["bsa_m2"] is None
    with pytest.raises(ValueError):
        measure_labels(cycle_4d(), oblique_affine(), ed_phase=5)


def test_only_labelled_phases_are_candidates():
    # A 4D map labelled at ED and ES only (as drawn by experts): empty phases are not ES.
    labels = np.zeros((64, 64, 8, 4), dtype=np.uint8)
    labels[..., 1], labels[..., 3] = heart_phase(10, 16), heart_phase(6, 8)
    result = measure_labels(labels, oblique_affine())
    assert (result["ed_phase"], result["es_phase"]) == (1, 3)
    assert result["lv_esv_ml"] == pytest.approx(expected(6, 8)["lv"])


def test_disconnected_component_removed_and_flagged():
    labels = cycle_4d()
    labels[60:62, 60:62, 2:4, 1] = 1  # a stray 8-voxel LV blob at ED, far from the heart
    result = measure_labels(labels, oblique_affine())
    assert result["lv_edv_ml"] == pytest.approx(96.0)  # the blob does not count
    flags = [f for f in result["quality"] if f["code"] == "components_removed"]
    assert len(flags) == 1 and "phase 1" in flags[0]["message"] and "8 voxels" in flags[0]["message"]
    unclean = measure_labels(labels, oblique_affine(), clean=False)
    assert unclean["lv_edv_ml"] == pytest.approx(96.0 + 8 * VOXEL_ML)


def test_absent_rv_gives_nulls_and_flag():
    labels = cycle_4d()
    labels[labels == 3] = 0
    result = measure_labels(labels, oblique_affine(), height_m=1.8, weight_kg=80)
    for key in ("rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct", "rv_edvi_ml_m2"):
        assert result[key] is None
    assert result["lv_edv_ml"] == pytest.approx(96.0)
    assert any(f["code"] == "empty_class" and "RV" in f["message"] for f in result["quality"])


def test_implausible_masks_flagged():
    # ES larger than ED (caller swapped them): EF negative.
    result = measure_labels(cycle_4d(), oblique_affine(), ed_phase=3, es_phase=1)
    assert result["lv_ef_pct"] < 0
    assert any(f["code"] == "ef_out_of_range" for f in result["quality"])
    # LV cavity empty at ES.
    labels = cycle_4d()
    labels[..., 3][labels[..., 3] == 1] = 0
    result = measure_labels(labels, oblique_affine(), ed_phase=1, es_phase=3)
    assert result["lv_esv_ml"] == 0.0
    assert any(f["code"] == "empty_class" and "ES" in f["message"] for f in result["quality"])
    with pytest.raises(ValueError):
        measure_labels(np.full((4, 4, 4), 7), np.eye(4))


def test_normal_ranges_lookup():
    male, female, both = (normal_range("lv_edvi_ml_m2", s) for s in ("male", "F", None))
    assert male["unit"] == "ml/m2" and male["low"] < male["high"]
    assert both["low"] == min(male["low"], female["low"]) and both["high"] == max(male["high"], female["high"])
    assert normal_range("lv_volume_curve_ml") is None
    ef = normal_range("lv_ef_pct", "male")
    assert classify("lv_ef_pct", ef["low"] - 1, "male") == "low"
    assert classify("lv_ef_pct", (ef["low"] + ef["high"]) / 2, "male") == "normal"
    assert classify("lv_ef_pct", None) is None


# --- command line ------------------------------------------------------------------------------

def run_measure(argv: list[str]) -> int:
    """The real `cmrvl` entry point (services.cli.main)."""
    return main(argv)


def save(tmp_path, name, data):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data.astype(np.uint8), oblique_affine()), str(path))
    return str(path)


def test_cli_ed_es_files(tmp_path, capsys):
    ed, es = save(tmp_path, "ed.nii.gz", heart_phase(10, 16)), save(tmp_path, "es.nii.gz", heart_phase(6, 8))
    assert run_measure(["measure", "--ed", ed, "--es", es, "--height-cm", "180", "--weight-kg", "80"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(MEASUREMENT_KEYS) <= set(out)
    assert out["lv_edv_ml"] == pytest.approx(96.0)
    assert out["lv_esv_ml"] == pytest.approx(34.56)
    assert out["rv_esv_ml"] == pytest.approx(expected(6, 8)["rv"])
    assert out["lv_edvi_ml_m2"] == pytest.approx(48.0)
    assert (out["ed_phase"], out["es_phase"]) == (0, 1)


def test_cli_labels_4d(tmp_path, capsys):
    path = save(tmp_path, "labels.nii.gz", cycle_4d())
    assert run_measure(["measure", "--labels", path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ed_phase"], out["es_phase"]) == (1, 3)
    assert out["lv_ef_pct"] == pytest.approx(100 * (96.0 - 34.56) / 96.0)
    assert out["lv_edvi_ml_m2"] is None


@pytest.mark.parametrize("extra, message", [
    (["--es", "MISSING"], "no such file"),
    ([], "--ed needs --es"),
    (["--es", "ED", "--height-cm", "180"], "both --height-cm and --weight-kg"),
    (["--es", "SMALL"], "same shape"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    paths = {"ED": save(tmp_path, "ed.nii.gz", heart_phase(10, 16)), "MISSING": str(tmp_path / "missing.nii.gz"),
             "SMALL": save(tmp_path, "small.nii.gz", np.zeros((4, 4, 4)))}
    assert run_measure(["measure", "--ed", paths["ED"], *[paths.get(a, a) for a in extra]]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cmrvl measure: error:") and message in captured.err
    assert captured.err.count("\n") == 1


# --- gaps (issue 14) and quality flags (issue 13) ------------------------------------------------

def codes(result) -> list[str]:
    return [f["code"] for f in result["quality"]]


def flag(result, code) -> dict:
    (found,) = [f for f in result["quality"] if f["code"] == code]
    return found


def test_absent_cells_are_gaps_not_zeros():
    # ES (phase 3) lacks slices 4-6: counted as zeros its LV would be half the size and EF inflated.
    labels, present = cycle_4d(), np.ones((8, 5), bool)
    present[4:7, 3] = False
    labels[:, :, 4:7, 3] = 0  # what a model makes of preprocessing's zeros
    blind = measure_labels(labels, oblique_affine())
    assert blind["es_phase"] == 3 and blind["lv_ef_pct"] > 75  # the garbage
    result = measure_labels(labels, oblique_affine(), present=present)
    assert result["lv_volume_curve_ml"][3] is None and result["rv_volume_curve_ml"][3] is None
    assert result["lv_volume_curve_ml"][2] == pytest.approx(expected(*CYCLE[2])["lv"])
    # ES is the smallest complete phase (2 or 4, the same volume): never the incomplete one.
    assert result["ed_phase"] == 1 and result["es_phase"] == 2
    assert result["lv_esv_ml"] == pytest.approx(expected(*CYCLE[2])["lv"])
    gaps = flag(result, "incomplete_phases")
    assert gaps["cells"] == [[4, 3], [5, 3], [6, 3]] and "slices 4-6 at phase 3" in gaps["message"]
    assert "incomplete phase(s) 3" in flag(result, "ed_es_from_complete_phases")["message"]


def test_labels_in_absent_cells_do_not_count():
    labels, present = cycle_4d(), np.ones((8, 5), bool)
    present[0, :] = False  # slice 0: never acquired; the model still labelled something there
    labels[20:30, 20:30, 0, :] = 1
    result = measure_labels(labels, oblique_affine(), present=present)
    assert result["lv_edv_ml"] == pytest.approx(96.0)
    assert "missing_slices" in codes(result) and "incomplete_phases" not in codes(result)
    # A never-acquired slice inside the ventricle does not split it for the component cleaning.
    present = np.ones((8, 5), bool)
    present[3, :] = False
    labels = cycle_4d()
    labels[:, :, 3] = 0
    result = measure_labels(labels, oblique_affine(), present=present)
    assert result["lv_edv_ml"] == pytest.approx(96.0 * 5 / 6) and "components_removed" not in codes(result)
    assert None not in result["lv_volume_curve_ml"]  # a slice missing in every phase leaves phases comparable


def test_no_complete_es_gives_null_with_reason():
    # Labelled at ED and ES only (expert style); ES has a gap: no other complete phase can be ES.
    labels, present = np.zeros((64, 64, 8, 4), np.uint8), np.ones((8, 4), bool)
    labels[..., 1], labels[..., 3] = heart_phase(10, 16), heart_phase(6, 8)
    present[5, 3] = False
    labels[:, :, 5, 3] = 0
    result = measure_labels(labels, oblique_affine(), height_m=1.8, weight_kg=80, present=present)
    assert result["ed_phase"] == 1 and result["es_phase"] is None
    assert result["lv_edv_ml"] == pytest.approx(96.0) and result["lv_mass_g"] is not None
    for key in ("lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_ef_pct", "lv_esvi_ml_m2"):
        assert result[key] is None
    reason = flag(result, "es_not_measurable")
    assert {"lv_esv_ml", "lv_ef_pct", "rv_esv_ml", "lv_esvi_ml_m2"} <= set(reason["keys"])
    assert "lv_edv_ml" not in reason["keys"]


def test_given_phase_with_gap_is_not_measured():
    present = np.ones((8, 5), bool)
    present[2, 3] = False
    result = measure_labels(cycle_4d(), oblique_affine(), ed_phase=1, es_phase=3, present=present)
    assert result["es_phase"] is None and result["lv_esv_ml"] is None and result["lv_edv_ml"] == pytest.approx(96.0)
    assert "lv_ef_pct" in flag(result, "phase_incomplete")["keys"]
    with pytest.raises(ValueError, match="does not match"):
        measure_labels(cycle_4d(), oblique_affine(), present=np.ones((8, 4), bool))


def test_present_cells_from_manifest_entry():
    from services.segmentation.function import present_cells

    uids = [[f"1.2.{z}.{t}" for t in range(3)] for z in range(2)]
    uids[1][2] = None
    present, flags = present_cells({"sop_instance_uids": uids}, 2, 3)
    assert present.tolist() == [[True, True, True], [True, True, False]] and flags == []
    present, flags = present_cells({}, 2, 3)
    assert present.all() and [f["code"] for f in flags] == ["presence_unknown"]
    with pytest.raises(ValueError, match="does not match"):
        present_cells({"sop_instance_uids": uids}, 2, 4)


def test_implausible_volume_flagged():
    # The same phantom in 10x larger voxels: LV EDV 960 ml is no human ventricle.
    affine = oblique_affine()
    affine[:3, :3] *= 10 ** (1 / 3)
    result = measure_labels(cycle_4d(), affine)
    assert result["lv_edv_ml"] == pytest.approx(960.0)
    assert any(f["code"] == "implausible_volume" and "LV EDV" in f["message"] for f in result["quality"])
    assert "implausible_volume" not in codes(measure_labels(cycle_4d(), oblique_affine()))


def test_class_the_model_does_not_segment_is_not_called_missing():
    labels = cycle_4d()
    labels[labels == 3] = 0
    lv_only = measure_labels(labels, oblique_affine(), predicted_classes={1, 2})
    assert "rv_ef_pct" in flag(lv_only, "class_not_segmented")["keys"] and "empty_class" not in codes(lv_only)
    full_model = measure_labels(labels, oblique_affine(), predicted_classes={1, 2, 3})
    assert "rv_ef_pct" in flag(full_model, "empty_class")["keys"] and "class_not_segmented" not in codes(full_model)
    # Myocardium: absent although predicted.
    labels[labels == 2] = 0
    no_myo = measure_labels(labels, oblique_affine(), predicted_classes={1, 2})
    assert "lv_mass_g" in flag(no_myo, "empty_class")["keys"]


def test_hole_in_the_stack_flagged():
    labels = cycle_4d()
    labels[:, :, 3, 1][labels[:, :, 3, 1] == 1] = 2  # LV cavity lost on slice 3 at ED, slices 2 and 4 have it
    result = measure_labels(labels, oblique_affine())
    assert "slice 3 at phase 1" in flag(result, "stack_hole")["message"]
    # A gap in the data is not a hole in the segmentation.
    present = np.ones((8, 5), bool)
    present[3, 1] = False
    assert "stack_hole" not in codes(measure_labels(labels, oblique_affine(), present=present))
    # A stray blob two slices beyond the ventricle (not overlapping it in-plane) is not a hole either.
    labels = cycle_4d()
    labels[:, :, 6, 1][labels[:, :, 6, 1] == 1] = 0  # LV now on slices 1-5
    labels[60:62, 60:62, 7, 1] = 1
    assert "stack_hole" not in codes(measure_labels(labels, oblique_affine()))
    assert "stack_hole" not in codes(measure_labels(cycle_4d(), oblique_affine()))


def test_non_cyclic_curve_flagged():
    labels = cycle_4d()
    labels[..., 4] = heart_phase(6, 8)  # the last phase as small as ES: not back to diastole
    result = measure_labels(labels, oblique_affine())
    messages = [f["message"] for f in result["quality"] if f["code"] == "non_cyclic_curve"]
    assert [m[:2] for m in messages] == ["LV", "RV"] and "% of the stroke volume" in messages[0]
    # Within the tolerance (the phantom's last phase is 26 % of SV below its first) nothing is flagged.
    assert "non_cyclic_curve" not in codes(measure_labels(cycle_4d(), oblique_affine()))


def test_es_larger_than_ed_on_some_slices_is_flagged():
    """What the shipped model did on both CineMA samples: an RV missed on ED slices (or another
    structure labelled RV at ES) makes the ES ventricle larger than the ED one on those slices."""
    labels = cycle_4d()
    labels[40:60, 32:48, 6, 3] = 3  # at ES (phase 3) the RV grows past its ED size on slice 6
    labels[40:52, 16:32, 7, 3] = 3  # and on slice 7, where no phase has the RV
    result = measure_labels(labels, oblique_affine())
    found = flag(result, "es_larger_than_ed_on_slices")
    assert found["slices"] == [6, 7] and found["message"].startswith("RV cavity is larger at ES (phase 3)")
    assert result["rv_esv_ml"] is not None  # measured anyway, and said to be unreliable
    assert {"rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct", "rv_edvi_ml_m2"} <= set(found["doubts"])
    assert not any(key.startswith("lv") for key in found["doubts"])
    assert "es_larger_than_ed_on_slices" not in codes(measure_labels(cycle_4d(), oblique_affine()))


ACDC_H5 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc-wsl4mis"


def test_a_stack_that_stops_short_of_the_apex_is_flagged():
    """The phantom's ventricles are as large on every slice as at mid-ventricle: cut the stack on its
    apical side and the apical slice is the largest one."""
    from services.preprocess.geometry import apex_at_high_index

    affine = oblique_affine()
    assert "apex_not_covered" not in codes(measure_labels(cycle_4d(), affine))  # slices 0 and 7 are empty
    apex_high, _ = apex_at_high_index(affine)
    cut = cycle_4d()[:, :, :5] if apex_high else cycle_4d()[:, :, 3:]
    flags = [f for f in measure_labels(cut, affine)["quality"] if f["code"] == "apex_not_covered"]
    assert [f["message"][:9] for f in flags] == ["LV cavity", "RV cavity"]
    assert {f["slice"] for f in flags} == ({4} if apex_high else {0})
    assert "100% of its largest slice" in flags[0]["message"]
    assert {"lv_edv_ml", "lv_ef_pct", "lv_mass_g"} <= set(flags[0]["doubts"]) and "lv_mass_g" not in flags[1]["doubts"]


@pytest.mark.skipif(not (ACDC_H5 / "patient001_frame01.h5").is_file(), reason=f"sample data absent: {ACDC_H5}")
def test_acdc_expert_contours_raise_neither_geometry_flag():
    """The 100 ACDC patients' expert contours (ED and ES) are not flagged: each threshold has room
    above what the experts draw (ES larger than ED by at most 3.9 % of the EDV in training, 4.1 % held
    out; the most apical slice at most 36 % of the largest). The HDF5 files store no geometry; their
    slice 0 is basal, so the affine's slice normal is given pointing to the apex."""
    from services.preprocess.geometry import apex_at_high_index
    from training.nnunet.convert import acdc_h5_cases

    affine = np.diag([1.5625, 1.5625, -10.0, 1.0])
    assert apex_at_high_index(affine)[0]
    cases = acdc_h5_cases(ACDC_H5)
    assert len(cases) == 200
    flagged = []
    for ed, es in zip(cases[::2], cases[1::2]):
        (_, ed_label), (_, es_label) = ed.load(), es.load()
        labels = np.stack([np.asarray(ed_label.dataobj), np.asarray(es_label.dataobj)], -1)
        result = measure_labels(labels, affine, ed_phase=0, es_phase=1, clean=False)
        flagged += [(ed.patient, c) for c in codes(result) if c in ("es_larger_than_ed_on_slices", "apex_not_covered")]
    assert flagged == []


def test_cli_manifest_marks_gaps(tmp_path, capsys):
    path = save(tmp_path, "labels.nii.gz", cycle_4d())
    uids = [[None if (z, t) == (3, 3) else f"1.2.{z}.{t}" for t in range(5)] for z in range(8)]
    manifest = tmp_path / "manifest.json"
    series = {"kind": "cine_sax", "volume": "cine.nii.gz", "sop_instance_uids": uids}
    manifest.write_text(json.dumps({"series": [series]}))
    assert run_measure(["measure", "--labels", path]) == 0
    assert json.loads(capsys.readouterr().out)["es_phase"] == 3  # without the manifest every cell is an image
    assert run_measure(["measure", "--labels", path, "--manifest", str(manifest)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["es_phase"] in (2, 4) and out["lv_volume_curve_ml"][3] is None
    assert [f["cells"] for f in out["quality"] if f["code"] == "incomplete_phases"] == [[[3, 3]]]


@pytest.mark.parametrize("manifest, message", [
    ({"series": [{"kind": "cine_sax", "volume": "c.nii.gz", "sop_instance_uids": [["1"] * 5] * 7}]}, "does not match"),
    ({"series": []}, "no short-axis cine"),
    ("{not json", "Expecting property name"),
    ({"series": []}, "--manifest applies to --labels only"),  # given with --ed/--es
])
def test_cli_manifest_errors_are_one_line(tmp_path, capsys, manifest, message):
    path = tmp_path / "manifest.json"
    path.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    if "--labels only" in message:
        source = ["--ed", save(tmp_path, "ed.nii.gz", heart_phase(10, 16)),
                  "--es", save(tmp_path, "es.nii.gz", heart_phase(6, 8))]
    else:
        source = ["--labels", save(tmp_path, "labels.nii.gz", cycle_4d())]
    assert run_measure(["measure", *source, "--manifest", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cmrvl measure: error:") and message in err and err.count("\n") == 1


def test_the_report_marks_a_measured_value_that_a_flag_doubts():
    """Measured anyway, but said next to the number, not only in the QUALITY section."""
    from services.gateway.records import STAGES
    from services.gateway.report import build_report, render_text

    labels = cycle_4d()
    labels[40:60, 32:48, 6, 3] = 3  # the RV larger at ES than at ED on slice 6
    measurements = measure_labels(labels, oblique_affine())
    record = {"study_id": "doubt", "stages": {name: {"state": "done", "seconds": 1.0, "error": "", "outputs": {}}
                                              for name in STAGES}}
    report = build_report(record, {}, measurements, {})
    details = report["measurement_details"]
    assert "es_larger_than_ed_on_slices" in [c["code"] for c in details["rv_ef_pct"]["caveats"]]
    assert "caveats" not in details["lv_ef_pct"] and details["rv_ef_pct"]["value"] is not None
    text = render_text(report)
    rv_ef = next(line for line in text.splitlines() if "RV ejection fraction" in line)
    lv_ef = next(line for line in text.splitlines() if "LV ejection fraction" in line)
    assert "doubtful (" in rv_ef and "es_larger_than_ed_on_slices" in rv_ef and "doubtful" not in lv_ef
