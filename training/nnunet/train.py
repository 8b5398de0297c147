"""`cmrvl train nnunet`: nnU-Net's own fingerprint / plan / preprocess / train, then export (issue 8).

    cmrvl train nnunet --raw RAW/Dataset100_X --dataset-id 100 --configuration 2d --fold all \
        --work WORK --profile reduced --label-set lv --export-to LAYOUT --model-name cmr_seg --version 1

Steps (all through nnunetv2's Python API, with nnUNet_raw / nnUNet_preprocessed / nnUNet_results
under ``--work``):

1. Stage the raw dataset (written by `cmrvl train nnunet-dataset`) into WORK/nnUNet_raw, applying
   the label policy below.
2. Fingerprint, plan and preprocess (skipped when the plans and preprocessed data already exist).
3. Train one fold; an existing checkpoint in the results folder is continued (nnU-Net's ``--c``).
   With ``--checkpoint-to s3://...`` the fold's results are restored from the object store first and
   every checkpoint is uploaded when written (CheckpointMirror): the cluster Job's pod may be replaced.
4. nnU-Net's own validation of the fold, then optionally export the serving layout
   (services/segmentation/model_layout.py) and evaluate it (training/nnunet/evaluate.py).

Profiles: ``standard`` is the stock ExperimentPlanner and nnUNetTrainer (the cluster Job, on a GPU);
``reduced`` is ReducedPlanner + ReducedTrainer below: narrow feature maps and a short schedule for a
CPU; ``cpu`` (CpuPlanner + CpuTrainer) is the profile of the ACDC default model: a 2D network sized for
fast CPU inference, a fixed batch of 224 x 224 slices, a checkpoint every epoch. Both are ordinary subclasses run through the Python API, so nothing is added to site-packages.
The reduced trainer builds the stock network, so its checkpoint loads like a stock one.

Label policy for partially annotated sources. Sunnybrook draws the LV cavity at ED and ES, the LV
myocardium at ED only, the RV never, and leaves some slices undrawn. Pixels whose class is unknown
become nnU-Net's ``ignore`` label (the highest value; excluded from loss and Dice) instead of
background, so that the network is never taught "background" on unlabelled myocardium or RV:
undrawn slices are ignored; where a case does not annotate every class of the model, its
background is ignored too (Sunnybrook ES under ``--label-set lv``; every Sunnybrook case under
``full``, because the RV could be anywhere outside the LV). Where only the cavity is drawn
(Sunnybrook ES), a 3 mm ring just outside it is labelled myocardium, so that the cavity cannot grow
into the unlabelled wall (the LV wall is always thicker). ``--label-set lv`` trains an LV-only
model (0 background, 1 LV cavity, 2 LV myocardium; the RV of fully labelled sources becomes
background).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where used, so that building the `cmrvl` parser stays light
    import numpy as np

LABEL_SETS = {
    "full": {"background": 0, "LV cavity": 1, "LV myocardium": 2, "RV": 3},
    "lv": {"background": 0, "LV cavity": 1, "LV myocardium": 2},
}
# Case-id pattern (as written by training/nnunet/convert.py) -> foreground labels the source annotates.
PARTIAL_SOURCES = {r"sunnybrook_.*_ed": {1, 2}, r"sunnybrook_.*_es": {1}}
# Width of the myocardium ring drawn outside a cavity-only (ES) contour; see apply_label_policy.
ES_WALL_RING_MM = 3.0
PROFILES = {
    "standard": {"planner": "ExperimentPlanner", "plans": "nnUNetPlans", "trainer": "nnUNetTrainer"},
    "reduced": {"planner": "ReducedPlanner", "plans": "nnUNetPlansReduced", "trainer": "ReducedTrainer"},
    "cpu": {"planner": "CpuPlanner", "plans": "nnUNetPlansCpu", "trainer": "CpuTrainer"},
}
# Profiles that train on a small CPU: one preprocessing process, augmentation in the training process.
CPU_PROFILES = ("reduced", "cpu")
# Reduced profile schedule (defaults of --epochs / --iterations): 50 x 20 iterations of batch 2 at
# 224x224 (Sunnybrook): 0.25 s each on 2 idle CPU cores (about 5 min), several times that on busy ones.
REDUCED_EPOCHS = 50
REDUCED_ITERATIONS = 20
# CPU profile (the ACDC default model, issue 13): a 2D network sized so that a whole 12 x 20 cine
# runs in seconds through ONNX Runtime on 2 cores, on one 224 x 224 tile per slice (a 350 mm field
# of view at ACDC's 1.56 mm). Measured on the 2 shared cores (load ~7): base 8 features, batch 8:
# 9.4 s per iteration, 151 ms per 224 x 224 forward; base 16: 17 s and 559 ms (3.7x slower
# inference), so base 8 with a batch of 4 slices (more optimizer steps in the time there is).
# Stock nnU-Net augmentation (rotation, scaling, noise, blur, brightness, contrast, simulated low
# resolution, gamma, mirroring) for scanners it has not seen. A checkpoint every epoch: a lost
# process loses at most one. An epoch (50 iterations) took 30 s on idle cores and 320-735 s while
# other jobs ran; continue a finished schedule with a larger --epochs (nnU-Net resumes from the
# last checkpoint; the poly LR then restarts from where the longer schedule would be).
CPU_BASE_FEATURES = 8
CPU_MAX_FEATURES = 256
CPU_PATCH = 224
CPU_BATCH = 4
CPU_EPOCHS = 40
CPU_ITERATIONS = 50


def nnunet_env(work: str | Path) -> dict[str, str]:
    """nnU-Net's folder variables under one work folder."""
    work = Path(work).resolve()
    return {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
            "nnUNet_results": str(work / "nnUNet_results")}


def find_raw_dataset(raw: str | Path, dataset_id: int) -> Path:
    """The dataset folder: ``raw`` itself (has dataset.json) or raw/DatasetNNN_*."""
    raw = Path(raw)
    if (raw / "dataset.json").is_file():
        return raw
    found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*"))
    if len(found) != 1 or not (found[0] / "dataset.json").is_file():
        raise ValueError(f"{raw}: no dataset.json and no single Dataset{dataset_id:03d}_* folder with one")
    return found[0]


def known_labels(case_id: str) -> set[int] | None:
    """Foreground labels a case annotates, or None when it annotates all of them."""
    for pattern, labels in PARTIAL_SOURCES.items():
        if re.fullmatch(pattern, case_id):
            return labels
    return None


def apply_label_policy(label: np.ndarray, annotated: set[int] | None, label_set: str,
                       ring_px: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, bool]:
    """Label map in the model's label set, unknown pixels = ignore; returns (labels, any ignore).

    ``ring_px`` (x, y): where a case draws the LV cavity but not the myocardium (Sunnybrook ES), a
    ring this wide just outside the cavity is labelled myocardium: the LV wall is always thicker
    than that, and without it nothing would stop the cavity from growing into the unlabelled wall.
    """
    import numpy as np
    from scipy.ndimage import binary_dilation

    classes = set(LABEL_SETS[label_set].values()) - {0}
    ignore = max(classes) + 1
    out = np.where(np.isin(label, list(classes)), label, 0).astype(np.uint8)
    if annotated is None:
        return out, False
    if not classes <= annotated:  # an unannotated class may hide in the background
        out[out == 0] = ignore
    if 1 in annotated and 2 not in annotated and 2 in classes and min(ring_px) > 0:
        rx, ry = ring_px
        disc = np.add.outer((np.arange(-rx, rx + 1) / rx) ** 2, (np.arange(-ry, ry + 1) / ry) ** 2) <= 1.0
        cavity = label == 1
        wall = binary_dilation(cavity, structure=disc[:, :, None]) & ~cavity
        out[wall] = 2
    undrawn = ~label.reshape(-1, label.shape[2]).any(0)  # slices (last axis) without any contour
    out[:, :, undrawn] = ignore
    return out, True


def stage_dataset(src: Path, dst: Path, label_set: str) -> dict:
    """Copy a raw dataset to nnUNet_raw with the label policy applied; returns the new dataset.json."""
    import nibabel as nib
    import numpy as np

    dataset = json.loads((src / "dataset.json").read_text())
    ending = dataset.get("file_ending", ".nii.gz")
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "labelsTr").mkdir(parents=True)
    shutil.copytree(src / "imagesTr", dst / "imagesTr")
    uses_ignore = False
    for path in sorted((src / "labelsTr").glob(f"*{ending}")):
        case_id = path.name[: -len(ending)]
        img = nib.load(str(path))
        ring_px = tuple(max(1, round(ES_WALL_RING_MM / float(z))) for z in img.header.get_zooms()[:2])
        data, ignored = apply_label_policy(np.asanyarray(img.dataobj).astype(np.uint8), known_labels(case_id),
                                           label_set, ring_px)
        uses_ignore |= ignored
        out = nib.Nifti1Image(data, img.affine, img.header)
        out.set_data_dtype(np.uint8)
        nib.save(out, str(dst / "labelsTr" / path.name))
    labels = dict(LABEL_SETS[label_set])
    if uses_ignore:
        labels["ignore"] = max(labels.values()) + 1
    dataset["labels"] = labels
    dataset["label_policy"] = {"label_set": label_set, "partial_sources": {k: sorted(v) for k, v in PARTIAL_SOURCES.items()},
                               "es_wall_ring_mm": ES_WALL_RING_MM,
                               "staged_from": str(src)}
    (dst / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    if (src / "splits_final.json").is_file():
        shutil.copy(src / "splits_final.json", dst / "splits_final.json")
    return dataset


def _profile_classes():
    """ReducedPlanner / ReducedTrainer (imported late: nnunetv2 reads the env vars on import)."""
    import torch
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class ReducedPlanner(ExperimentPlanner):
        """Stock planning (spacing, patch, topology) with narrow feature maps for CPU training and a small ONNX."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 8
            self.UNet_max_features_2d = 128
            self.UNet_max_features_3d = 128

    class ScheduledTrainer(nnUNetTrainer):
        """Stock trainer (network, Dice + CE loss, deep supervision, augmentation, SGD poly LR) on the
        schedule its subclass names."""
        EPOCHS, ITERATIONS, VAL_ITERATIONS, SAVE_EVERY = 1000, 250, 50, 50  # nnU-Net's own

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch = self.EPOCHS, self.ITERATIONS
            self.num_val_iterations_per_epoch, self.save_every = self.VAL_ITERATIONS, self.SAVE_EVERY

    class ReducedTrainer(ScheduledTrainer):
        """A short schedule, checkpoint_latest often enough to resume."""
        EPOCHS, ITERATIONS, VAL_ITERATIONS, SAVE_EVERY = REDUCED_EPOCHS, REDUCED_ITERATIONS, 2, 5

    class CpuPlanner(ExperimentPlanner):
        """Stock planning (spacing, normalisation, topology rules) with a CPU-sized network, an in-plane
        patch of at most CPU_PATCH and a fixed batch (the stock rule sizes both for a GPU's memory)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = CPU_BASE_FEATURES
            self.UNet_max_features_2d = CPU_MAX_FEATURES
            self.UNet_max_features_3d = CPU_MAX_FEATURES

        def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                        _cache):
            import numpy as np

            shape = np.minimum(np.asarray(median_shape), CPU_PATCH)  # the stock patch never exceeds this shape
            plan = super().get_plans_for_configuration(spacing, shape, data_identifier, approximate_n_voxels_dataset,
                                                       _cache)
            plan["median_image_size_in_voxels"] = median_shape
            if len(spacing) == 2:
                plan["batch_size"] = CPU_BATCH
            return plan

    class CpuTrainer(ScheduledTrainer):
        """The CPU schedule: CPU_EPOCHS x CPU_ITERATIONS, a checkpoint every epoch, torch on 2 threads."""
        EPOCHS, ITERATIONS, VAL_ITERATIONS, SAVE_EVERY = CPU_EPOCHS, CPU_ITERATIONS, 4, 1

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            if device.type == "cpu":
                torch.set_num_threads(min(2, torch.get_num_threads()))

    return {"ExperimentPlanner": ExperimentPlanner, "ReducedPlanner": ReducedPlanner, "CpuPlanner": CpuPlanner,
            "nnUNetTrainer": nnUNetTrainer, "ReducedTrainer": ReducedTrainer, "CpuTrainer": CpuTrainer}


def train(raw: str | Path, dataset_id: int, configuration: str, fold: int | str, work: str | Path,
          profile: str = "standard", label_set: str = "full", epochs: int | None = None,
          iterations: int | None = None, device: str = "auto", export_to: str | Path | None = None,
          model_name: str = "cmr_seg", version: int = 1, evaluate: bool = True,
          mirror: CheckpointMirror | None = None) -> dict:
    """Run the steps in the module docstring in this process; returns a summary.

    With ``mirror`` the fold's results folder is restored from, and each checkpoint written to, the
    object store (see CheckpointMirror), so that training survives the loss of the work folder.

    nnunetv2 binds its folder variables when first imported, so this sets them from ``work``
    and refuses to run if nnunetv2 was already imported with other folders.
    """
    env = nnunet_env(work)
    if "nnunetv2.paths" in sys.modules:
        paths = sys.modules["nnunetv2.paths"]
        if any(getattr(paths, k, None) != v for k, v in env.items()):
            raise RuntimeError("nnunetv2 was imported with other nnUNet_* folders; run training in a fresh process")
    os.environ.update(env)
    if profile in CPU_PROFILES:  # nnU-Net's default of 8 worker processes (validation export) swamps a small CPU
        os.environ.setdefault("nnUNet_def_n_proc", "2")
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.run.run_training import maybe_load_checkpoint

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}")
    fold = fold if fold == "all" else int(fold)
    src = find_raw_dataset(raw, dataset_id)
    name = src.name.split("_", 1)[1] if re.fullmatch(r"Dataset\d{3}_.+", src.name) else src.name
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    staged = Path(env["nnUNet_raw"]) / dataset_name
    dataset_json = stage_dataset(src, staged, label_set)

    spec, classes = PROFILES[profile], _profile_classes()
    n_proc = 1 if profile in CPU_PROFILES else max(1, (os.cpu_count() or 2) // 2)
    pre = Path(env["nnUNet_preprocessed"]) / dataset_name
    plans_path = pre / f"{spec['plans']}.json"
    stamp, staged_hash = pre / "cmrvl_staged.sha256", _tree_hash(staged)
    if (not plans_path.is_file() or not (pre / f"{spec['plans']}_{configuration}").is_dir()
            or not stamp.is_file() or stamp.read_text() != staged_hash):  # new or changed raw data
        extract_fingerprints([dataset_id], num_processes=n_proc, check_dataset_integrity=True)
        classes[spec["planner"]](dataset_id, plans_name=spec["plans"]).plan_experiment()
        preprocess([dataset_id], spec["plans"], configurations=(configuration,), num_processes=(n_proc,))
        stamp.write_text(staged_hash)
    if (staged / "splits_final.json").is_file():  # patient-grouped folds from the converter
        shutil.copy(staged / "splits_final.json", pre / "splits_final.json")

    if profile in CPU_PROFILES:
        os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process: no worker processes on a small CPU
    plans = json.loads(plans_path.read_text())
    plans["continue_training"] = True  # what nnunetv2.run.run_training records for --c
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    trainer = classes[spec["trainer"]](plans, configuration, fold, dataset_json, device=dev)
    if epochs is not None:
        trainer.num_epochs = epochs
    if iterations is not None:
        trainer.num_iterations_per_epoch = iterations
    results = Path(trainer.output_folder_base)
    if mirror is not None:
        mirror.restore(results, fold, plans=trainer.plans_manager.plans, labels=dataset_json["labels"])
        mirror.attach(trainer)
    maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)  # resumes if a checkpoint exists
    start_epoch, t0 = trainer.current_epoch, time.perf_counter()
    validation_summary = results / f"fold_{fold}" / "validation" / "summary.json"
    if trainer.current_epoch < trainer.num_epochs or not validation_summary.is_file():
        trainer.run_training()  # a no-op loop when the checkpoint is final: nnU-Net then only validates
        train_s = time.perf_counter() - t0
        trainer.perform_actual_validation(False)
    else:
        train_s = 0.0

    losses = {k: trainer.logger.get_value(k, step=None) for k in ("train_losses", "val_losses", "mean_fg_dice")}
    summary = {
        "results_folder": str(results), "fold": fold, "profile": profile, "trainer": spec["trainer"],
        "plans": spec["plans"], "configuration": configuration, "label_set": label_set,
        "labels": dataset_json["labels"], "device": str(dev),
        "epochs": trainer.num_epochs, "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "resumed_from_epoch": start_epoch, "train_seconds_this_run": round(train_s, 1),
        "final_train_loss": float(losses["train_losses"][-1]) if len(losses["train_losses"]) else None,
        "final_val_loss": float(losses["val_losses"][-1]) if len(losses["val_losses"]) else None,
        "final_pseudo_dice": float(losses["mean_fg_dice"][-1]) if len(losses["mean_fg_dice"]) else None,
        "nnunet_validation": _nnunet_validation(validation_summary),
    }
    (results / f"fold_{fold}" / "cmrvl_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if mirror is not None:
        mirror.push_fold(results, fold)  # validation results and logs too: a rerun then skips to the export
        summary["checkpoints"] = mirror.summary()

    if export_to is not None:
        from services.segmentation.model_layout import export_model

        sample = sorted((staged / "imagesTr").glob("*_0000*"))[0]
        info = export_model(results, export_to, model_name, version, fold=fold, sample_image=sample)
        version_dir = Path(export_to) / model_name / str(version)
        summary["export"] = {"version_dir": str(version_dir), "verification": info["verification"],
                             "onnx_bytes": (version_dir / "model.onnx").stat().st_size}
        (version_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        if evaluate:
            from training.nnunet.evaluate import evaluate_exported

            report = evaluate_exported(version_dir, staged, results / f"fold_{fold}", training=summary)
            summary["evaluation"] = str(version_dir / "evaluation.json")
            summary["evaluation_mean_dice"] = report["dice_mean"]
    return summary


class CheckpointMirror:
    """Mirrors a fold's nnU-Net results in the object store, so that a replaced pod resumes.

    ``s3://BUCKET/PREFIX`` holds ``<trainer>__<plans>__<configuration>/`` as nnU-Net lays it out:
    plans.json, dataset.json, dataset_fingerprint.json and ``fold_<f>/`` (checkpoints, training log,
    validation). Before training, the fold is downloaded into the results folder, where nnU-Net's
    own resume logic (``--c``) finds it; each checkpoint is uploaded as soon as nnU-Net has written
    it. Checkpoints are uploaded straight to their final keys: an S3 object is replaced only when its
    upload completes (a single PUT, or CompleteMultipartUpload for the multipart upload the client
    uses above 5 MiB), so a pod that dies mid-upload leaves the previous checkpoint readable and a
    temporary key plus copy would add nothing. A prefix whose stored run has other plans or labels
    is refused: its weights would not fit this network, or would continue on other preprocessing.
    """

    def __init__(self, url: str, store=None):
        if not url.startswith("s3://"):
            raise ValueError(f"checkpoint location must be s3://BUCKET/PREFIX, got {url}")
        self.url = url.rstrip("/")
        self.bucket, self.prefix = _split_s3(url)
        self.store = store if store is not None else _object_store()
        self.restored: list[str] = []
        self.uploads, self.upload_seconds = 0, 0.0

    def _base(self, results: Path) -> str:
        """Key prefix of the results folder in the store."""
        return f"{self.prefix}/{results.name}/" if self.prefix else f"{results.name}/"

    def _key(self, results: Path, path: Path) -> str:
        return self._base(results) + path.relative_to(results).as_posix()

    def restore(self, results: Path, fold, plans: dict | None = None, labels: dict | None = None) -> None:
        """Download the run's top-level files and this fold's folder into ``results``; with ``plans`` /
        ``labels`` (this run's), first refuse a stored run that has others."""
        base = self._base(results)
        stored_plans = self._stored_json(base + "plans.json") if plans is not None else None
        # the trainer records continue_training in its plans; it does not change the network
        if stored_plans is not None and _without(stored_plans, "continue_training") != \
                _without(plans, "continue_training"):
            raise self._other_run(results, "plans")
        stored_dataset = self._stored_json(base + "dataset.json") if labels is not None else None
        if stored_dataset is not None and stored_dataset.get("labels") != labels:
            raise self._other_run(results, "labels")
        wanted = [self.store.list_keys(self.bucket, base, recursive=False),  # plans.json, dataset.json, ...
                  self.store.list_keys(self.bucket, f"{base}fold_{fold}/")]
        for key in (k for keys in wanted for k in keys if not k.endswith("/")):
            self.store.get_file(self.bucket, key, results / key[len(base):])
            self.restored.append(key[len(base):])

    def _stored_json(self, key: str) -> dict | None:
        """The JSON document at key, None when nothing is stored there yet (a new run)."""
        from services.runtime.storage import ObjectNotFound

        try:
            return self.store.get_json(self.bucket, key)
        except ObjectNotFound:
            return None

    def _other_run(self, results: Path, what: str) -> ValueError:
        return ValueError(f"{self.url}/{results.name} holds a run with other {what}; choose another "
                          "--checkpoint-to, or delete that prefix to start over")

    def push(self, results: Path, path: Path) -> None:
        start = time.perf_counter()
        self.store.put_file(self.bucket, self._key(results, path), path)
        self.uploads += 1
        self.upload_seconds += time.perf_counter() - start

    def push_fold(self, results: Path, fold) -> None:
        for path in sorted(results.glob("*.json")) + sorted((results / f"fold_{fold}").rglob("*")):
            if path.is_file():
                self.push(results, path)

    def attach(self, trainer) -> None:
        """Upload every checkpoint right after the trainer saves it (this instance only)."""
        save, results = trainer.save_checkpoint, Path(trainer.output_folder_base)

        def save_and_push(filename: str) -> None:
            save(filename)
            if trainer.local_rank == 0:  # the rank that wrote the file
                self.push(results, Path(filename))

        trainer.save_checkpoint = save_and_push

    def summary(self) -> dict:
        return {"url": self.url, "restored_files": len(self.restored),
                "resumed_from_store": any(Path(k).name.startswith("checkpoint_") for k in self.restored),
                "uploads": self.uploads, "upload_seconds": round(self.upload_seconds, 2)}


def _without(document: dict, key: str) -> dict:
    return {k: v for k, v in document.items() if k != key}


def _tree_hash(folder: Path) -> str:
    """sha256 over the staged dataset's files (names and contents)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _nnunet_validation(path: Path) -> dict | None:
    """Mean Dice per class from nnU-Net's own validation summary (ignore-label aware)."""
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    return {"mean_dice_per_class": {k: v.get("Dice") for k, v in s.get("mean", {}).items()},
            "foreground_mean_dice": s.get("foreground_mean", {}).get("Dice")}


# ------------------------------------------------------------------------------------------ CLI

def register_train(train_subparsers) -> None:
    parser = train_subparsers.add_parser(
        "nnunet", help="nnU-Net fingerprint/plan/preprocess/train (+ export to the serving layout)",
        description="Run nnU-Net's own planning, preprocessing and training for a raw dataset written by "
        "`cmrvl train nnunet-dataset`, with nnUNet_raw/preprocessed/results under --work. An existing "
        "checkpoint is continued. Partially annotated cases (Sunnybrook) get nnU-Net's ignore label where "
        "the class is unknown (see training/nnunet/train.py).")
    parser.add_argument("--raw", required=True, metavar="DIR",
                        help="raw dataset folder (DatasetNNN_Name/) or the folder holding it; s3://BUCKET/PREFIX/ "
                        "downloads it from the object store (CMRVL_S3_* settings)")
    parser.add_argument("--dataset-id", required=True, type=int, metavar="N", help="nnU-Net dataset id (1-999)")
    parser.add_argument("--configuration", default="2d", choices=["2d", "3d_fullres"], help="nnU-Net configuration (default 2d)")
    parser.add_argument("--fold", default="0", choices=["0", "1", "2", "3", "4", "all"], help="fold to train (default 0)")
    parser.add_argument("--work", required=True, metavar="DIR", help="work folder: nnUNet_raw, nnUNet_preprocessed, nnUNet_results")
    parser.add_argument("--profile", default="standard", choices=sorted(PROFILES),
                        help="standard: stock planner and nnUNetTrainer (GPU); reduced: narrow network, short CPU schedule; "
                        "cpu: the ACDC default model's 2D CPU profile (224 x 224 patch, batch 4, checkpoint every epoch)")
    parser.add_argument("--label-set", default="full", choices=sorted(LABEL_SETS),
                        help="full: LV cavity, LV myocardium, RV; lv: LV only (RV becomes background)")
    parser.add_argument("--epochs", type=int, help="override the profile's number of epochs")
    parser.add_argument("--iterations", type=int, help="override the profile's iterations per epoch")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--export-to", metavar="LAYOUT_DIR",
                        help="export the model to this model repository when done; s3://BUCKET/PREFIX uploads it "
                        "(e.g. s3://cmrvl-models/triton, the repository Triton loads)")
    parser.add_argument("--model-name", default="cmr_seg", help="model name in the repository (default cmr_seg)")
    parser.add_argument("--version", type=int, default=1, help="model version folder (default 1)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip evaluation.json after the export")
    parser.add_argument("--checkpoint-to", metavar="s3://BUCKET/PREFIX",
                        help="mirror the fold's results (checkpoints, logs, validation) in the object store: "
                        "restored before training, each checkpoint uploaded when written, so that a new pod "
                        "resumes where a lost one stopped")
    parser.set_defaults(handler=_handle)


def _split_s3(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _object_store():
    from services.runtime.settings import load_settings
    from services.runtime.storage import ObjectStore

    return ObjectStore(load_settings())


def _handle(args) -> int:
    from services.cli import CommandError

    if not 1 <= args.dataset_id <= 999:
        raise CommandError("--dataset-id must be in 1..999")
    raw, export_to = args.raw, args.export_to
    try:
        # In the cluster the dataset and the model repository live in the object store: stage them
        # through the work folder.
        if raw.startswith("s3://"):
            bucket, prefix = _split_s3(raw)
            raw = Path(args.work) / "s3-raw" / Path(prefix).name
            if not _object_store().download_prefix(bucket, prefix + "/", raw):
                raise FileNotFoundError(f"no objects under {args.raw}")
        if export_to and export_to.startswith("s3://"):
            export_to = Path(args.work) / "export"
        mirror = CheckpointMirror(args.checkpoint_to) if args.checkpoint_to else None
        summary = train(raw, args.dataset_id, args.configuration, args.fold, args.work, args.profile,
                        args.label_set, args.epochs, args.iterations, args.device, export_to,
                        args.model_name, args.version, evaluate=not args.no_evaluate, mirror=mirror)
        if export_to != args.export_to:
            bucket, prefix = _split_s3(args.export_to)
            refs = _object_store().upload_folder(Path(export_to), bucket, f"{prefix}/" if prefix else "")
            summary["uploaded"] = f"{len(refs)} objects to {args.export_to}"
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        raise CommandError(str(exc).splitlines()[0]) from None
    print(json.dumps(summary, indent=2))
    return 0
