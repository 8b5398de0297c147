"""`cmrvl train nnunet` (training/nnunet/train.py, evaluate.py) and the shipped default model.

- The label policy turns unknown pixels of partially annotated cases into nnU-Net's ignore label.
- A tiny end-to-end run: synthetic phantoms -> nnU-Net plan/preprocess -> a few iterations with the
  reduced profile -> export -> evaluation.json -> the layout loads and predicts; a second run
  continues from the checkpoint instead of training again.
- A run with --checkpoint-to is killed mid-training and its work folder deleted (a pod replacement);
  the same command on an empty work folder resumes from the checkpoint in the real S3 server.
- services/segmentation/default_model (trained on Sunnybrook by the same command) loads and
  segments the Sunnybrook study's ED phase.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "services" / "segmentation" / "default_model"
SUNNYBROOK = REPO / ".." / "shared" / "data" / "sunnybrook"


def _cmrvl(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _summary(stdout: str) -> dict:
    """The JSON summary `cmrvl train nnunet` prints last (nnU-Net prints its own log before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


# ---------------------------------------------------------------- CLI and label policy

def test_train_nnunet_help():
    result = _cmrvl("train", "nnunet", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--raw", "--dataset-id", "--configuration", "--fold", "--work", "--profile", "--export-to",
                   "--model-name", "--version", "--label-set", "--checkpoint-to"):
        assert option in result.stdout


def test_label_policy_partial_cases():
    from training.nnunet.train import apply_label_policy, known_labels

    label = np.zeros((6, 6, 3), np.uint8)
    label[1:5, 1:5, 1] = 2
    label[2:4, 2:4, 1] = 1  # slice 1 drawn (cavity in myocardium); slices 0 and 2 undrawn
    label[0, 0, 1] = 3  # an RV pixel, as a fully labelled source would have

    assert known_labels("sunnybrook_SCD0000101_ed") == {1, 2}
    assert known_labels("sunnybrook_SCD0000101_es") == {1}
    assert known_labels("acdc_patient001_ed") is None

    # ED under the LV-only label set: background known on drawn slices, undrawn slices ignored (3).
    ed, ignored = apply_label_policy(label, {1, 2}, "lv")
    assert ignored and (ed[..., 0] == 3).all() and (ed[..., 2] == 3).all()
    assert ed[0, 0, 1] == 0 and ed[5, 5, 1] == 0 and ed[2, 2, 1] == 1 and ed[1, 1, 1] == 2
    # ES annotates the cavity only: everything else is unknown ...
    es_label = np.where(label == 1, 1, 0).astype(np.uint8)
    es, _ = apply_label_policy(es_label, {1}, "lv")
    assert set(np.unique(es[..., 1])) == {1, 3} and (es[2:4, 2:4, 1] == 1).all()
    # ... except a thin wall ring just outside the cavity (the LV wall is always thicker).
    es, _ = apply_label_policy(es_label, {1}, "lv", ring_px=(1, 1))
    assert (es[2:4, 2:4, 1] == 1).all() and es[1, 2, 1] == 2 and es[4, 3, 1] == 2
    assert es[1, 1, 1] == 3 and es[0, 2, 1] == 3 and (es[..., 0] == 3).all()
    # Full label set: the RV could be anywhere outside the LV, so background is unknown (ignore = 4).
    full, _ = apply_label_policy(label, {1, 2}, "full")
    assert full[5, 5, 1] == 4 and full[1, 1, 1] == 2
    # Fully annotated cases keep their labels; the LV-only set turns the RV into background.
    lv, ignored = apply_label_policy(label, None, "lv")
    assert not ignored and lv[0, 0, 1] == 0 and lv[2, 2, 1] == 1 and (lv[..., 0] == 0).all()


# ---------------------------------------------------------------- tiny end-to-end run

def _upload_phantom_dataset(tmp_path: Path, store) -> str:
    """Two synthetic phantom cases as raw Dataset902_Phantoms in the artifacts bucket; returns the run id
    (objects under training-<run>/)."""
    import uuid

    import nibabel as nib

    from tests.nnunet_fixtures import phantom

    raw = tmp_path / "raw" / "Dataset902_Phantoms"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    for i, phase in enumerate((0.0, 0.4)):
        img, lab = phantom((64, 64, 6), phase=phase, seed=i)
        nib.save(nib.Nifti1Image(img, affine), raw / "imagesTr" / f"phantom_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), raw / "labelsTr" / f"phantom_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "cineMRI"}, "labels": {"background": 0, "LV cavity": 1, "LV myocardium": 2, "RV": 3},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    run = uuid.uuid4().hex[:8]
    store.upload_folder(raw, store.bucket("artifacts"), f"training-{run}/Dataset902_Phantoms/")
    return run


def _s3_env(stack_info) -> dict:
    return dict(os.environ, nnUNet_def_n_proc="1", CMRVL_S3_ENDPOINT=stack_info.s3_endpoint,
                CMRVL_S3_ACCESS_KEY=stack_info.access_key, CMRVL_S3_SECRET_KEY=stack_info.secret_key)


@pytest.mark.timeout(420)
def test_tiny_end_to_end(tmp_path, stack_info, store):
    """Dataset from and model into the real S3 server, as the cluster Job runs it."""
    from services.segmentation.inference import load_segmenter
    from tests.nnunet_fixtures import phantom

    run = _upload_phantom_dataset(tmp_path, store)
    env = _s3_env(stack_info)
    args = ["train", "nnunet", "--raw", f"s3://{store.bucket('artifacts')}/training-{run}/Dataset902_Phantoms/",
            "--dataset-id", "902", "--configuration", "2d", "--fold", "all",
            "--work", str(tmp_path / "work"), "--profile", "reduced", "--epochs", "1", "--iterations", "3",
            "--device", "cpu"]
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    layout = tmp_path / "layout"
    repository = f"triton-{run}"
    first = _cmrvl(*args, "--export-to", f"s3://{store.bucket('models')}/{repository}", "--version", "3", env=env)
    store.download_prefix(store.bucket("models"), f"{repository}/", layout)  # what Triton loads
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = _summary(first.stdout)
    assert summary["resumed_from_epoch"] == 0 and summary["epochs"] == 1 and summary["trainer"] == "ReducedTrainer"
    assert np.isfinite(summary["final_train_loss"])
    results = Path(summary["results_folder"])
    assert results.name == "ReducedTrainer__nnUNetPlansReduced__2d"
    assert (results / "fold_all" / "checkpoint_final.pth").is_file()
    plans = json.loads((results / "plans.json").read_text())
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8

    version_dir = layout / "cmr_seg" / "3"
    evaluation = json.loads((version_dir / "evaluation.json").read_text())
    assert evaluation["on_training_data"] is True
    assert set(evaluation["dice_mean"]) == {"LV cavity", "LV myocardium", "RV"}
    assert set(evaluation["clinical_errors"]) >= {"lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g"}

    segmenter = load_segmenter(layout, backend="onnxruntime")
    try:
        assert segmenter.version == 3
        img, _ = phantom((64, 64, 6), phase=0.2, seed=5)
        labels = segmenter.segment_volume(img, affine)
    finally:
        segmenter.close()
    assert labels.shape == img.shape and set(np.unique(labels)) <= {0, 1, 2, 3}

    # Same command again: the final checkpoint is continued (nnU-Net --c), nothing is retrained.
    again = _cmrvl(*args, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert _summary(again.stdout)["resumed_from_epoch"] == 1


@pytest.mark.timeout(420)
def test_killed_training_resumes_on_a_new_work_folder_from_the_store(tmp_path, stack_info, store):
    """What a pod replacement does: the process dies (SIGKILL) mid-training and its work folder is gone;
    the same command on an empty work folder continues from the checkpoint uploaded to the store."""
    import shutil
    import time

    run = _upload_phantom_dataset(tmp_path, store)
    bucket, prefix = store.bucket("artifacts"), f"training-{run}/checkpoints"
    results_key = f"{prefix}/ReducedTrainer__nnUNetPlansReduced__2d"
    work = tmp_path / "work"
    args = ["train", "nnunet",
            "--raw", f"s3://{bucket}/training-{run}/Dataset902_Phantoms/", "--dataset-id", "902",
            "--configuration", "2d", "--fold", "all", "--work", str(work), "--profile", "reduced",
            "--iterations", "2", "--device", "cpu", "--no-evaluate", "--checkpoint-to", f"s3://{bucket}/{prefix}"]
    # The reduced trainer writes checkpoint_latest every 5 epochs; 50 epochs would take minutes.
    first = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--epochs", "50"], cwd=REPO, env=_s3_env(stack_info),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = f"{results_key}/fold_all/checkpoint_latest.pth"
    try:
        deadline = time.monotonic() + 240
        while not store.exists(bucket, latest) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert store.exists(bucket, latest), "no checkpoint reached the store during training"
    finally:
        first.kill()
        first.wait()
    assert first.returncode != 0  # killed, not finished
    assert store.exists(bucket, f"{results_key}/fold_all/checkpoint_best.pth")
    shutil.rmtree(work)

    second = _cmrvl(*args, "--epochs", "11", env=_s3_env(stack_info))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = _summary(second.stdout)
    # checkpoint_latest of epoch 5 (or 10 if the kill came late), from the store, not from scratch
    assert summary["resumed_from_epoch"] in (5, 10) and summary["checkpoints"]["resumed_from_store"] is True
    assert summary["epochs"] == 11 and summary["nnunet_validation"] is not None
    stored = {key[len(results_key) + 1:] for key in store.list_keys(bucket, results_key + "/")}
    assert {"plans.json", "fold_all/checkpoint_final.pth", "fold_all/validation/summary.json"} <= stored


def test_checkpoint_mirror_uploads_each_save_and_restores_only_a_matching_run(tmp_path, store):
    """CheckpointMirror against the real S3 server, without training: the trainer's save_checkpoint
    uploads the file it has just written, a restore brings back the run's files and this fold's only,
    and a stored run with other plans or labels is refused before anything is downloaded."""
    import types
    import uuid

    from training.nnunet.train import CheckpointMirror

    bucket, prefix = store.bucket("artifacts"), f"mirror-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "pod1" / "ReducedTrainer__nnUNetPlansReduced__2d"
    (results / "fold_0").mkdir(parents=True)
    plans = {"plans_name": "nnUNetPlansReduced", "configurations": {"2d": {"patch_size": [64, 64]}}}
    labels = {"background": 0, "LV cavity": 1, "LV myocardium": 2}
    (results / "plans.json").write_text(json.dumps({**plans, "continue_training": True}))
    (results / "dataset.json").write_text(json.dumps({"labels": labels, "staged_from": "/pod1/raw"}))

    def save_checkpoint(filename: str) -> None:  # stands in for nnUNetTrainer.save_checkpoint
        Path(filename).write_bytes(b"weights " + Path(filename).name.encode())

    trainer = types.SimpleNamespace(save_checkpoint=save_checkpoint, output_folder_base=str(results), local_rank=0)
    mirror = CheckpointMirror(f"s3://{bucket}/{prefix}/", store=store)
    mirror.attach(trainer)
    key = f"{prefix}/{results.name}/fold_0/checkpoint_latest.pth"
    assert not store.exists(bucket, key)
    trainer.save_checkpoint(str(results / "fold_0" / "checkpoint_latest.pth"))
    assert store.get_bytes(bucket, key) == b"weights checkpoint_latest.pth"  # in the store as soon as saved
    trainer.local_rank = 1  # under DDP only rank 0 writes checkpoints
    trainer.save_checkpoint(str(results / "fold_0" / "checkpoint_best.pth"))
    assert not store.exists(bucket, f"{prefix}/{results.name}/fold_0/checkpoint_best.pth")
    mirror.push_fold(results, 0)  # the end of a run: plans.json, dataset.json, the fold's folder
    store.put_bytes(bucket, f"{prefix}/{results.name}/fold_1/checkpoint_final.pth", b"another fold")

    pod2 = tmp_path / "pod2" / results.name
    resumed = CheckpointMirror(f"s3://{bucket}/{prefix}", store=store)
    resumed.restore(pod2, 0, plans=plans, labels=labels)
    restored = sorted(p.relative_to(pod2).as_posix() for p in pod2.rglob("*") if p.is_file())
    assert restored == ["dataset.json", "fold_0/checkpoint_best.pth", "fold_0/checkpoint_latest.pth", "plans.json"]
    assert (pod2 / "fold_0" / "checkpoint_latest.pth").read_bytes() == b"weights checkpoint_latest.pth"
    assert resumed.summary()["resumed_from_store"] is True and mirror.summary()["uploads"] == 5

    pod3 = tmp_path / "pod3" / results.name
    other_plans = {**plans, "configurations": {"2d": {"patch_size": [96, 96]}}}
    with pytest.raises(ValueError, match="other plans"):
        CheckpointMirror(f"s3://{bucket}/{prefix}", store=store).restore(pod3, 0, plans=other_plans, labels=labels)
    with pytest.raises(ValueError, match="other labels"):
        CheckpointMirror(f"s3://{bucket}/{prefix}", store=store).restore(pod3, 0, plans=plans,
                                                                         labels={**labels, "RV": 3})
    assert not pod3.exists()


# ---------------------------------------------------------------- the shipped default model

def test_default_model_card_and_evaluation():
    """The shipped default is the ACDC model, scored on ACDC patients it never saw, and its card
    says so; the floor below is the LV-only placeholder it replaced (0.35 / 0.22 / 0.00 on the same
    cases) raised well above it, so that a broken export or a wrong checkpoint cannot ship."""
    from services.segmentation.model_layout import latest_version, read_layout, resolve_model_dir

    model_dir = resolve_model_dir(DEFAULT_MODEL)
    version_dir = model_dir / str(latest_version(model_dir))
    card = (DEFAULT_MODEL / "MODEL_CARD.md").read_text()
    for needle in ("ACDC", "Held-out fifth", "Spacing assumption", "1.5625", "Sunnybrook", "cmrvl train nnunet",
                   "Not for clinical use", "issue target (floor)"):
        assert needle in card, needle
    evaluation = json.loads((version_dir / "evaluation.json").read_text())
    assert evaluation["on_training_data"] is False
    held_out = set(json.loads((version_dir / "dataset.json").read_text())["held_out"]["patients"])
    assert len(held_out) == 20 and {case.rsplit("_", 1)[0] for case in evaluation["cases"]} == held_out
    floor = {"LV cavity": 0.85, "LV myocardium": 0.75, "RV": 0.75}
    assert all(evaluation["dice_mean"][name] > value for name, value in floor.items()), evaluation["dice_mean"]
    assert f"| ED + ES | {evaluation['dice_mean']['LV cavity']:.3f} |" in card  # the card shows the file's numbers
    layout = read_layout(version_dir)
    assert sorted(layout["labels"]["nnunet_to_cmrvl"].values()) == [0, 1, 2, 3]  # LV cavity, myocardium, RV
    assert (version_dir / "model.onnx").stat().st_size < 16 * 2**20


@pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(), reason=f"sample data absent: {SUNNYBROOK}")
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the study's invalid UID
def test_default_model_segments_sunnybrook_ed():
    from services.segmentation.inference import load_segmenter
    from training.nnunet.evaluate import dice
    from training.nnunet.sunnybrook import find_cases, load_case

    (study_id, case_id, dicom_dir, contour_dir), = find_cases(SUNNYBROOK)
    case = load_case(dicom_dir, contour_dir, study_id, case_id)
    segmenter = load_segmenter(DEFAULT_MODEL, backend="onnxruntime")
    try:
        labels = segmenter.segment_volume(case.study.image[..., case.ed_phase], case.study.affine)
    finally:
        segmenter.close()
    drawn = case.contoured_slices["ed"]
    expert = case.labels["ed"]
    assert 3 in set(np.unique(labels)) <= {0, 1, 2, 3}  # the RV too (Sunnybrook draws no RV to score it)
    for z in drawn:
        assert (labels[..., z] == 1).any() and (labels[..., z] == 2).any(), f"slice {z}: no LV cavity/myocardium"
    # An unseen GE scanner (ACDC is Siemens): the model card reports 0.94 / 0.76 here.
    assert dice(labels[..., drawn] == 1, expert[..., drawn] == 1) > 0.85
    assert dice(labels[..., drawn] == 2, expert[..., drawn] == 2) > 0.65


CINEMA = REPO / ".." / "shared" / "data" / "cinema-samples"


@pytest.mark.skipif(not (CINEMA / "mnms" / "sax_ed.nii.gz").is_file(), reason=f"sample data absent: {CINEMA}")
def test_default_model_on_the_unlabelled_cinema_samples():
    """The card's unlabelled check (evaluate --unlabelled) on the real ACDC and M&Ms samples: every
    class found at ED and ES, volumes of a human heart, the measuring code's flags carried."""
    from services.segmentation.function import PLAUSIBLE_CAVITY_ML
    from training.nnunet.evaluate import evaluate_unlabelled

    result = evaluate_unlabelled(DEFAULT_MODEL, CINEMA)
    assert set(result) == {"acdc", "mnms"}
    for name, subject in result.items():
        assert subject["spacing_mm"] == [1.0, 1.0, 10.0] and subject["shape"][:2] == [192, 192], name
        for prefix in ("lv", "rv"):
            low, high = PLAUSIBLE_CAVITY_ML[prefix]
            assert low < subject[f"{prefix}_esv_ml"] < subject[f"{prefix}_edv_ml"] < high, (name, subject)
        assert 20 < subject["lv_mass_g"] < 400 and isinstance(subject["quality"], list)
        assert all(subject["slices_with"][phase][cls] for phase in ("ed", "es")
                   for cls in ("LV cavity", "LV myocardium", "RV")), name
