"""VLM supervised fine-tuning on Ray: a Ray Train TorchTrainer whose workers run LLaMA-Factory.

    python -m training.vlm.train --config /etc/cmrvl/training/vlm.yaml    (the chart's RayJob)

Why not LLaMA-Factory's own Ray launcher (`USE_RAY=1`): in 0.9.5 it reserves 10 CPUs per device
in its placement group (it never starts on small nodes) and 0.9.4's path hard-codes GPUs. Here
Ray Train owns the resources (`workers` x (1 GPU + `cpus_per_worker` CPUs), or CPUs only with
gloo), the storage (checkpoints on S3) and the restart policy, and every worker calls LLaMA-Factory's
public entry point `llamafactory.train.tuner.run_exp` - what LLaMA-Factory itself did up to 0.9.4.
Inside a Ray worker LLaMA-Factory leaves the process group to Ray.

Config (YAML; the chart's `training.vlm.config` keys first, the rest optional):

    base_model: s3://cmrvl-models/vlm/base/Qwen2.5-VL-7B-Instruct   # s3://bucket/prefix or a local folder
    dataset: s3://cmrvl-artifacts/training/vqa      # `cmrvl train vqa-dataset` output
    output: s3://cmrvl-models/vlm/cmr-vl/1           # final model = the InferenceService storageUri
    max_seq_len: 5120                                # -> cutoff_len
    epochs: 15                                       # -> num_train_epochs
    learning_rate: 1.0e-5
    checkpoints: s3://cmrvl-artifacts/training/vlm-runs   # Ray storage (default: <dataset>/../vlm-runs)
    run_name: cmr-vl-1            # default from `output`; the same name resumes the same run
    workers: 4
    use_gpu: true
    cpus_per_worker: 4
    max_failures: 3               # worker restarts, each from the latest checkpoint
    keep_checkpoints: 2
    evaluate: true                # generate on cmr_test_sharegpt, write evaluation.json/.txt beside the model
    llamafactory_config: training/vlm/configs/qwen2_5vl_sft_train.yaml
    llamafactory_overrides: {}    # any LLaMA-Factory key (e.g. max_steps, save_steps)

S3 credentials and endpoint come from the standard AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_ENDPOINT_URL / AWS_REGION environment (the chart's trainingEnv sets them to MinIO).

Fault tolerance: every HF checkpoint (save_strategy of the LLaMA-Factory config) is reported to
Ray Train and uploaded to `checkpoints/<run_name>/`. A failed worker restarts the worker group
from the latest one (`max_failures`); a new driver (head restart, RayJob resubmission) finds the
run in storage (`TorchTrainer.can_restore`) and restores it; the workers then pass the checkpoint
to LLaMA-Factory as `resume_from_checkpoint` (optimizer, scheduler, RNG and data position included).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

log = logging.getLogger("cmrvl.training.vlm")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_LLAMAFACTORY_CONFIG = REPO / "training" / "vlm" / "configs" / "qwen2_5vl_sft_train.yaml"
TEST_DATASET = "cmr_test_sharegpt"
EVAL_JSON, EVAL_TEXT = "evaluation.json", "evaluation.txt"
# What the final model folder holds (KServe's huggingface runtime / vLLM load it as is).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".py")


@dataclass
class JobConfig:
    base_model: str
    dataset: str
    output: str
    max_seq_len: int = 5120
    epochs: float = 15.0
    learning_rate: float = 1.0e-5
    checkpoints: str | None = None
    run_name: str | None = None
    workers: int = 4
    use_gpu: bool = True
    cpus_per_worker: float = 4.0
    max_failures: int = 3
    keep_checkpoints: int = 2
    evaluate: bool = True
    max_new_tokens: int = 256
    llamafactory_config: str = str(DEFAULT_LLAMAFACTORY_CONFIG)
    llamafactory_overrides: dict[str, Any] = field(default_factory=dict)
    work_dir: str | None = None  # node-local scratch; default $TMPDIR/cmrvl-vlm/<run_name>

    def __post_init__(self):
        if self.checkpoints is None:
            self.checkpoints = self.dataset.rstrip("/").rsplit("/", 1)[0] + "/vlm-runs"
        if self.run_name is None:
            parts = [p for p in urlparse(self.output).path.split("/") if p][-2:]
            self.run_name = "-".join(parts) or "cmr-vl"
        if self.work_dir is None:
            self.work_dir = str(Path(tempfile.gettempdir()) / "cmrvl-vlm" / self.run_name)

    @classmethod
    def from_file(cls, path: str | Path) -> JobConfig:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)


# --- storage: s3://bucket/prefix or a local folder, through pyarrow (what Ray Train uses) --------

def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for s3://... (AWS_* env, AWS_ENDPOINT_URL) or a path."""
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return pafs.LocalFileSystem(), str(Path(uri).resolve())
    endpoint = urlparse(os.environ.get("AWS_ENDPOINT_URL", ""))
    fs = pafs.S3FileSystem(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        region=os.environ.get("AWS_REGION", "us-east-1"),
        endpoint_override=endpoint.netloc or None,
        scheme=endpoint.scheme or "https",
        allow_bucket_creation=False,
    )
    return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")


def download(uri: str, dest: Path) -> Path:
    """Copy a folder (s3 or local) to `dest` once per node: a lock and a marker make concurrent
    workers of the same node wait for the first one's copy."""
    import pyarrow.fs as pafs

    dest.parent.mkdir(parents=True, exist_ok=True)
    marker = dest.with_name(dest.name + ".complete")
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists() or marker.read_text() != uri:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            fs, path = filesystem(uri)
            pafs.copy_files(path, str(dest), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
            marker.write_text(uri)
    return dest


def upload(src: Path, uri: str, files: list[Path] | None = None) -> None:
    """Copy `files` (default: every file under src) to the folder `uri`, keeping relative paths."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    local = pafs.LocalFileSystem()
    for f in files if files is not None else sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        target = f"{base}/{rel}"
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(f), target, source_filesystem=local, destination_filesystem=fs)


def model_files(folder: Path) -> list[Path]:
    """The final model's files (weights, configs, tokenizer, processor); no checkpoints or logs."""
    skip = {"trainer_state.json", "all_results.json", "train_results.json", "eval_results.json",
            "trainer_log.jsonl", "training_args.bin"}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and p.name not in skip)


# --- LLaMA-Factory arguments --------------------------------------------------------------------

def llamafactory_args(cfg: JobConfig, model_dir: Path, dataset_dir: Path, output_dir: Path) -> dict[str, Any]:
    """The LLaMA-Factory config file, with the job's paths and the chart's keys on top."""
    args = yaml.safe_load(Path(cfg.llamafactory_config).read_text())
    args.update(
        model_name_or_path=str(model_dir), dataset_dir=str(dataset_dir), output_dir=str(output_dir),
        cutoff_len=int(cfg.max_seq_len), num_train_epochs=float(cfg.epochs),
        learning_rate=float(cfg.learning_rate), overwrite_output_dir=False, report_to="none",
    )
    ds = args.get("deepspeed")
    if ds and not Path(ds).is_absolute():
        args["deepspeed"] = str(REPO / ds)
    args.update(cfg.llamafactory_overrides)
    if not cfg.use_gpu:  # CPU workers (tests, CI): gloo DDP, full precision, no DeepSpeed
        args.update(bf16=False, fp16=False, deepspeed=None)
    return {k: v for k, v in args.items() if v is not None}


def predict_args(train_args: dict[str, Any], model_dir: Path, output_dir: Path, max_new_tokens: int) -> dict[str, Any]:
    """Generation on the test split with the fine-tuned model (LLaMA-Factory's predict path:
    generated_predictions.jsonl + BLEU-4 / ROUGE-1/2/L in predict_results.json)."""
    args = {k: v for k, v in train_args.items()
            if k not in ("dataset", "eval_dataset", "resume_from_checkpoint", "max_steps", "save_steps")}
    args.update(
        model_name_or_path=str(model_dir), output_dir=str(output_dir), do_train=False, do_predict=True,
        predict_with_generate=True, eval_dataset=TEST_DATASET, eval_strategy="no", save_strategy="no",
        max_new_tokens=int(max_new_tokens), do_sample=False, plot_loss=False, overwrite_output_dir=True,
    )
    return args


# --- the worker ---------------------------------------------------------------------------------

def _checkpoint_step(folder: Path) -> int:
    return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])


def _report_callback():
    import ray.train
    import torch.distributed as dist
    from transformers import TrainerCallback

    class ReportCheckpoints(TrainerCallback):
        """Every HF checkpoint -> Ray Train (uploaded to the run's storage). All ranks write their
        part (ZeRO-3 shards, RNG states) before one worker per node reports the folder; Ray merges
        the folders reported by the nodes into one checkpoint."""

        def __init__(self):
            self.last_logs: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.last_logs = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}

        def on_save(self, args, state, control, **kwargs):
            if dist.is_initialized():
                dist.barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = {**self.last_logs, "step": state.global_step, "epoch": float(state.epoch or 0)}
            if ray.train.get_context().get_local_rank() == 0 and folder.is_dir():
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
            else:
                ray.train.report(metrics)

    return ReportCheckpoints()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist
    from llamafactory.train.tuner import run_exp

    os.environ.pop("USE_RAY", None)  # LLaMA-Factory must not start its own Ray launcher in here
    cfg = JobConfig(**config["job"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    work = Path(cfg.work_dir)
    model_dir = download(cfg.base_model, work / "base_model")
    dataset_dir = download(cfg.dataset, work / "dataset")
    output_dir = work / "output"
    args = llamafactory_args(cfg, model_dir, dataset_dir, output_dir)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = _checkpoint_step(Path(folder))
            resume = output_dir / f"checkpoint-{step}"
            with open(work / "resume.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (resume / "trainer_state.json").exists():
                    shutil.copytree(folder, resume, dirs_exist_ok=True)
        args["resume_from_checkpoint"] = str(resume)
        print(f"rank {rank} resumes from step {step}", flush=True)  # worker stdout reaches the driver log

    run_exp(args, callbacks=[_report_callback()])
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        upload(output_dir, cfg.output, model_files(output_dir))
        print(f"final model uploaded to {cfg.output}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    if not cfg.evaluate:
        return
    final_dir = download(cfg.output, work / "final_model")
    eval_dir = work / "eval"
    run_exp(predict_args(args, final_dir, eval_dir, cfg.max_new_tokens), callbacks=[])
    if rank == 0:
        report = evaluation_report(eval_dir / "generated_predictions.jsonl", eval_dir / "predict_results.json")
        (eval_dir / EVAL_JSON).write_text(json.dumps(report, indent=2))
        (eval_dir / EVAL_TEXT).write_text(format_report(report))
        upload(eval_dir, cfg.output, [eval_dir / EVAL_JSON, eval_dir / EVAL_TEXT])
    if dist.is_initialized():
        dist.barrier()


# --- evaluation report --------------------------------------------------------------------------

def task_of_prompt(prompt: str) -> str | None:
    from services.findings.catalog import load_catalog

    hits = [t.id for t in load_catalog().tasks if t.question in prompt]
    return hits[0] if len(hits) == 1 else None


def evaluation_report(predictions_jsonl: Path, predict_results: Path) -> dict[str, Any]:
    """LLaMA-Factory's generation metrics + per-task accuracy of the catalog's answer parser:
    presence (present/absent; an unparseable prediction counts as wrong) and grade (effusion
    size, worst wall-motion pattern) over the references that are present with a grade."""
    from services.findings.answers import parse_answer

    metrics = json.loads(predict_results.read_text()) if predict_results.exists() else {}
    per_task: dict[str, dict[str, Any]] = {}
    unknown = 0
    for line in predictions_jsonl.read_text().splitlines():
        row = json.loads(line)
        task_id = task_of_prompt(row["prompt"])
        if task_id is None:
            unknown += 1
            continue
        ref, pred = parse_answer(task_id, row["label"]), parse_answer(task_id, row["predict"])
        t = per_task.setdefault(task_id, {"n": 0, "presence_correct": 0, "unparseable_predictions": 0,
                                          "unparseable_references": 0, "graded": 0, "grade_correct": 0})
        t["n"] += 1
        t["presence_correct"] += int(pred.status == ref.status and ref.status != "unparseable")
        t["unparseable_predictions"] += int(pred.status == "unparseable")
        t["unparseable_references"] += int(ref.status == "unparseable")
        if ref.status == "present" and ref.grade:
            t["graded"] += 1
            t["grade_correct"] += int(pred.grade == ref.grade)
    for t in per_task.values():
        t["presence_accuracy"] = t["presence_correct"] / t["n"]
        t["grade_accuracy"] = t["grade_correct"] / t["graded"] if t["graded"] else None
    return {
        "dataset": TEST_DATASET,
        "n_samples": sum(t["n"] for t in per_task.values()) + unknown,
        "samples_without_task": unknown,
        "generation": {k.removeprefix("predict_"): v for k, v in metrics.items()
                       if k.startswith("predict_") and k.split("_", 1)[1] in ("bleu-4", "rouge-1", "rouge-2", "rouge-l")},
        "per_task": per_task,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Evaluation on {report['dataset']}: {report['n_samples']} samples", ""]
    for k, v in report["generation"].items():
        lines.append(f"{k:>8}: {v:.2f}")
    lines.append("")
    lines.append(f"{'task':24} {'n':>4} {'presence':>9} {'grade':>7} {'unparseable':>12}")
    for task_id, t in report["per_task"].items():
        grade = "-" if t["grade_accuracy"] is None else f"{t['grade_accuracy']:.3f}"
        lines.append(f"{task_id:24} {t['n']:>4} {t['presence_accuracy']:>9.3f} {grade:>7} {t['unparseable_predictions']:>12}")
    return "\n".join(lines) + "\n"


# --- the driver ---------------------------------------------------------------------------------

def build_trainer(cfg: JobConfig):
    """A new TorchTrainer, or the stored run of the same name restored (head restart)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, storage = filesystem(cfg.checkpoints)
    loop_config = {"job": asdict(cfg)}
    run_path = f"{storage}/{cfg.run_name}"
    if TorchTrainer.can_restore(run_path, storage_filesystem=fs):
        log.info("restoring run %s from %s", cfg.run_name, cfg.checkpoints)
        return TorchTrainer.restore(run_path, storage_filesystem=fs, train_loop_per_worker=train_loop_per_worker,
                                    train_loop_config=loop_config)
    resources = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        resources["GPU"] = 1.0
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # The trainer actor only coordinates: no CPU of its own, so N workers fit N worker slots.
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     trainer_resources={"CPU": 0}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )


def run(cfg: JobConfig):
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))  # the RayJob's cluster, or a local one
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.vlm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job YAML (the chart's training.vlm.config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CMRVL_LOG_LEVEL", "INFO").upper())
    cfg = JobConfig.from_file(args.config)
    result = run(cfg)
    print(json.dumps({"run": cfg.run_name, "output": cfg.output, "metrics": result.metrics,
                      "checkpoint": result.checkpoint.path if result.checkpoint else None}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
