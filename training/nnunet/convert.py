"""ACDC, M&Ms and Sunnybrook -> one nnU-Net v2 raw dataset (issues 8, 13).

Every subject contributes its ED and ES frames as two cases (`<source>_<patient>_ed|es`), with the
geometry of the source file kept. Labels are remapped at this boundary to the platform convention
(0 background, 1 LV cavity, 2 LV myocardium, 3 RV) and each case's label set is checked against
what its source promises. `splits_final.json` groups cases by patient so that the ED and ES of one
subject never fall into different folds; ACDC patients are also stratified over ACDC's five
diagnostic groups (blocks of 20 patient numbers), so fold 0's validation fifth holds 4 patients of
each group: that fold is the fixed held-out set of the shipped model (`held_out` in dataset.json).

ACDC also comes as HDF5 (`--acdc-h5`, the WSL4MIS redistribution: `patientNNN_frameFF.h5` with
`image` and `label`, no voxel spacing). Those cases get ACDC_H5_ASSUMED_SPACING_MM, written into
dataset.json (`assumed_spacing`), because nothing in the files says otherwise.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

PLATFORM_LABELS = {"background": 0, "LV cavity": 1, "LV myocardium": 2, "RV": 3}
# Source label -> platform label.
ACDC_TO_PLATFORM = {0: 0, 1: 3, 2: 2, 3: 1}  # ACDC: 1 RV, 2 MYO, 3 LV
MNMS_TO_PLATFORM = {0: 0, 1: 1, 2: 2, 3: 3}  # M&Ms: 1 LV, 2 MYO, 3 RV (the platform's order)
FULL_HEART = frozenset({1, 2, 3})
N_FOLDS = 5
DEFAULT_SEED = 12345
# ACDC's training set: five diagnostic groups of 20 consecutive patient numbers (NOR, MINF, DCM, HCM, RV).
ACDC_GROUP_SIZE = 20
# (x, y, z) mm assumed for the HDF5 ACDC files, which store no geometry: ACDC's median in-plane
# spacing (its range is 1.37-1.68 mm) and its usual 10 mm between slices.
ACDC_H5_ASSUMED_SPACING_MM = (1.5625, 1.5625, 10.0)


@dataclass
class Case:
    """One nnU-Net training case; `load` returns (image, label) nibabel images in platform labels."""

    case_id: str
    patient_id: str
    source: str
    promised: frozenset[int]  # platform foreground labels the source promises for this case
    load: Callable[[], tuple]


def remap(labels: np.ndarray, mapping: dict[int, int], where: str) -> np.ndarray:
    """Map source label values to platform values; unknown values are an error."""
    values = np.rint(np.asarray(labels)).astype(np.int64)
    unknown = sorted(set(np.unique(values).tolist()) - set(mapping))
    if unknown:
        raise ValueError(f"{where}: unexpected label values {unknown} (expected {sorted(mapping)})")
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[values]


def check_case(case: Case, image, label) -> None:
    """The label map matches the image grid and holds exactly the labels its source promises."""
    if image.shape[:3] != label.shape[:3] or len(image.shape) != 3 or len(label.shape) != 3:
        raise ValueError(f"{case.case_id}: image {image.shape} and label {label.shape} must be 3D of the same shape")
    if not np.allclose(image.affine, label.affine, atol=1e-4):
        raise ValueError(f"{case.case_id}: image and label affines differ")
    present = set(np.unique(np.asarray(label.dataobj)).tolist()) - {0}
    if present != set(case.promised):
        raise ValueError(
            f"{case.case_id}: labels {sorted(present)} but {case.source} promises {sorted(case.promised)}"
        )


def _label_image(nib, data: np.ndarray, like):
    """A uint8 label image on the grid (affine, q/sform codes) of `like`."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(data.astype(np.uint8), like.affine, header)
    img.header.set_slope_inter(1, 0)
    return img


# --- ACDC -------------------------------------------------------------------------------------

def read_acdc_info(path: Path) -> dict[str, str]:
    """`Info.cfg` as a dict (`ED: 1`, `ES: 12`, `Group: DCM`, ...)."""
    info = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def acdc_cases(acdc_dir: str | Path) -> list[Case]:
    """Cases of ACDC's `training/` folder: `patientXXX/` with `Info.cfg` and 3D frames (1-based)."""
    import nibabel as nib

    root = Path(acdc_dir)
    patients = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))
    if not patients:
        raise ValueError(f"{root}: no patientXXX/ folders (give ACDC's training/ folder)")
    cases = []
    for patient in patients:
        info_path = patient / "Info.cfg"
        if not info_path.is_file():
            raise ValueError(f"{patient}: no Info.cfg")
        info = read_acdc_info(info_path)
        for phase in ("ED", "ES"):
            if phase not in info:
                raise ValueError(f"{info_path}: no {phase} entry")
            frame = int(info[phase])
            image_path = patient / f"{patient.name}_frame{frame:02d}.nii.gz"
            label_path = patient / f"{patient.name}_frame{frame:02d}_gt.nii.gz"
            for path in (image_path, label_path):
                if not path.is_file():
                    raise ValueError(f"{path}: missing ({phase} frame {frame} from Info.cfg)")

            def load(image_path=image_path, label_path=label_path):
                image, gt = nib.load(str(image_path)), nib.load(str(label_path))
                data = remap(np.asanyarray(gt.dataobj), ACDC_TO_PLATFORM, str(label_path))
                return image, _label_image(nib, data, gt)

            cases.append(Case(f"acdc_{patient.name}_{phase.lower()}", f"acdc_{patient.name}", "ACDC", FULL_HEART, load))
    return cases


def acdc_h5_cases(h5_dir: str | Path, spacing_mm: tuple[float, float, float] = ACDC_H5_ASSUMED_SPACING_MM) -> list[Case]:
    """Cases of the HDF5 ACDC layout: `patientNNN_frameFF.h5` (`image`, `label` as (slices, rows,
    columns)), two frames per patient, the lower frame number ED. No geometry is stored, so the
    NIfTI grid gets ``spacing_mm`` (x = column, y = row, z = slice) and an axis-aligned affine."""
    import nibabel as nib

    root = Path(h5_dir)
    frames: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(root.glob("*.h5")):
        match = re.fullmatch(r"(patient\d{3})_frame(\d+)\.h5", path.name)
        if match:
            frames.setdefault(match.group(1), []).append((int(match.group(2)), path))
    if not frames:
        raise ValueError(f"{root}: no patientNNN_frameFF.h5 files (give the ACDC HDF5 folder)")
    affine = np.diag([*map(float, spacing_mm), 1.0])
    cases = []
    for patient, found in sorted(frames.items()):
        if len(found) != 2:
            raise ValueError(f"{root}: {patient} has {len(found)} frame files, expected 2 (ED and ES)")
        for phase, (_, path) in zip(("ed", "es"), sorted(found)):

            def load(path=path):
                import h5py

                with h5py.File(path, "r") as f:
                    missing = {"image", "label"} - set(f)
                    if missing:
                        raise ValueError(f"{path}: no dataset {sorted(missing)[0]!r}")
                    image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"])
                if image.ndim != 3 or image.shape != label.shape:
                    raise ValueError(f"{path}: image {image.shape} and label {label.shape} must be 3D of the same shape")
                data = remap(label, ACDC_TO_PLATFORM, str(path)).transpose(2, 1, 0)
                img = nib.Nifti1Image(np.ascontiguousarray(image.transpose(2, 1, 0)), affine)
                img.set_qform(affine, code=1)
                img.set_sform(affine, code=1)
                return img, _label_image(nib, data, img)

            cases.append(Case(f"acdc_{patient}_{phase}", f"acdc_{patient}", "ACDC-h5", FULL_HEART, load))
    return cases


# --- M&Ms -------------------------------------------------------------------------------------

def read_mnms_phases(csv_path: str | Path) -> dict[str, tuple[int, int]]:
    """{External code: (ED, ES)} from the M&Ms metadata CSV (0-based frame indices)."""
    phases = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip(): name for name in reader.fieldnames or []}
        missing = {"External code", "ED", "ES"} - set(columns)
        if missing:
            raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
        for row in reader:
            code = row[columns["External code"]].strip()
            if code:
                phases[code] = (int(float(row[columns["ED"]])), int(float(row[columns["ES"]])))
    return phases


def mnms_cases(mnms_dir: str | Path, csv_path: str | Path) -> list[Case]:
    """Cases of an M&Ms labelled folder: `<code>/<code>_sa.nii.gz` + `_sa_gt.nii.gz` (4D)."""
    import nibabel as nib

    root = Path(mnms_dir)
    phases = read_mnms_phases(csv_path)
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and (p / f"{p.name}_sa_gt.nii.gz").is_file())
    if not subjects:
        raise ValueError(f"{root}: no <code>/<code>_sa_gt.nii.gz subject folders")
    cases = []
    for subject in subjects:
        code = subject.name
        if code not in phases:
            raise ValueError(f"{csv_path}: no ED/ES row for subject {code}")
        image_path, label_path = subject / f"{code}_sa.nii.gz", subject / f"{code}_sa_gt.nii.gz"
        if not image_path.is_file():
            raise ValueError(f"{image_path}: missing")
        for phase, frame in zip(("ed", "es"), phases[code]):

            def load(image_path=image_path, label_path=label_path, frame=frame):
                image, gt = nib.load(str(image_path)), nib.load(str(label_path))
                for img, path in ((image, image_path), (gt, label_path)):
                    if img.ndim != 4 or not 0 <= frame < img.shape[3]:
                        raise ValueError(f"{path}: frame {frame} not in a 4D image of shape {img.shape}")
                image_t, gt_t = image.slicer[..., frame], gt.slicer[..., frame]
                data = remap(np.asanyarray(gt_t.dataobj), MNMS_TO_PLATFORM, f"{label_path} frame {frame}")
                return image_t, _label_image(nib, data, gt_t)

            cases.append(Case(f"mnms_{code}_{phase}", f"mnms_{code}", "M&Ms", FULL_HEART, load))
    return cases


# --- Sunnybrook -------------------------------------------------------------------------------

def sunnybrook_cases(root: str | Path) -> list[Case]:
    """Cases of a Sunnybrook folder (`link.csv`, study folders, `contours/`): LV only.

    The epicardium is drawn at ED only, so ED promises {LV cavity, LV myocardium} and ES {LV cavity}.
    """
    import nibabel as nib

    from training.nnunet.sunnybrook import find_cases, load_case

    cases = []
    for study_id, case_id, dicom_dir, contour_dir in find_cases(root):
        loaded: dict = {}

        def load(phase, study_id=study_id, case_id=case_id, dicom_dir=dicom_dir, contour_dir=contour_dir, loaded=loaded):
            if "case" not in loaded:  # read the DICOM once for both phases
                loaded["case"] = load_case(dicom_dir, contour_dir, study_id, case_id)
            sb = loaded["case"]
            frame = sb.ed_phase if phase == "ed" else sb.es_phase
            image = nib.Nifti1Image(sb.study.image[..., frame], sb.study.affine)
            label = nib.Nifti1Image(sb.labels[phase], sb.study.affine)
            for img in (image, label):
                img.set_qform(sb.study.affine, code=1)
                img.set_sform(sb.study.affine, code=1)
            return image, label

        for phase, promised in (("ed", frozenset({1, 2})), ("es", frozenset({1}))):
            cases.append(Case(f"sunnybrook_{study_id}_{phase}", f"sunnybrook_{study_id}", "Sunnybrook", promised,
                              lambda phase=phase, load=load: load(phase)))
    return cases


# --- Dataset ----------------------------------------------------------------------------------

def make_splits(patient_of_case: dict[str, str], n_folds: int = N_FOLDS, seed: int = DEFAULT_SEED) -> list[dict]:
    """nnU-Net `splits_final.json` content grouped by patient, deterministic from `seed`.

    Patients are shuffled within each stratum (source; for ACDC, source and diagnostic group) and
    dealt round-robin, so every fold sees every source and group where there are enough patients:
    each of ACDC's groups of 20 puts 4 patients in every fold. With fewer patients than folds, there
    are as many folds as patients.
    """
    patients = sorted(set(patient_of_case.values()))
    n_folds = min(n_folds, len(patients))
    if n_folds < 2:
        raise ValueError(f"need at least 2 patients for cross-validation splits, got {len(patients)}")
    rng = np.random.default_rng(seed)
    fold_of_patient, position = {}, 0
    for stratum in sorted({_stratum(p) for p in patients}):
        group = [p for p in patients if _stratum(p) == stratum]
        for patient in rng.permutation(group):
            fold_of_patient[str(patient)] = position % n_folds
            position += 1
    splits = []
    for fold in range(n_folds):
        val = sorted(c for c, p in patient_of_case.items() if fold_of_patient[p] == fold)
        train = sorted(c for c, p in patient_of_case.items() if fold_of_patient[p] != fold)
        splits.append({"train": train, "val": val})
    return splits


def _stratum(patient_id: str) -> tuple[str, int]:
    """(source, ACDC diagnostic group or 0): ACDC's groups are blocks of 20 patient numbers."""
    source = patient_id.split("_", 1)[0]
    match = re.fullmatch(r"acdc_patient(\d+)", patient_id)
    return source, (int(match.group(1)) - 1) // ACDC_GROUP_SIZE if match else 0


def dataset_json(num_training: int, name: str, sources: list[str]) -> dict:
    """nnU-Net v2 dataset.json (same keys as nnunetv2's generate_dataset_json)."""
    return {
        "channel_names": {"0": "cineMRI"},
        "labels": dict(PLATFORM_LABELS),
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Short-axis cine ED/ES frames, platform labels (1 LV cavity, 2 LV myocardium, 3 RV); "
        f"sources: {', '.join(sources)}",
        "licence": "see the source datasets (ACDC, M&Ms, Sunnybrook Cardiac Data)",
        "converted_by": "cmrvl train nnunet-dataset",
    }


def iter_cases(acdc: str | Path | None = None, mnms: str | Path | None = None, mnms_csv: str | Path | None = None,
               sunnybrook: str | Path | None = None, acdc_h5: str | Path | None = None) -> Iterator[Case]:
    if mnms is not None and mnms_csv is None:
        raise ValueError("M&Ms needs its metadata CSV (ED/ES frames)")
    if acdc is not None:
        yield from acdc_cases(acdc)
    if acdc_h5 is not None:  # the same patients as --acdc: together they fail as duplicate cases
        yield from acdc_h5_cases(acdc_h5)
    if mnms is not None:
        yield from mnms_cases(mnms, mnms_csv)
    if sunnybrook is not None:
        yield from sunnybrook_cases(sunnybrook)


def build_dataset(
    out_dir: str | Path,
    dataset_id: int,
    name: str = "CMRVL",
    acdc: str | Path | None = None,
    mnms: str | Path | None = None,
    mnms_csv: str | Path | None = None,
    sunnybrook: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
    acdc_h5: str | Path | None = None,
) -> dict:
    """Write `out_dir/DatasetNNN_<name>/` (imagesTr, labelsTr, dataset.json, splits_final.json).

    Returns a summary: dataset folder, cases per source, number of folds.
    """
    import nibabel as nib

    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"dataset name {name!r}: use letters, digits, '_' or '-'")
    if acdc is None and mnms is None and sunnybrook is None and acdc_h5 is None:
        raise ValueError("give at least one source (ACDC, ACDC HDF5, M&Ms or Sunnybrook)")
    out_dir = Path(out_dir)
    folder = out_dir / f"Dataset{dataset_id:03d}_{name}"
    clash = [p.name for p in out_dir.glob(f"Dataset{dataset_id:03d}_*") if p != folder] if out_dir.is_dir() else []
    if clash:
        raise ValueError(f"{out_dir}: dataset id {dataset_id} is already used by {clash[0]}")
    # Collect all cases first so that layout errors show before anything is written.
    cases = list(iter_cases(acdc, mnms, mnms_csv, sunnybrook, acdc_h5))
    seen = set()
    for case in cases:
        if case.case_id in seen:
            raise ValueError(f"case {case.case_id} appears twice")
        seen.add(case.case_id)
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    if folder.exists():
        if not overwrite and any(folder.iterdir()):
            raise ValueError(f"{folder} exists and is not empty (use overwrite)")
        for sub in (images_dir, labels_dir):
            shutil.rmtree(sub, ignore_errors=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)


    per_source: dict[str, int] = {}
    for case in cases:
        image, label = case.load()
        check_case(case, image, label)
        nib.save(image, str(images_dir / f"{case.case_id}_0000.nii.gz"))
        nib.save(label, str(labels_dir / f"{case.case_id}.nii.gz"))
        per_source[case.source] = per_source.get(case.source, 0) + 1

    sources = list(per_source)
    meta = dataset_json(len(cases), name, sources)
    if "ACDC-h5" in per_source:
        meta["assumed_spacing"] = {
            "cases": "acdc_patient*", "source": "ACDC HDF5 (no geometry stored)",
            "spacing_mm_xyz": list(ACDC_H5_ASSUMED_SPACING_MM),
            "note": "ACDC in-plane spacing is really 1.37-1.68 mm and 5-10 mm between slices: "
                    "volumes from these cases are approximate"}
    patient_of_case = {c.case_id: c.patient_id for c in cases}
    n_patients = len(set(patient_of_case.values()))
    splits_path = folder / "splits_final.json"
    if n_patients >= 2:
        splits = make_splits(patient_of_case, N_FOLDS, seed)
        splits_path.write_text(json.dumps(splits, indent=2) + "\n")
        n_folds = len(splits)
        meta["held_out"] = {"fold": 0, "seed": seed, "why": "validation fifth of the shipped model, "
                            "stratified by source and ACDC group; train fold 0 to keep it unseen",
                            "patients": sorted({patient_of_case[c] for c in splits[0]["val"]})}
    else:  # one patient: no cross-validation possible
        splits_path.unlink(missing_ok=True)
        n_folds = 0
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {
        "dataset_dir": str(folder),
        "num_training": len(cases),
        "cases_per_source": per_source,
        "patients": n_patients,
        "folds": n_folds,
        "splits_final": str(splits_path) if n_folds else None,
    }
