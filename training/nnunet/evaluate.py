"""Evaluate an exported segmentation model on nnU-Net validation cases -> ``evaluation.json``.

The exported model itself is evaluated (services.segmentation.inference.load_segmenter with ONNX
Runtime: the network, preprocessing and sliding window that the service runs), and the clinical
numbers come from services.segmentation.function.measure_labels, the service's measuring code.

- Dice per class and case, on the classes the case annotates (partially annotated sources such as
  Sunnybrook ES: LV cavity only) and on the slices it annotates (the staged label map's all-ignore
  slices are left out; see training/nnunet/train.py for the label policy).
- Clinical errors per patient (a patient = its ``*_ed`` and ``*_es`` cases): LV EDV, ESV, EF, LV mass
  (and RV EDV/ESV/EF where the reference has an RV), predicted minus reference, measured on the
  annotated slices; over patients: bias and 95% limits of agreement (bias +- 1.96 SD; SD needs
  at least two patients).
- Mean Dice also per phase (ED, ES) and, for ACDC cases, per ACDC diagnostic group. A class the
  model does not output scores 0 where the reference has it (an LV-only model on the RV).

The cases are those nnU-Net validated in ``fold_dir``, or an explicit list (``cases``; e.g. the
held-out fifth recorded in the dataset's dataset.json). Run standalone:

    python -m training.nnunet.evaluate --model LAYOUT --dataset STAGED_DATASET --held-out [--no-mirroring]
        [--out evaluation.json]
    python -m training.nnunet.evaluate --model LAYOUT --sunnybrook ../shared/data/sunnybrook --out sunnybrook.json
    python -m training.nnunet.evaluate --model LAYOUT --unlabelled ../shared/data/cinema-samples --out cinema.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASS_NAMES = {1: "LV cavity", 2: "LV myocardium", 3: "RV"}
# ACDC's training set: groups of 20 consecutive patient numbers, in this order (its Info.cfg `Group`).
ACDC_GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def acdc_group(case_id: str) -> str | None:
    """ACDC diagnostic group of a case id such as ``acdc_patient042_ed``; None for other sources."""
    import re

    match = re.fullmatch(r"acdc_patient(\d{3})_(ed|es)", case_id)
    if not match or not 1 <= int(match.group(1)) <= 100:
        return None
    return ACDC_GROUPS[(int(match.group(1)) - 1) // 20]
CLINICAL_KEYS = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct")


def dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (nothing to score)."""
    total = int(pred.sum()) + int(ref.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def reference_and_slices(staged_label: np.ndarray, ignore: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(reference label map with ignore -> 0, boolean mask of annotated slices along the last axis)."""
    label = np.asarray(staged_label).astype(np.uint8)
    if ignore is None:
        return label, np.ones(label.shape[2], bool)
    annotated = (label != ignore).reshape(-1, label.shape[2]).any(0)
    return np.where(label == ignore, 0, label).astype(np.uint8), annotated


def agreement(diffs: list[float]) -> dict:
    """Bias and 95% limits of agreement (Bland-Altman) of predicted - reference differences."""
    d = np.asarray([x for x in diffs if x is not None], float)
    if d.size == 0:
        return {"n": 0, "bias": None, "sd": None, "loa_low": None, "loa_high": None}
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else None
    return {"n": int(d.size), "bias": bias, "sd": sd,
            "loa_low": bias - 1.96 * sd if sd is not None else None,
            "loa_high": bias + 1.96 * sd if sd is not None else None}


def evaluate_exported(version_dir: str | Path, staged_dataset: str | Path, fold_dir: str | Path | None,
                      training: dict | None = None, out: str | Path | None = None, cases: list[str] | None = None,
                      use_mirroring: bool | None = None, note: str | None = None,
                      mirroring_axes: tuple[int, ...] | None = None) -> dict:
    """Evaluate ``version_dir`` (an exported model version) on the validation cases of ``fold_dir``
    (the cases nnU-Net validated) or on ``cases``, with labels from ``staged_dataset``; writes
    evaluation.json (or ``out``). ``use_mirroring`` / ``mirroring_axes`` None: as the model's
    inference.json says."""
    import time

    import nibabel as nib

    from services.segmentation.function import measure_labels
    from services.segmentation.inference import load_segmenter
    from training.nnunet.train import known_labels

    version_dir, staged_dataset = Path(version_dir), Path(staged_dataset)
    fold_dir = Path(fold_dir) if fold_dir is not None else None
    dataset = json.loads((staged_dataset / "dataset.json").read_text())
    ending = dataset.get("file_ending", ".nii.gz")
    ignore = dataset["labels"].get("ignore")
    classes = sorted(v for k, v in dataset["labels"].items() if k not in ("background", "ignore"))
    if cases is None:
        cases = sorted(p.name[: -len(ending)] for p in (fold_dir / "validation").glob(f"*{ending}"))
        if not cases:
            raise ValueError(f"{fold_dir}/validation holds no predicted cases (was nnU-Net's validation run?)")

    segmenter = load_segmenter(version_dir.parent, backend="onnxruntime", version=int(version_dir.name),
                               use_mirroring=use_mirroring, mirroring_axes=mirroring_axes)
    per_case, labels_of = {}, {}
    start = time.perf_counter()
    try:
        for case in cases:
            image = nib.load(str(staged_dataset / "imagesTr" / f"{case}_0000{ending}"))
            staged = np.asanyarray(nib.load(str(staged_dataset / "labelsTr" / f"{case}{ending}")).dataobj)
            ref, slices = reference_and_slices(staged, ignore)
            pred = segmenter.segment_volume(np.asanyarray(image.dataobj).astype(np.float32), image.affine)
            pred[:, :, ~slices] = 0  # score and measure where the reference annotates
            scored = known_labels(case) or set(classes)
            per_case[case] = {"annotated_slices": int(slices.sum()),
                              "dice": {CLASS_NAMES[c]: dice(pred == c, ref == c) for c in classes if c in scored}}
            labels_of[case] = (pred, ref, image.affine)
    finally:
        segmenter.close()

    seconds = time.perf_counter() - start

    def mean_dice(selected: dict) -> dict:
        values = {CLASS_NAMES[c]: [r["dice"][CLASS_NAMES[c]] for r in selected.values()
                                   if r["dice"].get(CLASS_NAMES[c]) is not None] for c in classes}
        return {k: float(np.mean(v)) if v else None for k, v in values.items()}

    dice_mean = mean_dice(per_case)
    dice_by_phase = {ph: mean_dice({c: r for c, r in per_case.items() if c.endswith(f"_{ph}")}) for ph in ("ed", "es")}
    groups = sorted({g for g in map(acdc_group, per_case) if g}, key=ACDC_GROUPS.index)
    dice_by_group = {g: mean_dice({c: r for c, r in per_case.items() if acdc_group(c) == g}) for g in groups}

    clinical = {}
    for case in cases:
        if not case.endswith("_ed") or f"{case[:-3]}_es" not in labels_of:
            continue
        patient = case[:-3]
        (p_ed, r_ed, affine), (p_es, r_es, _) = labels_of[case], labels_of[f"{patient}_es"]
        pred = measure_labels(np.stack([p_ed, p_es], -1), affine, ed_phase=0, es_phase=1)
        ref = measure_labels(np.stack([r_ed, r_es], -1), affine, ed_phase=0, es_phase=1)
        clinical[patient] = {"predicted": {k: pred[k] for k in CLINICAL_KEYS},
                             "reference": {k: ref[k] for k in CLINICAL_KEYS}}
    errors = {k: agreement([(c["predicted"][k] - c["reference"][k])
                            if c["predicted"][k] is not None and c["reference"][k] is not None else None
                            for c in clinical.values()]) for k in CLINICAL_KEYS}

    fold = fold_dir.name.removeprefix("fold_") if fold_dir is not None else None
    report = {
        "model": str(version_dir),
        "dataset": dataset.get("name", staged_dataset.name),
        "fold": fold,
        "on_training_data": fold == "all",
        "note": note or (("fold 'all': the validation cases are the training cases; these numbers only show that the "
                          "pipeline works, not how the model generalises") if fold == "all" else
                         "validation cases of this fold (not seen in training)"),
        "use_mirroring": bool(segmenter.mirroring_axes),
        "mirroring_axes": segmenter.mirroring_axes,
        "largest_component": list(segmenter.largest_component),
        "seconds": round(seconds, 1),
        "backend": "onnxruntime (the exported model.onnx with nnU-Net pre/post-processing, as served)",
        "scoring": "Dice on the classes and slices each case annotates; clinical values from "
                   "services.segmentation.function.measure_labels on the annotated slices, predicted - reference",
        "cases": per_case,
        "dice_mean": dice_mean,
        "dice_by_phase": dice_by_phase,
        "dice_by_group": dice_by_group,
        "clinical": clinical,
        "clinical_errors": errors,
        "training": training,
    }
    out = Path(out) if out is not None else version_dir / "evaluation.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def choose_postprocessing(version_dir: str | Path, staged_dataset: str | Path, cases: list[str],
                          use_mirroring: bool = False, mirroring_axes: tuple[int, ...] | None = None) -> dict:
    """nnU-Net-style choice on validation cases: for each class, keep only its largest 3D connected
    component if that raises the class's mean Dice (nnU-Net's determine_postprocessing keeps it when
    it does not hurt; here it must help, so that a tie keeps the labels as predicted)."""
    import nibabel as nib

    from services.segmentation.inference import load_segmenter, postprocess

    version_dir, staged_dataset = Path(version_dir), Path(staged_dataset)
    dataset = json.loads((staged_dataset / "dataset.json").read_text())
    ending = dataset.get("file_ending", ".nii.gz")
    segmenter = load_segmenter(version_dir.parent, backend="onnxruntime", version=int(version_dir.name),
                               use_mirroring=use_mirroring, mirroring_axes=mirroring_axes)
    segmenter.largest_component = ()  # raw predictions; the variants are applied below
    raw = {}
    try:
        for case in cases:
            image = nib.load(str(staged_dataset / "imagesTr" / f"{case}_0000{ending}"))
            ref = np.asanyarray(nib.load(str(staged_dataset / "labelsTr" / f"{case}{ending}")).dataobj)
            raw[case] = (segmenter.segment_volume(np.asanyarray(image.dataobj).astype(np.float32), image.affine), ref)
    finally:
        segmenter.close()
    result = {"cases": len(cases), "use_mirroring": use_mirroring, "mirroring_axes": segmenter.mirroring_axes,
              "mean_dice": {}, "largest_component": []}
    for value, name in CLASS_NAMES.items():
        before = [dice(p == value, r == value) for p, r in raw.values()]
        after = [dice(postprocess(p, (value,)) == value, r == value) for p, r in raw.values()]
        before = float(np.mean([d for d in before if d is not None]))
        after = float(np.mean([d for d in after if d is not None]))
        result["mean_dice"][name] = {"as_predicted": before, "largest_component": after}
        if after > before:
            result["largest_component"].append(value)
    return result


def held_out_cases(staged_dataset: str | Path) -> list[str]:
    """The cases of the held-out patients recorded in the dataset's dataset.json (convert.py)."""
    staged_dataset = Path(staged_dataset)
    dataset = json.loads((staged_dataset / "dataset.json").read_text())
    if "held_out" not in dataset:
        raise ValueError(f"{staged_dataset}/dataset.json records no held-out patients")
    patients = set(dataset["held_out"]["patients"])
    ending = dataset.get("file_ending", ".nii.gz")
    return sorted(p.name[: -len(ending)] for p in (staged_dataset / "labelsTr").glob(f"*{ending}")
                  if p.name[: -len(ending)].rsplit("_", 1)[0] in patients)


def evaluate_sunnybrook(model_dir: str | Path, sunnybrook_root: str | Path, use_mirroring: bool | None = None,
                        threads: int = 2, mirroring_axes: tuple[int, ...] | None = None) -> dict:
    """A model on the (unseen, GE) Sunnybrook study as the service runs it: Dice against the expert
    LV contours at the expert ED/ES phases on the drawn slices; LV volumes on those slices, model
    and expert; the whole cine measured as the service measures it (ED/ES from the volume curve,
    all slices, RV included; Sunnybrook has no RV reference); seconds per whole cine."""
    import time

    from services.segmentation.function import measure_labels
    from services.segmentation.inference import load_segmenter
    from training.nnunet.sunnybrook import find_cases, load_case

    (study_id, case_id, dicom_dir, contour_dir), *_ = find_cases(sunnybrook_root)
    case = load_case(dicom_dir, contour_dir, study_id, case_id)
    segmenter = load_segmenter(model_dir, use_mirroring=use_mirroring, mirroring_axes=mirroring_axes, threads=threads)
    segmenter.segment_volume(case.study.image[..., 0], case.study.affine)  # warm-up, not timed
    start = time.perf_counter()
    labels = segmenter.segment_cine(case.study.image, case.study.affine)
    result = {"study": study_id, "case": case_id, "seconds_per_cine": round(time.perf_counter() - start, 2),
              "shape": list(case.study.image.shape), "mirroring": segmenter.predictor.use_mirroring,
              "mirroring_axes": segmenter.mirroring_axes,
              "ed_phase": case.ed_phase, "es_phase": case.es_phase}
    for phase, frame in (("ed", case.ed_phase), ("es", case.es_phase)):
        drawn = case.contoured_slices[phase]
        result[f"dice_lv_{phase}"] = dice(labels[..., drawn, frame] == 1, case.labels[phase][..., drawn] == 1)
    drawn = case.contoured_slices["ed"]
    result["dice_myo_ed"] = dice(labels[..., drawn, case.ed_phase] == 2, case.labels["ed"][..., drawn] == 2)

    def on_drawn_slices(volume: np.ndarray, phase: str) -> np.ndarray:
        """Only the slices the expert drew at that phase (ES is often drawn on fewer)."""
        drawn_there = np.isin(np.arange(volume.shape[2]), case.contoured_slices[phase])
        return np.where(drawn_there[None, None, :], volume, 0)

    keys = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g")
    model = measure_labels(np.stack([on_drawn_slices(labels[..., case.ed_phase], "ed"),
                                     on_drawn_slices(labels[..., case.es_phase], "es")], -1), case.study.affine,
                           ed_phase=0, es_phase=1)
    expert = measure_labels(np.stack([on_drawn_slices(case.labels["ed"], "ed"), on_drawn_slices(case.labels["es"], "es")],
                                     -1), case.study.affine, ed_phase=0, es_phase=1)
    result["drawn_slices_expert_phases"] = {k: {"model": model[k], "expert": expert[k]} for k in keys}
    whole = measure_labels(labels, case.study.affine)
    result["whole_cine_service"] = {k: whole.get(k) for k in (*keys, "rv_edv_ml", "rv_esv_ml", "rv_ef_pct",
                                                              "ed_phase", "es_phase")}
    return result


def evaluate_unlabelled(model_dir: str | Path, root: str | Path, threads: int = 2) -> dict:
    """A model on real volumes without expert labels (the CineMA samples: one folder per subject with
    ``sax_ed.nii.gz`` and ``sax_es.nii.gz``): what the service would report for each, the measuring
    code's quality flags, and on which slices each class is found. There is no reference to score
    against: the values are for plausibility and for the look by eye the model card records."""
    import nibabel as nib

    from services.segmentation.function import MEASUREMENT_KEYS, measure_labels
    from services.segmentation.inference import load_segmenter

    subjects = sorted(p.parent for p in Path(root).glob("*/sax_ed.nii.gz") if (p.parent / "sax_es.nii.gz").is_file())
    if not subjects:
        raise ValueError(f"{root}: no <subject>/sax_ed.nii.gz + sax_es.nii.gz")
    segmenter = load_segmenter(model_dir, threads=threads)
    result = {}
    try:
        for folder in subjects:
            ed, es = (nib.load(folder / f"sax_{phase}.nii.gz") for phase in ("ed", "es"))
            labels = np.stack([segmenter.segment_volume(np.asarray(img.dataobj, np.float32), img.affine)
                               for img in (ed, es)], -1)
            measured = measure_labels(labels, ed.affine, ed_phase=0, es_phase=1)
            result[folder.name] = {
                "shape": list(labels.shape[:3]), "spacing_mm": [round(float(s), 3) for s in ed.header.get_zooms()[:3]],
                **{k: measured[k] for k in MEASUREMENT_KEYS},
                "quality": [flag["code"] for flag in measured["quality"]],
                "slices_with": {phase: {CLASS_NAMES[c]: [int(z) for z in np.flatnonzero((labels[..., i] == c).any((0, 1)))]
                                        for c in CLASS_NAMES} for i, phase in enumerate(("ed", "es"))},
            }
    finally:
        segmenter.close()
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Evaluate an exported model on a staged nnU-Net dataset")
    parser.add_argument("--model", required=True, help="model layout (repository or model folder)")
    parser.add_argument("--version", type=int, help="model version (default: the latest)")
    parser.add_argument("--dataset", help="staged dataset folder (nnUNet_raw/DatasetNNN_X)")
    parser.add_argument("--sunnybrook", help="instead: the Sunnybrook data folder (evaluate_sunnybrook)")
    parser.add_argument("--unlabelled", help="instead: a folder of <subject>/sax_ed|sax_es.nii.gz without labels")
    parser.add_argument("--held-out", action="store_true", help="the held-out patients of dataset.json")
    parser.add_argument("--fold-dir", help="nnU-Net fold folder whose validation cases to use")
    parser.add_argument("--no-mirroring", action="store_true", help="no test-time mirroring")
    parser.add_argument("--mirroring", action="store_true",
                        help="test-time mirroring (on the axes inference.json names, else on all allowed axes)")
    parser.add_argument("--mirroring-axes", type=int, nargs="+", metavar="AXIS",
                        help="test-time mirroring on these patch axes only (a subset of the allowed ones)")
    parser.add_argument("--out", required=True, help="evaluation JSON to write")
    args = parser.parse_args(argv)
    from services.segmentation.model_layout import latest_version, resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    axes = tuple(args.mirroring_axes) if args.mirroring_axes else None
    mirroring = False if args.no_mirroring else (True if args.mirroring or axes else None)
    if args.sunnybrook or args.unlabelled:
        report = (evaluate_sunnybrook(model_dir, args.sunnybrook, use_mirroring=mirroring, mirroring_axes=axes)
                  if args.sunnybrook
                  else evaluate_unlabelled(model_dir, args.unlabelled))
        Path(args.out).write_text(json.dumps(report, indent=1, default=float) + "\n")
        print(json.dumps(report, indent=1, default=float))
        return 0
    if not args.dataset:
        parser.error("--dataset (or --sunnybrook / --unlabelled) is required")
    version_dir = model_dir / str(args.version or latest_version(model_dir))
    cases = held_out_cases(args.dataset) if args.held_out else None
    report = evaluate_exported(version_dir, args.dataset, Path(args.fold_dir) if args.fold_dir else None,
                               out=args.out, cases=cases, use_mirroring=mirroring, mirroring_axes=axes,
                               note="held-out patients of the dataset (never trained on)" if args.held_out else None)
    print(json.dumps({k: report[k] for k in ("dice_mean", "dice_by_phase", "dice_by_group", "use_mirroring",
                                             "mirroring_axes", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
