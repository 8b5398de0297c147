"""A TINY nnU-Net model for tests and benchmarks, built once and cached.

Real nnunetv2 code end to end: fingerprint extraction, experiment planning (the stock
``ExperimentPlanner`` with narrower feature maps), preprocessing and ``nnUNetTrainer`` training
on synthetic cardiac cine phantoms (LV cavity, LV myocardium ring, RV crescent; labels in the
CMR-VL order 1/2/3), only with a schedule of a few dozen iterations instead of 250 x 1000.
The model is not meant to be accurate: tests use it to prove that different execution paths
(nnUNetv2_predict, ONNX Runtime, Triton) agree on the same weights.

Cache: ``~/.cache/cmrvl/test-models/cmr_seg_tiny-<hash>/`` (see tests/model_cache.py; override the root with
CMRVL_TEST_MODEL_CACHE). The hash covers the recipe (phantoms, build, exporter), so changing it
rebuilds the model; older builds are removed. The build runs in a subprocess because
nnunetv2 reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` at import time.

    python tests/nnunet_fixtures.py        # build (or find) the cached model, print its folders
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_cache import CACHE_ROOT

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 901
DATASET_NAME = f"Dataset{DATASET_ID:03d}_CMRVLTinyCine"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
TRAINER_FOLDER = f"nnUNetTrainer__{PLANS}__{CONFIGURATION}"
FOLD = 0
N_TRAIN_CASES = 6
TRAIN_ITERATIONS = 150
MODEL_NAME = "cmr_seg"


# ---------------------------------------------------------------- synthetic cardiac phantoms

def phantom(shape_xyz=(64, 64, 8), phase: float = 0.0, spacing_mm=(1.5, 1.5, 8.0), seed: int = 0,
            center_shift_mm=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Short-axis cine frame (x, y, slice) and its labels (0 bg, 1 LV, 2 myo, 3 RV).

    Geometry is in mm so volumes with another pixel size show the same anatomy; ``phase`` in
    [0, 1) contracts the ventricles (0 = end-diastole, 0.4 = about end-systole).
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_xyz
    sx, sy, _ = spacing_mm
    x = (np.arange(nx) - nx / 2) * sx - center_shift_mm[0]
    y = (np.arange(ny) - ny / 2) * sy - center_shift_mm[1]
    xx, yy = np.meshgrid(x, y, indexing="ij")
    contraction = 1.0 - 0.3 * np.sin(np.pi * min(max(phase, 0.0), 1.0)) ** 2
    image = np.zeros(shape_xyz, np.float32)
    labels = np.zeros(shape_xyz, np.uint8)
    for k in range(nz):
        taper = 1.0 - 0.6 * (k / max(nz - 1, 1)) ** 2  # base -> apex
        lv_a, lv_b = 17 * taper * contraction, 15 * taper * contraction
        wall = 6.0 + 2.0 * (1.0 - contraction)
        r_lv = (xx / lv_a) ** 2 + (yy / lv_b) ** 2
        r_epi = (xx / (lv_a + wall)) ** 2 + (yy / (lv_b + wall)) ** 2
        rv_cx = -(lv_a + wall) * 0.9
        r_rv = ((xx - rv_cx) / (lv_a * 1.2 + 6)) ** 2 + ((yy + 2) / (lv_b * 1.5 + 4)) ** 2
        body = (xx / (nx * sx * 0.48)) ** 2 + (yy / (ny * sy * 0.42)) ** 2 <= 1
        sl = np.zeros((nx, ny), np.uint8)
        sl[(r_rv <= 1) & (r_epi > 1)] = 3
        sl[r_epi <= 1] = 2
        sl[r_lv <= 1] = 1
        img = np.where(body, 90.0, 5.0)
        img = np.where(sl == 1, 220.0, img)
        img = np.where(sl == 2, 55.0, img)
        img = np.where(sl == 3, 190.0, img)
        labels[..., k] = sl
        image[..., k] = img
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    return np.clip(image, 0, None), labels


def phantom_cine(shape_xyz=(64, 64, 8), n_phases=4, spacing_mm=(1.5, 1.5, 8.0), seed=0):
    """(x, y, slice, phase) image and labels over one cardiac cycle."""
    frames = [phantom(shape_xyz, t / n_phases, spacing_mm, seed + t) for t in range(n_phases)]
    return (np.stack([f[0] for f in frames], -1), np.stack([f[1] for f in frames], -1))


def oblique_affine(spacing_mm=(1.5, 1.5, 8.0), angle_deg=20.0, origin=(-40.0, 30.0, 12.0)):
    """An oblique RAS affine with the given voxel spacing (column norms)."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing_mm)
    affine[:3, 3] = origin
    return affine


# ---------------------------------------------------------------- the cached model

@dataclass(frozen=True)
class TinyModel:
    root: Path

    @property
    def results_folder(self) -> Path:  # nnUNet results folder: plans.json, dataset.json, fold_0/
        return self.root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.root / "nnUNet_raw"),
                   nnUNet_preprocessed=str(self.root / "nnUNet_preprocessed"),
                   nnUNet_results=str(self.root / "nnUNet_results"),
                   nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")
        return env

    @property
    def layout(self) -> Path:  # the exported model repository (see services/segmentation/model_layout.py)
        return self.root / "model_repository"


def _cache_key() -> str:
    """Changes when the recipe (phantoms, planning, training, export) changes."""
    import inspect

    from services.segmentation import model_layout

    recipe = "".join(inspect.getsource(f) for f in (phantom, _build, model_layout.export_model))
    recipe += f"{DATASET_ID}{CONFIGURATION}{PLANS}{FOLD}{N_TRAIN_CASES}{TRAIN_ITERATIONS}"
    return f"cmr_seg_tiny-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def tiny_model() -> TinyModel:
    """Build the tiny model unless cached; return its folders. Safe under concurrent callers."""
    key = _cache_key()
    model = TinyModel(CACHE_ROOT / key)
    done = model.root / "DONE"
    if done.exists():
        return model
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            for stale in CACHE_ROOT.glob("cmr_seg_tiny-*"):  # older recipes
                if stale.is_dir() and stale != model.root:
                    shutil.rmtree(stale, ignore_errors=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", str(model.root)],
                           cwd=REPO, env=model.env, check=True)
            done.write_text("ok\n")
    return model


def unseen_cine(n_phases: int = 3, shape_xyz=(72, 60, 8), spacing_mm=(1.4, 1.4, 8.0)):
    """A cine the model has not seen: other size, pixel spacing and an oblique affine."""
    image, labels = phantom_cine(shape_xyz, n_phases, spacing_mm, seed=7)
    return image, labels, oblique_affine(spacing_mm)


def nnunet_predict_reference(model: TinyModel, image_4d: np.ndarray, affine: np.ndarray,
                             cache: bool = True) -> tuple[np.ndarray, float]:
    """Labels (x, y, z, t) from the stock ``nnUNetv2_predict`` command on the same weights: every
    phase written as a NIfTI case, one call for all. Cached by input, model and nnunetv2 version
    (the command is deterministic); returns (labels, seconds the command took, or 0.0 if cached)."""
    import time
    from importlib.metadata import version

    import nibabel as nib

    key = hashlib.sha256(image_4d.tobytes() + np.asarray(affine, np.float64).tobytes()
                         + str(image_4d.shape).encode() + version("nnunetv2").encode()).hexdigest()[:16]
    folder = model.root / "reference" / key
    cached = folder / "labels.npy"
    if cache and cached.exists():
        return np.load(cached), 0.0
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "in").mkdir(parents=True)
    for t in range(image_4d.shape[3]):
        nib.save(nib.Nifti1Image(image_4d[..., t].astype(np.float32), affine), folder / "in" / f"phase_{t:03d}_0000.nii.gz")
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_predict"), "-i", str(folder / "in"), "-o", str(folder / "out"),
           "-d", str(DATASET_ID), "-c", CONFIGURATION, "-p", PLANS, "-tr", "nnUNetTrainer", "-f", str(FOLD),
           "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    start = time.perf_counter()
    subprocess.run(cmd, env=model.env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    labels = np.stack([np.asarray(nib.load(folder / "out" / f"phase_{t:03d}.nii.gz").dataobj, dtype=np.uint8)
                       for t in range(image_4d.shape[3])], -1)
    np.save(cached, labels)
    return labels, seconds


def _build(root: Path) -> None:
    """Runs in a subprocess with the nnU-Net environment variables set (see tiny_model)."""
    import nibabel as nib
    import torch

    if root.exists():
        shutil.rmtree(root)
    raw = root / "nnUNet_raw" / DATASET_NAME
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir(parents=True)
    for i in range(N_TRAIN_CASES):
        spacing = (1.5 + 0.1 * (i % 3), 1.5 + 0.1 * (i % 3), 8.0)
        img, lab = phantom((64, 64, 8), phase=i / N_TRAIN_CASES, spacing_mm=spacing, seed=100 + i,
                           center_shift_mm=(3.0 * (i % 3 - 1), 2.0 * (i % 2)))
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(img, affine), raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), raw / "labelsTr" / f"case_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "cineMRI"},
        "labels": {"background": 0, "LV cavity": 1, "LV myocardium": 2, "RV cavity": 3},
        "numTraining": N_TRAIN_CASES, "file_ending": ".nii.gz"}, indent=2))

    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class TinyPlanner(ExperimentPlanner):
        """The stock planner with narrow feature maps, so that CPU training and inference are quick."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 8
            self.UNet_max_features_2d = 64
            self.UNet_max_features_3d = 64

    class TinyTrainer(nnUNetTrainer):
        """The stock trainer (same network builder, loss, augmentation) with a few dozen iterations."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = TRAIN_ITERATIONS
            self.num_val_iterations_per_epoch = 2

    torch.manual_seed(0)
    torch.set_num_threads(2)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    TinyPlanner(DATASET_ID, plans_name=PLANS).plan_experiment()
    preprocess([DATASET_ID], PLANS, configurations=(CONFIGURATION,), num_processes=(1,))

    plans = json.loads((root / "nnUNet_preprocessed" / DATASET_NAME / f"{PLANS}.json").read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    plans["continue_training"] = False  # what nnunetv2.run.run_training adds before building a trainer
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process: no worker processes on 2 cores
    trainer = TinyTrainer(plans, CONFIGURATION, FOLD, dataset_json, device=torch.device("cpu"))
    trainer.run_training()
    # TinyTrainer lives here, not inside the nnunetv2 package where nnUNetv2_predict looks trainers up
    # by name. It inherits build_network_architecture unchanged, so the checkpoint is a stock
    # nnUNetTrainer checkpoint; the output folder and trainer_name say so for nnUNetv2_predict.
    src = root / "nnUNet_results" / DATASET_NAME / f"TinyTrainer__{PLANS}__{CONFIGURATION}"
    dst = root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER
    src.rename(dst)
    ckpt_path = dst / f"fold_{FOLD}" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    ckpt["trainer_name"] = "nnUNetTrainer"
    ckpt.pop("optimizer_state", None)
    torch.save(ckpt, ckpt_path)

    from services.segmentation.model_layout import export_model
    report = export_model(dst, root / "model_repository", MODEL_NAME, 1, fold=FOLD,
                          sample_image=raw / "imagesTr" / "case_000_0000.nii.gz")
    print(json.dumps(report["verification"], indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build":
        _build(Path(sys.argv[2]))
    else:
        m = tiny_model()
        print(m.results_folder)
        print(m.layout)
