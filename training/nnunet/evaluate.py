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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASS_NAMES = {1: "LV cavity", 2: "LV myocardium", 3: "RV"}
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


def evaluate_exported(version_dir: str | Path, staged_dataset: str | Path, fold_dir: str | Path,
                      training: dict | None = None, out: str | Path | None = None) -> dict:
    """Evaluate ``version_dir`` (an exported model version) on the validation cases of ``fold_dir``
    (the cases nnU-Net validated), with labels from ``staged_dataset``; writes evaluation.json."""
    import nibabel as nib

    from services.segmentation.function import measure_labels
    from services.segmentation.inference import load_segmenter
    from training.nnunet.train import known_labels

    version_dir, staged_dataset, fold_dir = Path(version_dir), Path(staged_dataset), Path(fold_dir)
    dataset = json.loads((staged_dataset / "dataset.json").read_text())
    ending = dataset.get("file_ending", ".nii.gz")
    ignore = dataset["labels"].get("ignore")
    classes = sorted(v for k, v in dataset["labels"].items() if k not in ("background", "ignore"))
    cases = sorted(p.name[: -len(ending)] for p in (fold_dir / "validation").glob(f"*{ending}"))
    if not cases:
        raise ValueError(f"{fold_dir}/validation holds no predicted cases (was nnU-Net's validation run?)")

    segmenter = load_segmenter(version_dir.parent, backend="onnxruntime", version=int(version_dir.name))
    per_case, labels_of = {}, {}
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

    dice_by_class = {CLASS_NAMES[c]: [r["dice"][CLASS_NAMES[c]] for r in per_case.values()
                                      if r["dice"].get(CLASS_NAMES[c]) is not None] for c in classes}
    dice_mean = {k: float(np.mean(v)) if v else None for k, v in dice_by_class.items()}

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

    fold = fold_dir.name.removeprefix("fold_")
    report = {
        "model": str(version_dir),
        "dataset": dataset.get("name", staged_dataset.name),
        "fold": fold,
        "on_training_data": fold == "all",
        "note": ("fold 'all': the validation cases are the training cases; these numbers only show that the "
                 "pipeline works, not how the model generalises") if fold == "all" else
                "validation cases of this fold (not seen in training)",
        "backend": "onnxruntime (the exported model.onnx with nnU-Net pre/post-processing, as served)",
        "scoring": "Dice on the classes and slices each case annotates; clinical values from "
                   "services.segmentation.function.measure_labels on the annotated slices, predicted - reference",
        "cases": per_case,
        "dice_mean": dice_mean,
        "clinical": clinical,
        "clinical_errors": errors,
        "training": training,
    }
    out = Path(out) if out is not None else version_dir / "evaluation.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report
