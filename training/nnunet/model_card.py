"""MODEL_CARD.md of an ACDC-trained default segmentation model, written from its JSON results.

Every number in the card comes from files the pipeline wrote, none is typed by hand:
``evaluation.json`` (training.nnunet.evaluate on the held-out ACDC fifth), ``inference.json`` and
``plans.json`` of the exported version folder, the Sunnybrook check (evaluate --sunnybrook), the
previous default's evaluation on the same cases, and a small JSON of training facts the run's log
gives (epochs done and planned, training time, the load the machine was under).

    python -m training.nnunet.model_card LAYOUT --sunnybrook sunnybrook.json --previous old.json \
        --facts facts.json        # writes LAYOUT/MODEL_CARD.md
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from training.nnunet.evaluate import CLASS_NAMES

# The issue's floor on the held-out ACDC fifth (mean Dice over ED and ES volumes).
DICE_TARGETS = {"LV cavity": 0.93, "LV myocardium": 0.87, "RV": 0.88}
VOLUME_KEYS = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct")


def _f3(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _f1(x, sign: bool = False) -> str:
    return "-" if x is None else (f"{x:+.1f}" if sign else f"{x:.1f}")


def _dice_row(dice: dict) -> str:
    return " | ".join(_f3(dice.get(name)) for name in DICE_TARGETS)


def acdc_card(version_dir: str | Path, sunnybrook: dict, previous: dict | None, facts: dict,
              unlabelled: dict | None = None) -> str:
    """The card's Markdown. facts: epochs_done, epochs_planned, iterations_per_epoch, training_time
    (text), load_note (text: the machine's load during the timings), optionally eye_check (subject ->
    what a look at its overlays showed). unlabelled: evaluate --unlabelled's JSON."""
    version_dir = Path(version_dir)
    ev = json.loads((version_dir / "evaluation.json").read_text())
    inference = json.loads((version_dir / "inference.json").read_text())
    plan = json.loads((version_dir / "plans.json").read_text())["configurations"][inference["configuration"]]
    arch = plan["architecture"]["arch_kwargs"]
    onnx_bytes = (version_dir / "model.onnx").stat().st_size
    kept = inference["postprocessing"]["largest_component"]
    choice = inference["choices_evidence"]["postprocessing"]["mean_dice"]
    errors = ev["clinical_errors"]
    patients = sorted({case.rsplit("_", 1)[0].removeprefix("acdc_") for case in ev["cases"]})
    below = [name for name, floor in DICE_TARGETS.items() if (ev["dice_mean"].get(name) or 0) < floor]
    beats_previous = previous is not None and all(
        (ev["dice_mean"].get(name) or 0) > (previous["dice_mean"].get(name) or 0) for name in DICE_TARGETS)
    drawn, whole = sunnybrook["drawn_slices_expert_phases"], sunnybrook["whole_cine_service"]
    source = inference["source"]
    finished = facts["epochs_done"] >= facts["epochs_planned"]
    status = ("the end of its training schedule" if finished else
              f"a checkpoint of a CPU training run that continues across sessions ({facts['epochs_done']} of "
              f"{facts['epochs_planned']} epochs)")
    verdict = ("It meets the issue's Dice floor on every class of the held-out ACDC patients." if not below else
               f"It is below the issue's Dice floor on the held-out ACDC patients for: {', '.join(below)}.")
    if beats_previous:
        verdict += " It replaced the previous default because it is better on every class of the same patients."

    lines = [
        f"# Default segmentation model `{inference['model_name']}` v{inference['version']} "
        "(ACDC, LV + myocardium + RV, CPU-trained)",
        "",
        "A 2D nnU-Net v2 model shipped with the repository so that `cmrvl analyze` and `cmrvl segment` measure",
        f"the LV, the LV myocardium and the RV out of the box, on a CPU. This is {status}:",
        f"{facts['epochs_done'] * facts['iterations_per_epoch']} iterations of {plan['batch_size']} slices. "
        f"{verdict} Not for clinical use.",
        "",
        "Layout: a Triton model repository (`cmr_seg/config.pbtxt`, `cmr_seg/1/model.onnx` + `plans.json`,",
        "`dataset.json`, `labels.json`, `inference.json`, `evaluation.json`; see",
        "`services/segmentation/model_layout.py`). Load it with",
        '`load_segmenter("services/segmentation/default_model")`, or run `cmrvl segment IMAGE.nii.gz --out LABELS.nii.gz`.',
        "",
        "## Data",
        "- ACDC training set (Bernard et al., IEEE TMI 2018; research use; Siemens 1.5 T / 3 T), the 100",
        "  patients at ED and ES with expert RV / myocardium / LV labels, as the HDF5 files of the WSL4MIS",
        "  redistribution (`../shared/data/acdc-wsl4mis`), imported by `cmrvl train nnunet-dataset --acdc-h5`",
        "  (labels remapped to 1 LV cavity, 2 LV myocardium, 3 RV).",
        "- **Spacing assumption**: the HDF5 files store no geometry. Every case is given",
        f"  **{plan['spacing'][0]} x {plan['spacing'][1]} mm in-plane and 10 mm between slices** (ACDC's median; "
        "its real range is",
        "  1.37-1.68 mm and 5-10 mm), written into the dataset's `dataset.json` (`assumed_spacing`). The",
        "  network therefore saw each heart at up to +-10 % of its true size (nnU-Net's scaling",
        "  augmentation covers 0.7-1.4x), and ACDC volumes in millilitres below are approximate.",
        "- **Held-out fifth** (never trained on): fold 0 of the dataset's `splits_final.json`, 4 patients of",
        "  each ACDC group (groups = blocks of 20 patient numbers: DCM, HCM, MINF, NOR, RV), recorded in",
        f"  `dataset.json` (`held_out`): {', '.join(patients)}.",
        f"  Training used the other {100 - len(patients)} patients. Post-processing was chosen on the same held-out",
        "  cases (as nnU-Net chooses it on its validation folds), so they are not untouched for that one choice.",
        "",
        "## Configuration",
        f"nnU-Net v{metadata.version('nnunetv2')} `{inference['configuration']}`, `cmrvl train nnunet --profile cpu` "
        "(training/nnunet/train.py):",
        f"`CpuPlanner` (stock `ExperimentPlanner` rules with feature maps {'-'.join(map(str, arch['features_per_stage']))},",
        f"{arch['n_stages']} stages, PlainConvUNet, instance norm, patch {plan['patch_size'][0]} x {plan['patch_size'][1]}, "
        f"batch {plan['batch_size']}, spacing {plan['spacing'][0]} mm,",
        "z-score normalisation per image) and `CpuTrainer` (stock `nnUNetTrainer`: Dice + CE loss, deep",
        "supervision, SGD with Nesterov momentum 0.99, poly LR from 0.01 over",
        f"{facts['epochs_planned']} epochs x {facts['iterations_per_epoch']} iterations; nnU-Net's full augmentation - "
        "rotation, scaling, Gaussian noise",
        "and blur, brightness, contrast, simulated low resolution, gamma, mirroring - kept for scanners it has",
        "not seen). torch on 2 threads, augmentation in the training process.",
        "",
        f"Test-time choices (`inference.json`, read by the service): mirroring **{'on' if inference['use_mirroring'] else 'off'}**",
        f"({inference['choices_evidence']['use_mirroring']}); largest connected component kept for:",
        f"{', '.join(CLASS_NAMES[c] for c in kept) or 'no class'} (chosen on the held-out cases: per class, kept only "
        "where it raised the mean Dice;",
        "; ".join(f"{k} {_f3(v['as_predicted'])} -> {_f3(v['largest_component'])}" for k, v in choice.items()) + ").",
        f"ONNX: {onnx_bytes / 1e6:.1f} MB, opset {inference['onnx_opset']}, dynamic batch; ONNX Runtime agrees with "
        f"PyTorch on a real patch (max |diff| {inference['verification']['max_abs_diff']:.1e}, argmax agreement "
        f"{inference['verification']['argmax_agreement']}).",
        f"Exported from `{source['checkpoint']}` ({source['trainer_name']}, fold {source['fold']}).",
        "",
        "## Training time",
        facts["training_time"],
        "",
        f"## Validation: held-out ACDC fifth ({len(patients)} patients, {len(ev['cases'])} volumes), exported ONNX "
        "model as served",
        "`cmr_seg/1/evaluation.json` (training/nnunet/evaluate.py: the exported model through `load_segmenter`,",
        "the service's pre/post-processing; Dice over each volume).",
        "",
        "| Dice | LV cavity | LV myocardium | RV |",
        "|---|---|---|---|",
        f"| ED + ES | {_dice_row(ev['dice_mean'])} |",
        f"| ED | {_dice_row(ev['dice_by_phase']['ed'])} |",
        f"| ES | {_dice_row(ev['dice_by_phase']['es'])} |",
        *(f"| {group} | {_dice_row(d)} |" for group, d in ev["dice_by_group"].items()),
        f"| issue target (floor) | {_dice_row(DICE_TARGETS)} |",
    ]
    if previous is not None:
        lines.append(f"| previous default, same cases | {_dice_row(previous['dice_mean'])} |")
    lines += [
        "",
        f"Volume errors, predicted - expert over the {len(patients)} patients (ml at the assumed spacing; bias and "
        "95 % limits of agreement):",
        "",
        "| | bias | limits of agreement |",
        "|---|---|---|",
        *(f"| {k} | {_f1(errors[k]['bias'], True)} | {_f1(errors[k]['loa_low'], True)} .. "
          f"{_f1(errors[k]['loa_high'], True)} |" for k in VOLUME_KEYS if k in errors),
        "",
        f"## Unseen scanner: Sunnybrook {sunnybrook['study']} (GE 1.5 T, heart failure with infarction)",
        f"LV expert contours at ED (phase {sunnybrook['ed_phase']}) and ES (phase {sunnybrook['es_phase']}) on the "
        "drawn slices; the RV is not drawn.",
        f"Dice LV cavity ED {_f3(sunnybrook['dice_lv_ed'])}, ES {_f3(sunnybrook['dice_lv_es'])}; myocardium ED "
        f"{_f3(sunnybrook['dice_myo_ed'])}.",
        "",
        "| on the drawn slices, expert phases | model | expert |",
        "|---|---|---|",
        *(f"| {k} | {_f1(v['model'])} | {_f1(v['expert'])} |" for k, v in drawn.items()),
        "",
        f"Whole cine as the service measures it (all slices, ED/ES from the volume curve: phases "
        f"{whole['ed_phase']}/{whole['es_phase']}): LV EDV {_f1(whole['lv_edv_ml'])} ml, ESV "
        f"{_f1(whole['lv_esv_ml'])} ml, EF {_f1(whole['lv_ef_pct'])} %, RV EDV {_f1(whole['rv_edv_ml'])} ml, "
        f"RV EF {_f1(whole['rv_ef_pct'])} % (no RV reference).",
        f"Seconds per whole cine {sunnybrook['shape']} (embedded ONNX Runtime, 2 threads, mirroring "
        f"{'on' if sunnybrook['mirroring'] else 'off'}): {sunnybrook['seconds_per_cine']:.1f} s "
        f"({facts['load_note']}).",
        "",
        *(_unlabelled_section(unlabelled, facts.get("eye_check", {})) if unlabelled else []),
        "## Reproduce / continue",
        "```",
        "cmrvl train nnunet-dataset --acdc-h5 ../shared/data/acdc-wsl4mis --out WORK/raw --dataset-id 131 --name ACDCh5",
        "nice -n 19 cmrvl train nnunet --raw WORK/raw/Dataset131_ACDCh5 --dataset-id 131 --configuration 2d --fold 0 \\",
        f"    --work WORK/work --profile cpu --label-set full --epochs {facts['epochs_planned']}",
        "python -m training.nnunet.evaluate --model LAYOUT --dataset WORK/work/nnUNet_raw/Dataset131_ACDCh5 --held-out "
        "--out evaluation.json",
        "python -m training.nnunet.evaluate --model LAYOUT --sunnybrook ../shared/data/sunnybrook --out sunnybrook.json",
        "python -m training.nnunet.evaluate --model LAYOUT --unlabelled ../shared/data/cinema-samples --out cinema.json",
        "python -m training.nnunet.model_card LAYOUT --sunnybrook sunnybrook.json --previous old.json --facts facts.json \\",
        "    --unlabelled cinema.json",
        "```",
        "The second command resumes from the last checkpoint in `WORK/work/nnUNet_results/.../fold_0/` (one",
        "every epoch). Export: `services.segmentation.model_layout.export_model(..., checkpoint_name=...)`; the",
        "post-processing choice: `training.nnunet.evaluate.choose_postprocessing` on `held_out_cases`. The",
        "shipped model may later be retrained on all 100 patients (`--fold all`); the numbers above are then",
        "no longer held-out and the card must say so.",
        "",
        "## Known limits",
        *([f"- Below the issue's Dice floor for {', '.join(below)}; basal and apical slices are the most",
           "  error-prone (as in ACDC generally)."] if below else []),
        "- Trained on one vendor (Siemens) at an assumed spacing; checked on one GE study only; not yet on",
        "  Philips or Canon data.",
        "- ACDC volumes are approximate (assumed spacing); Sunnybrook has no RV reference.",
        "- No calibration, no uncertainty; not for clinical use.",
    ]
    return "\n".join(lines) + "\n"


def _unlabelled_section(unlabelled: dict, eye_check: dict) -> list[str]:
    """Real volumes without expert labels: what the service would report, its quality flags, and the
    look by eye."""
    from services.segmentation.function import compact_ranges

    def slices(subject: dict, cls: str) -> str:
        return " / ".join(compact_ranges(subject["slices_with"][phase][cls]) or "none" for phase in ("ed", "es"))

    lines = [
        "## Unlabelled real volumes: the CineMA samples (no expert labels)",
        "ED and ES of each subject as `cmrvl measure` would report them (`evaluate --unlabelled`), with the measuring",
        "code's quality flags; no reference to score against, so these are for plausibility only.",
        "",
        "| subject | grid, spacing (mm) | LV EDV / ESV / EF | LV mass | RV EDV / ESV / EF | slices with LV, RV (ED / ES) "
        "| quality flags |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in unlabelled.items():
        lines.append(
            f"| {name} | {'x'.join(map(str, s['shape']))}, {' x '.join(f'{v:g}' for v in s['spacing_mm'])} | "
            f"{_f1(s['lv_edv_ml'])} / {_f1(s['lv_esv_ml'])} ml / {_f1(s['lv_ef_pct'])} % | {_f1(s['lv_mass_g'])} g | "
            f"{_f1(s['rv_edv_ml'])} / {_f1(s['rv_esv_ml'])} ml / {_f1(s['rv_ef_pct'])} % | "
            f"{slices(s, 'LV cavity')}; {slices(s, 'RV')} | {', '.join(s['quality']) or 'none'} |")
    lines.append("")
    lines += [f"- {name}, by eye (overlays of every slice at ED and ES): {text}" for name, text in eye_check.items()]
    return lines + ([""] if eye_check else [])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", type=Path, help="exported layout (holds cmr_seg/<version>/)")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--sunnybrook", type=Path, required=True, help="evaluate --sunnybrook JSON")
    parser.add_argument("--previous", type=Path, help="the previous default's evaluation.json on the same cases")
    parser.add_argument("--facts", type=Path, required=True, help="training facts JSON (see acdc_card)")
    parser.add_argument("--unlabelled", type=Path, help="evaluate --unlabelled JSON (the CineMA samples)")
    args = parser.parse_args(argv)
    previous = json.loads(args.previous.read_text()) if args.previous else None
    card = acdc_card(args.layout / "cmr_seg" / str(args.version), json.loads(args.sunnybrook.read_text()), previous,
                     json.loads(args.facts.read_text()),
                     json.loads(args.unlabelled.read_text()) if args.unlabelled else None)
    (args.layout / "MODEL_CARD.md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
