"""The default model's card says what its JSON results say: numbers, and whether the floor is met."""

from __future__ import annotations

import json

import pytest

from training.nnunet.model_card import DICE_TARGETS, acdc_card


def _version_dir(tmp_path, dice: dict):
    folder = tmp_path / "cmr_seg" / "1"
    folder.mkdir(parents=True)
    by_class = {name: {"as_predicted": 0.5, "largest_component": 0.6} for name in DICE_TARGETS}
    (folder / "evaluation.json").write_text(json.dumps({
        "cases": {f"acdc_patient{n:03d}_{p}": {} for n in (5, 12) for p in ("ed", "es")},
        "dice_mean": dice, "dice_by_phase": {"ed": dice, "es": dice}, "dice_by_group": {"DCM": dice},
        "clinical_errors": {"lv_ef_pct": {"bias": -3.3, "loa_low": -9.0, "loa_high": 2.5}}}))
    (folder / "inference.json").write_text(json.dumps({
        "model_name": "cmr_seg", "version": 1, "configuration": "2d", "onnx_opset": 17, "use_mirroring": False,
        "verification": {"max_abs_diff": 1e-4, "argmax_agreement": 1.0},
        "source": {"checkpoint": "checkpoint_latest.pth", "trainer_name": "CpuTrainer", "fold": 0},
        "postprocessing": {"largest_component": [1]},
        "choices_evidence": {"use_mirroring": "off", "postprocessing": {"mean_dice": by_class}}}))
    (folder / "plans.json").write_text(json.dumps({"configurations": {"2d": {
        "batch_size": 4, "patch_size": [224, 224], "spacing": [1.5625, 1.5625],
        "architecture": {"arch_kwargs": {"features_per_stage": [8, 16], "n_stages": 2}}}}}))
    (folder / "model.onnx").write_bytes(b"0" * 1000)
    return folder


SUNNYBROOK = {"study": "SCD0000101", "ed_phase": 18, "es_phase": 7, "dice_lv_ed": 0.912, "dice_lv_es": 0.871,
              "dice_myo_ed": 0.777, "shape": [256, 256, 12, 20], "mirroring": False, "seconds_per_cine": 12.3,
              "drawn_slices_expert_phases": {"lv_ef_pct": {"model": 24.1, "expert": 25.8}},
              "whole_cine_service": {"lv_edv_ml": 181.0, "lv_esv_ml": 143.0, "lv_ef_pct": 21.0, "rv_edv_ml": 150.2,
                                     "rv_ef_pct": 40.0, "ed_phase": 17, "es_phase": 6}}
FACTS = {"epochs_done": 120, "epochs_planned": 200, "iterations_per_epoch": 50, "training_time": "about 1 h",
         "load_note": "idle"}


@pytest.mark.parametrize("met", [True, False], ids=["floor-met", "floor-not-met"])
def test_card_carries_the_results_and_says_whether_the_floor_is_met(tmp_path, met):
    dice = {"LV cavity": 0.951, "LV myocardium": 0.884, "RV": 0.9 if met else 0.861}
    previous = {"dice_mean": {"LV cavity": 0.347, "LV myocardium": 0.219, "RV": 0.0}}
    card = acdc_card(_version_dir(tmp_path, dice), SUNNYBROOK, previous, FACTS)
    assert f"| ED + ES | 0.951 | 0.884 | {dice['RV']:.3f} |" in card
    assert "| previous default, same cases | 0.347 | 0.219 | 0.000 |" in card
    assert "| lv_ef_pct | -3.3 | -9.0 .. +2.5 |" in card
    assert "Dice LV cavity ED 0.912, ES 0.871" in card and "RV EDV 150.2 ml" in card
    assert "patient005, patient012" in card and "120 of 200 epochs" in card
    assert ("meets the issue's Dice floor on every class" in card) is met
    assert ("below the issue's Dice floor on the held-out ACDC patients for: RV" in card) is not met
    assert "better on every class" in card


def test_card_shows_the_unlabelled_samples_with_their_flags_and_the_look_by_eye(tmp_path):
    dice = {"LV cavity": 0.951, "LV myocardium": 0.884, "RV": 0.9}
    sample = {"shape": [192, 192, 14], "spacing_mm": [1.0, 1.0, 10.0], "lv_edv_ml": 151.8, "lv_esv_ml": 61.0,
              "lv_ef_pct": 59.8, "lv_mass_g": 68.6, "rv_edv_ml": 64.2, "rv_esv_ml": 58.1, "rv_ef_pct": 9.5,
              "quality": ["es_larger_than_ed_on_slices"],
              "slices_with": {"ed": {"LV cavity": [1, 2, 3, 4], "RV": [2, 3, 5]},
                              "es": {"LV cavity": [3, 4], "RV": []}}}
    facts = {**FACTS, "eye_check": {"mnms": "the left atrium labelled RV at ES"}}
    card = acdc_card(_version_dir(tmp_path, dice), SUNNYBROOK, None, facts, unlabelled={"mnms": sample})
    assert ("| mnms | 192x192x14, 1 x 1 x 10 | 151.8 / 61.0 ml / 59.8 % | 68.6 g | 64.2 / 58.1 ml / 9.5 % | "
            "1-4 / 3-4; 2-3, 5 / none | es_larger_than_ed_on_slices |") in card
    assert "- mnms, by eye (overlays of every slice at ED and ES): the left atrium labelled RV at ES" in card
    assert "CineMA" not in acdc_card(_version_dir(tmp_path / "b", dice), SUNNYBROOK, None, FACTS)
