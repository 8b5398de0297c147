"""Integration tier: a real distributed SFT run of training/vlm/train.py.

4 Ray Train workers on CPU (gloo DDP) run LLaMA-Factory on the tiny Qwen2.5-VL and a VQA dataset
built from synthetic annotated studies; base model, dataset, Ray checkpoints and the final model
all live on the real S3 server of the local stack (SeaweedFS, the MinIO stand-in). The run stops
is killed with its driver once a checkpoint past step 2 is on S3 (a head failure); a second driver
restores the run from S3 and continues from the stored checkpoint to the last step, then generates on the test split and writes the
evaluation report. The exported model then loads in the findings service's embedded backend and
answers a catalog question on the dataset's own inputs.

Needs the training venv (infra/tools/install-train.sh, creates .venvs/train). About 5 minutes on
2 cores.

    .venv/bin/python -m pytest -q -m integration tests/integration/test_vlm_training.py -s
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from services.findings.catalog import build_openai_content, get_task
from services.runtime.settings import Settings
from services.runtime.storage import ObjectStore
from tests.test_vqa_dataset import ANSWERS, TRAIN_PYTHON, annotate, make_study
from tests.vlm_fixtures import tiny_qwen25_vl
from training.vlm.dataset import build_dataset

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 16

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(not TRAIN_PYTHON.exists() and os.environ.get("CI", "").lower() != "true",
                       reason="training venv not installed: run infra/tools/install-train.sh"),
]


def _run_job(config: dict, folder: Path, name: str, env: dict) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = folder / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([str(TRAIN_PYTHON), "-m", "training.vlm.train", "--config", str(path)],
                              stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=700, check=False)
    text = log.read_text()
    print(f"\n{name}: {time.monotonic() - start:.0f} s")
    assert proc.returncode == 0, text[-6000:]
    return text


def _checkpoint_steps(store: ObjectStore, bucket: str, prefix: str) -> list[int]:
    steps = []
    for key in store.list_keys(bucket, prefix):
        if key.endswith("/trainer_state.json") and "/checkpoint_" in key:
            steps.append(store.get_json(bucket, key)["global_step"])
    return sorted(steps)


def test_ray_sft_on_s3_resumes_evaluates_and_serves(stack_info, tmp_path):
    if not TRAIN_PYTHON.exists():
        pytest.fail(f"training venv missing in CI: {TRAIN_PYTHON} (infra/tools/install-train.sh)")
    store = ObjectStore(Settings(s3_endpoint=stack_info.s3_endpoint, s3_access_key=stack_info.access_key,
                                 s3_secret_key=stack_info.secret_key))
    artifacts, models = store.bucket("artifacts"), store.bucket("models")

    # Dataset from three annotated patients, uploaded with the base model.
    sources = []
    for i, patient in enumerate(["P1", "P2", "P3"]):
        study = make_study(tmp_path / "studies" / patient, seed=10 + i)
        annotate(study, patient, ANSWERS)
        sources.append(study)
    dataset = tmp_path / "dataset"
    build_dataset(sources, dataset, seed=1, val_fraction=0.34, test_fraction=0.34)
    store.upload_folder(dataset, artifacts, "training/vqa/")
    store.upload_folder(tiny_qwen25_vl(), models, "vlm/base/tiny-qwen2_5-vl/")

    env = {**os.environ, "AWS_ACCESS_KEY_ID": stack_info.access_key, "AWS_SECRET_ACCESS_KEY": stack_info.secret_key,
           "AWS_ENDPOINT_URL": f"http://{stack_info.s3_endpoint}", "AWS_REGION": "us-east-1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(tmp_path / "hf"), "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    env.pop("RAY_ADDRESS", None)
    config = {
        "base_model": f"s3://{models}/vlm/base/tiny-qwen2_5-vl",
        "dataset": f"s3://{artifacts}/training/vqa",
        "output": f"s3://{models}/vlm/cmr-vl/1",
        "max_seq_len": 5120, "epochs": 1, "learning_rate": 1.0e-4,
        "workers": 4, "use_gpu": False, "cpus_per_worker": 0.5, "max_failures": 0, "evaluate": True,
        "max_new_tokens": 24, "work_dir": str(tmp_path / "work"),
        "llamafactory_overrides": {"max_steps": MAX_STEPS, "save_strategy": "steps", "save_steps": 1, "eval_strategy": "no",
                                   "logging_steps": 1, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
                                   "gradient_accumulation_steps": 1, "plot_loss": False},
    }

    # Run 1, then a head failure: the driver (and the local Ray cluster it started) is killed
    # once a checkpoint past step 2 is on S3.
    log1 = tmp_path / "run1.log"
    (tmp_path / "run1.yaml").write_text(yaml.safe_dump(config))
    runs = "training/vlm-runs/cmr-vl-1/"
    with open(log1, "w") as out:
        proc = subprocess.Popen([str(TRAIN_PYTHON), "-m", "training.vlm.train", "--config", str(tmp_path / "run1.yaml")],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + 600
        while not any(s >= 2 for s in _checkpoint_steps(store, artifacts, runs)):
            assert proc.poll() is None, log1.read_text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint reached S3"
            time.sleep(1.0)
        time.sleep(5.0)  # let the driver record the checkpoint in its experiment state on S3
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stored = _checkpoint_steps(store, artifacts, runs)
    assert stored and stored[-1] < MAX_STEPS, "the run finished before the simulated head failure"
    assert not any(k.endswith("model.safetensors") for k in store.list_keys(models, "vlm/cmr-vl/1/"))

    # Run 2: a new driver finds the run on S3, restores it and continues from its last checkpoint.
    second = _run_job(config, tmp_path, "run2", env)
    assert "restoring run cmr-vl-1" in second
    resumed = sorted({int(m) for m in re.findall(r"resumes from step (\d+)", second)})
    assert len(resumed) == 1 and 1 <= resumed[0] < MAX_STEPS, resumed
    steps = _checkpoint_steps(store, artifacts, runs)
    assert steps[-1] == MAX_STEPS
    assert any(k.endswith("model.safetensors") for k in store.list_keys(models, "vlm/cmr-vl/1/"))

    # Evaluation report next to the model: LLaMA-Factory's generation metrics + per-task accuracy.
    report = store.get_json(models, "vlm/cmr-vl/1/evaluation.json")
    assert set(report["generation"]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    assert report["n_samples"] == 5 and report["samples_without_task"] == 0
    assert set(report["per_task"]) == set(ANSWERS)
    assert all(0.0 <= t["presence_accuracy"] <= 1.0 for t in report["per_task"].values())
    text = store.get_bytes(models, "vlm/cmr-vl/1/evaluation.txt").decode()
    assert "bleu-4" in text and "pericardial_effusion" in text

    # The exported model (the InferenceService's storageUri layout) loads in the embedded backend
    # and answers a catalog question on the dataset's own inputs.
    from services.findings.embedded import EmbeddedBackend

    model_dir = tmp_path / "served"
    for key in store.list_keys(models, "vlm/cmr-vl/1/"):
        store.get_file(models, key, model_dir / key[len("vlm/cmr-vl/1/"):])
    backend = EmbeddedBackend(model_dir, model_name="cmr-vl", version="1", max_new_tokens=24)
    sample = next(s for s in json.loads((dataset / "cmr_test.json").read_text()) if s["images"])
    task = next(t for t in ("pericardial_effusion", "lge", "myocardial_edema", "lv_thrombus")
                if sample["messages"][0]["content"].endswith(get_task(t).question))
    urls = [f"file://{dataset / p}" for p in sample["images"]]
    answer = backend.generate([{"role": "user", "content": build_openai_content(task, urls)}])
    assert isinstance(answer, str) and answer.strip()
