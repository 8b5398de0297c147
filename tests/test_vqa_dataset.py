"""VQA dataset builder (training/vlm/dataset.py) on synthetic annotated studies.

Studies are real DICOM series (tests/dicom_factory.py) run through `preprocess_study`, with a ring
phantom label map drawn in the cine grid and an annotations.json. The builder must produce the
LLaMA-Factory sharegpt layout, patient-disjoint deterministic splits, media byte-identical to what
the findings service builds, and refuse bad annotations with every problem listed and nothing
written. The LLaMA-Factory loader check runs in the training venv (.venvs/train, see
infra/tools/install-train.sh) through a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.findings.catalog import build_user_message, load_catalog
from services.preprocess.study import preprocess_study
from tests import dicom_factory as factory
from training.vlm import dataset as ds

REPO = Path(__file__).resolve().parents[1]
TRAIN_PYTHON = Path(os.environ.get("CMRVL_TRAIN_VENV", REPO / ".venvs" / "train")) / "bin" / "python"
TASK_IDS = load_catalog().ids()

ANSWERS = {
    "pericardial_effusion": "There is a small amount of pericardial effusion.",
    "wall_motion": "The wall motion of the ventricles is coordinated.",
    "lge": "Patchy late gadolinium enhancement is seen in the basal inferior wall.",
    "myocardial_edema": "No myocardial edema is present.",
    "lv_thrombus": "There is no thrombus in the left ventricle.",
}


def ring_labels(shape_xyz, n_phases):
    """LV cavity disc, myocardium ring, RV crescent; the LV shrinks towards the last slice and in
    systole (so ED is phase 0)."""
    nx, ny, nz = shape_xyz
    xx, yy = np.meshgrid(np.arange(nx) - nx / 2 + 0.5, np.arange(ny) - ny / 2 + 0.5, indexing="ij")
    r = np.hypot(xx, yy)
    lab = np.zeros((nx, ny, nz, n_phases), np.uint8)
    for t in range(n_phases):
        squeeze = 1.0 - 0.3 * np.sin(np.pi * t / n_phases) ** 2
        for k in range(nz):
            r_lv = nx * 0.16 * squeeze * (1.0 - 0.4 * k / max(nz - 1, 1))
            sl = np.zeros((nx, ny), np.uint8)
            sl[np.hypot(xx + r_lv + 4, yy) <= r_lv * 1.1] = 3
            sl[r <= r_lv + 3] = 2
            sl[r <= r_lv] = 1
            lab[..., k, t] = sl
    return lab


def make_study(root: Path, *, seed: int, lge_t2: bool = True) -> Path:
    """A preprocessed study folder with labels.nii.gz (no annotations yet)."""
    dicom = root / "dicom"
    spec = factory.write_cine_study(dicom, n_slices=6, n_phases=8, rows=48, cols=48, seed=seed)
    if lge_t2:
        factory.write_lge_stack(dicom, study_uid=spec.study_instance_uid, n_slices=6, rows=48, cols=48, seed=seed)
        factory.write_t2_stack(dicom, study_uid=spec.study_instance_uid, n_slices=6, rows=48, cols=48, seed=seed)
    study = root / "study"
    manifest = preprocess_study(dicom, study)
    shutil.rmtree(dicom)
    cine = next(s for s in manifest["series"] if s["kind"] == "cine_sax")
    img = nib.load(study / cine["volume"])
    nib.save(nib.Nifti1Image(ring_labels(img.shape[:3], img.shape[3]), img.affine), study / ds.LABELS_NAME)
    return study


def annotate(study: Path, patient_id: str, answers: dict, **extra) -> None:
    (study / ds.ANNOTATIONS_NAME).write_text(json.dumps({"patient_id": patient_id, "answers": answers, **extra}))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Four studies of three patients: P1 has a full study and a cine-only second visit (its LGE,
    edema and thrombus answers are null); P2 and P3 full studies, P3's given through a JSON index."""
    root = tmp_path_factory.mktemp("vqa-studies")
    folders = root / "folders"
    a = make_study(folders / "a", seed=1)
    annotate(a, "P1", ANSWERS)
    b = make_study(folders / "b", seed=2, lge_t2=False)
    annotate(b, "P1", {**ANSWERS, "lge": None, "myocardial_edema": None, "lv_thrombus": None},
             study_id="P1-visit2")
    c = make_study(folders / "c", seed=3)
    annotate(c, "P2", {**ANSWERS, "pericardial_effusion": "No pericardial effusion is present."})
    d = make_study(root / "indexed" / "d", seed=4)
    (root / "index.json").write_text(json.dumps({"studies": [
        {"study_dir": "indexed/d/study", "patient_id": "P3", "answers": ANSWERS},
    ]}))
    return {"root": root, "folders": folders, "index": root / "index.json", "a": a, "b": b, "c": c, "d": d}


# The studies sit in folders/<name>/study/: give the builder folders/<name>/study for each.
def _sources(studies):
    return [studies["a"], studies["b"], studies["c"], studies["index"]]


@pytest.fixture(scope="module")
def built(studies, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa-out") / "cmr_vqa"
    summary = ds.build_dataset(_sources(studies), out, seed=7, val_fraction=0.34, test_fraction=0.34)
    return out, summary


def _load(out: Path, split: str) -> list[dict]:
    return json.loads((out / ds.split_file(split)).read_text())


def _task_of(sample: dict) -> str:
    user = sample["messages"][0]["content"]
    return next(t.id for t in load_catalog().tasks if user.endswith(t.question))


def test_split_patients_is_deterministic_disjoint_and_order_free():
    patients = [f"P{i:03d}" for i in range(40)]
    a = ds.split_patients(patients, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert a == ds.split_patients(list(reversed(patients)) + patients[:5], seed=3, val_fraction=0.1, test_fraction=0.2)
    assert a != ds.split_patients(patients, seed=4, val_fraction=0.1, test_fraction=0.2)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (28, 4, 8)
    assert sorted(a["train"] + a["val"] + a["test"]) == patients
    # Few patients: val and test still get one each, train keeps at least one.
    small = ds.split_patients(["x", "y", "z"], seed=0, val_fraction=0.1, test_fraction=0.1)
    assert sorted(len(v) for v in small.values()) == [1, 1, 1]
    with pytest.raises(ValueError):
        ds.split_patients(patients, seed=0, val_fraction=0.5, test_fraction=0.5)


def test_output_is_sharegpt_layout(built):
    out, _ = built
    info = json.loads((out / "dataset_info.json").read_text())
    assert set(info) == {"cmr_train_sharegpt", "cmr_val_sharegpt", "cmr_test_sharegpt"}
    for split in ds.SPLITS:
        entry = info[f"cmr_{split}_sharegpt"]
        assert entry["file_name"] == f"cmr_{split}.json"
        assert entry["formatting"] == "sharegpt"
        assert entry["columns"] == {"messages": "messages", "images": "images", "videos": "videos"}
        assert entry["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}
    n_video = 0
    for split in ds.SPLITS:
        for sample in _load(out, split):
            assert set(sample) == {"messages", "images", "videos"}
            user, assistant = sample["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            task = load_catalog().get(_task_of(sample))
            assert user["content"] == build_user_message(task)
            assert user["content"].count("<image>") == len(sample["images"])
            assert user["content"].count("<video>") == len(sample["videos"])
            n_video += len(sample["videos"])
            for rel in sample["images"] + sample["videos"]:
                assert not Path(rel).is_absolute() and (out / rel).is_file()
            assert assistant["content"].strip() and assistant["content"] in (
                *ANSWERS.values(), "No pericardial effusion is present.")
    assert n_video == 4  # one wall-motion video per study
    assert not list(out.parent.glob(".cmr_vqa.*"))  # no temporary folder left behind


def test_splits_are_by_patient_and_counted(built):
    out, summary = built
    patients_of: dict[str, set[str]] = {}
    for split in ds.SPLITS:
        for sample in _load(out, split):
            media = (sample["images"] + sample["videos"])[0]
            patients_of.setdefault(media.split("/")[1], set()).add(split)
    assert set(patients_of) == {"P1", "P2", "P3"}
    assert all(len(splits) == 1 for splits in patients_of.values()), patients_of
    listed = {p: s for s in ds.SPLITS for p in summary["splits"][s]["patients"]}
    assert {p: {s} for p, s in listed.items()} == patients_of
    assert summary["splits"] == json.loads((out / "summary.json").read_text())["splits"]
    for split in ds.SPLITS:
        samples = _load(out, split)
        counted = summary["splits"][split]["samples_per_task"]
        assert counted == {t: sum(_task_of(s) == t for s in samples) for t in TASK_IDS}
        assert summary["splits"][split]["n_samples"] == len(samples)
    # P1's second visit: 2 answered tasks, 3 left out with null.
    p1 = summary["splits"][listed["P1"]]
    assert p1["n_studies"] == 2 and p1["samples_per_task"]["wall_motion"] == 2 and p1["samples_per_task"]["lge"] == 1
    assert summary["not_annotated_per_task"] == {**{t: 0 for t in TASK_IDS}, "lge": 1,
                                                 "myocardial_edema": 1, "lv_thrombus": 1}
    assert summary["catalog_fingerprint"] == load_catalog().fingerprint


def test_media_are_the_findings_service_inputs(built, studies, tmp_path):
    """The dataset's media for a study are byte-identical to what the findings service builds."""
    from services.findings.visual_inputs import build_visual_input, write_inputs

    out, _ = built
    study = studies["c"]
    cine = nib.load(study / next(s["volume"] for s in json.loads((study / "manifest.json").read_text())["series"]
                                 if s["kind"] == "cine_sax"))
    labels = nib.load(study / ds.LABELS_NAME)
    rel = write_inputs(tmp_path, build_visual_input("pericardial_effusion", cine=cine, cine_labels=labels))
    sample = next(s for split in ds.SPLITS for s in _load(out, split)
                  if _task_of(s) == "pericardial_effusion" and s["images"][0].split("/")[1] == "P2")
    assert [p.split("/", 3)[3] for p in sample["images"]] == rel
    for ours, theirs in zip(sample["images"], rel):
        assert (out / ours).read_bytes() == (tmp_path / theirs).read_bytes()


def test_bad_annotations_list_every_problem_and_write_nothing(studies, tmp_path):
    bad = tmp_path / "bad"
    # 1: two answers missing + an unknown task; 2: no patient id and no labels file.
    s1 = bad / "s1"
    shutil.copytree(studies["c"], s1, ignore=shutil.ignore_patterns(ds.ANNOTATIONS_NAME))
    annotate(s1, "P9", {**{k: v for k, v in ANSWERS.items() if k not in ("lge", "lv_thrombus")}, "ecg": "x"})
    s2 = bad / "s2"
    shutil.copytree(studies["c"], s2, ignore=shutil.ignore_patterns(ds.ANNOTATIONS_NAME, ds.LABELS_NAME))
    (s2 / ds.ANNOTATIONS_NAME).write_text(json.dumps({"answers": ANSWERS}))
    index = tmp_path / "index.json"
    index.write_text(json.dumps([{"study_dir": "nowhere", "patient_id": "P8", "answers": ANSWERS}]))
    out = tmp_path / "out"
    with pytest.raises(ds.DatasetError) as err:
        ds.build_dataset([bad, index], out)
    text = str(err.value)
    assert "s1" in text and "'lge'" in text and "'lv_thrombus'" in text and "ecg" in text
    assert "s2" in text and "patient_id" in text and "labels" in text
    assert "index.json[0]" in text and "nowhere" in text
    assert len(err.value.problems) == 5, err.value.problems
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_inputs_the_study_cannot_give_fail_after_building_and_keep_the_old_dataset(studies, tmp_path):
    """A failure found while building (an LGE answer for a study without LGE, a volume missing
    from disk) leaves an existing dataset untouched, even with overwrite."""
    b = tmp_path / "b"
    shutil.copytree(studies["b"], b)
    annotate(b, "P1", {**ANSWERS, "myocardial_edema": None, "lv_thrombus": None})  # lge answered
    c = tmp_path / "c"
    shutil.copytree(studies["c"], c)
    manifest = json.loads((c / "manifest.json").read_text())
    lge = next(s for s in manifest["series"] if s["kind"] == "lge_sax")
    (c / lge["volume"]).unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "cmr_train.json").write_text("[]")
    with pytest.raises(ds.DatasetError) as err:
        ds.build_dataset([b, c], out, overwrite=True)
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert any("'lge' is answered but the study has no input" in p for p in problems)
    assert any("lge volume" in p and "does not exist" in p for p in problems)
    assert sorted(p.name for p in out.iterdir()) == ["cmr_train.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(FileExistsError):
        ds.build_dataset([b], out)


def test_check_samples_and_validate_dataset_catch_tag_mismatch(built, tmp_path):
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert ds.validate_dataset(copy) == {s: len(_load(out, s)) for s in ds.SPLITS}
    train = _load(copy, "train")
    image_sample = next(i for i, s in enumerate(train) if s["images"])
    train[image_sample]["images"] = train[image_sample]["images"][:-1]
    video_sample = next(i for i, s in enumerate(train) if s["videos"])
    train[video_sample]["videos"] = ["media/none.mp4"]
    (copy / "cmr_train.json").write_text(json.dumps(train))
    with pytest.raises(ds.DatasetError) as err:
        ds.validate_dataset(copy)
    assert err.value.problems == [
        (f"cmr_train.json[{image_sample}]: {len(train[image_sample]['images']) + 1} <image> placeholder(s) "
         f"but {len(train[image_sample]['images'])} images"),
        f"cmr_train.json[{video_sample}]: videos missing on disk: ['media/none.mp4']",
    ]


def test_cli_reports_problems(studies, tmp_path, capsys):
    from services.cli import main

    rc = main(["train", "vqa-dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


LOADER_SCRIPT = r"""
import json, sys
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

model, dataset_dir, out = sys.argv[1:4]
result = {}
for split in ("train", "val", "test"):
    args = dict(model_name_or_path=model, stage="sft", do_train=True, finetuning_type="full",
                dataset_dir=dataset_dir, dataset=f"cmr_{split}_sharegpt", template="qwen2_vl",
                cutoff_len=100000, image_max_pixels=147456, video_max_pixels=65536, video_fps=4,
                output_dir=out, overwrite_output_dir=True, report_to="none", preprocessing_num_workers=1,
                per_device_train_batch_size=1)
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tok = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tok["tokenizer"], data_args)
    data = get_dataset(template, model_args, data_args, training_args, stage="sft", **tok)["train_dataset"]
    t = tok["tokenizer"]
    ids = {n: t.convert_tokens_to_ids(n) for n in ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>")}
    rows = []
    for row in data:
        inp = row["input_ids"]
        answer = t.decode([i for i, l in zip(inp, row["labels"]) if l != -100], skip_special_tokens=True)
        rows.append({"vision_blocks": inp.count(ids["<|vision_start|>"]), "image_pad": inp.count(ids["<|image_pad|>"]),
                     "video_pad": inp.count(ids["<|video_pad|>"]), "answer": answer.strip(),
                     "n_images": len(row["images"] or []), "n_videos": len(row["videos"] or [])})
    result[split] = rows
print("RESULT" + json.dumps(result))
"""


def test_llamafactory_loads_the_dataset(built, tmp_path):
    """LLaMA-Factory's own loader (qwen2_vl template, tiny Qwen2.5-VL processor) reads every split:
    one vision block per <image>/<video>, vision tokens expanded, the answer is the supervised part."""
    if not TRAIN_PYTHON.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"training venv missing in CI: {TRAIN_PYTHON} (infra/tools/install-train.sh)")
        pytest.skip(f"training venv not installed: {TRAIN_PYTHON} (run infra/tools/install-train.sh)")
    from tests.vlm_fixtures import tiny_qwen25_vl

    out, _ = built
    model = tiny_qwen25_vl()
    script = tmp_path / "load.py"
    script.write_text(LOADER_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(TRAIN_PYTHON), str(script), str(model), str(out), str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    for split in ds.SPLITS:
        samples = _load(out, split)
        rows = result[split]
        assert len(rows) == len(samples) > 0
        for sample, row in zip(samples, rows):
            n_media = len(sample["images"]) + len(sample["videos"])
            assert row["vision_blocks"] == n_media
            assert (row["n_images"], row["n_videos"]) == (len(sample["images"]), len(sample["videos"]))
            # Every image expands to its patch tokens (224 px / 14 / merge 2 = 8 x 8 = 64 each).
            assert row["image_pad"] == 64 * len(sample["images"])
            assert (row["video_pad"] > 0) == bool(sample["videos"])
            assert row["answer"] == sample["messages"][1]["content"]


CONFIG_SCRIPT = r"""
import json, sys
import yaml
from transformers import HfArgumentParser
from llamafactory.hparams import get_infer_args, get_train_args
from llamafactory.hparams.parser import _TRAIN_ARGS

model, dataset_dir, out = sys.argv[1:4]
train = yaml.safe_load(open("training/vlm/configs/qwen2_5vl_sft_train.yaml"))
infer = yaml.safe_load(open("training/vlm/configs/qwen2_5vl_infer.yaml"))
result = {"infer_model": infer["model_name_or_path"], "train_output": train["output_dir"]}
# Key-level check of the file as shipped (DeepSpeed config included); bf16 off on this CPU machine.
HfArgumentParser(_TRAIN_ARGS).parse_dict({**train, "bf16": False}, allow_extra_keys=False)
result["rejected"] = []
for old in ({"image_resolution": 384}, {"video_resolution": 256}, {"train_mm_proj_only": False}):
    try:
        HfArgumentParser(_TRAIN_ARGS).parse_dict({**train, "bf16": False, **old}, allow_extra_keys=False)
    except ValueError:
        result["rejected"].append(next(iter(old)))
# LLaMA-Factory's full check with the real paths (no DeepSpeed: it wants a distributed launch).
m, d, t, f, _ = get_train_args({**train, "model_name_or_path": model, "dataset_dir": dataset_dir,
                                "output_dir": out, "bf16": False, "deepspeed": None})
result["train"] = dict(template=d.template, cutoff_len=d.cutoff_len, image_max_pixels=m.image_max_pixels,
                       video_max_pixels=m.video_max_pixels, video_fps=m.video_fps, finetuning_type=f.finetuning_type,
                       freeze_vision_tower=f.freeze_vision_tower, freeze_multi_modal_projector=f.freeze_multi_modal_projector,
                       freeze_language_model=f.freeze_language_model, learning_rate=t.learning_rate,
                       epochs=t.num_train_epochs, scheduler=str(t.lr_scheduler_type), warmup=t.warmup_steps,
                       batch=t.per_device_train_batch_size, grad_accum=t.gradient_accumulation_steps,
                       dataset=d.dataset, eval_dataset=d.eval_dataset)
ds = json.load(open(train["deepspeed"]))
result["zero_stage"] = ds["zero_optimization"]["stage"]
m, d, f, g = get_infer_args({**infer, "model_name_or_path": model})
result["infer"] = dict(template=d.template, image_max_pixels=m.image_max_pixels,
                       video_max_pixels=m.video_max_pixels, video_fps=m.video_fps)
print("RESULT" + json.dumps(result))
"""


def test_llamafactory_accepts_the_configs(built, tmp_path):
    """The shipped SFT / inference configs parse with the installed LLaMA-Factory, carry the CMR-VL
    recipe, and the keys of the original release are indeed rejected by it."""
    if not TRAIN_PYTHON.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"training venv missing in CI: {TRAIN_PYTHON} (infra/tools/install-train.sh)")
        pytest.skip(f"training venv not installed: {TRAIN_PYTHON} (run infra/tools/install-train.sh)")
    from tests.vlm_fixtures import tiny_qwen25_vl

    out, _ = built
    script = tmp_path / "configs.py"
    script.write_text(CONFIG_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([str(TRAIN_PYTHON), str(script), str(tiny_qwen25_vl()), str(out), str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert r["rejected"] == ["image_resolution", "video_resolution", "train_mm_proj_only"]
    assert r["train"] == dict(
        template="qwen2_vl", cutoff_len=5120, image_max_pixels=384 * 384, video_max_pixels=256 * 256, video_fps=4.0,
        finetuning_type="full", freeze_vision_tower=True, freeze_multi_modal_projector=True,
        freeze_language_model=False, learning_rate=1e-5, epochs=15.0, scheduler="SchedulerType.COSINE",
        warmup=0.1, batch=1, grad_accum=2, dataset=["cmr_train_sharegpt"], eval_dataset=["cmr_val_sharegpt"])
    assert r["zero_stage"] == 3
    assert r["infer_model"] == r["train_output"]  # inference points at the fine-tuned output
    assert r["infer"] == dict(template="qwen2_vl", image_max_pixels=147456, video_max_pixels=65536, video_fps=4.0)


# --- the Ray job's config and report (training/vlm/train.py; no Ray or LLaMA-Factory needed) ------

def test_chart_config_drives_the_job_and_llamafactory_args(tmp_path):
    """The chart's training.vlm.config (what the RayJob mounts as --config) is a valid job config,
    and its keys land on the LLaMA-Factory arguments of the shipped SFT config."""
    import yaml

    from training.vlm.train import JobConfig, llamafactory_args

    values = yaml.safe_load((REPO / "charts" / "cmrvl" / "values.yaml").read_text())
    chart = values["training"]["vlm"]["config"]
    path = tmp_path / "vlm.yaml"
    path.write_text(yaml.safe_dump(chart))
    cfg = JobConfig.from_file(path)
    assert cfg.workers == values["training"]["vlm"]["workers"]
    assert cfg.run_name == "cmr-vl-1" and cfg.checkpoints == "s3://cmrvl-artifacts/training/vlm-runs"
    args = llamafactory_args(cfg, Path("/m"), Path("/d"), Path("/o"))
    assert (args["model_name_or_path"], args["dataset_dir"], args["output_dir"]) == ("/m", "/d", "/o")
    assert args["cutoff_len"] == chart["max_seq_len"] and args["num_train_epochs"] == chart["epochs"]
    assert args["learning_rate"] == chart["learning_rate"]
    assert Path(args["deepspeed"]).is_file() and args["bf16"] is True and args["template"] == "qwen2_vl"
    cpu = llamafactory_args(JobConfig(**{**chart, "use_gpu": False}), Path("/m"), Path("/d"), Path("/o"))
    assert "deepspeed" not in cpu and cpu["bf16"] is False
    path.write_text(yaml.safe_dump({**chart, "epoch": 3}))
    with pytest.raises(ValueError, match="epoch"):
        JobConfig.from_file(path)


def test_evaluation_report_scores_tasks_with_the_catalog_parser(tmp_path):
    from training.vlm.train import evaluation_report, format_report

    effusion, lge = load_catalog().get("pericardial_effusion"), load_catalog().get("lge")
    rows = [  # prompts as LLaMA-Factory decodes them: template around the user turn
        (effusion, "There is a large pericardial effusion.", "There is a large pericardial effusion."),
        (effusion, "There is a small pericardial effusion.", "There is a large pericardial effusion."),
        (effusion, "No pericardial effusion.", "There is a small pericardial effusion."),
        (lge, "No abnormal enhancement is seen.", "No late gadolinium enhancement."),
        (lge, "blah", "Enhancement in the basal septum."),
    ]
    lines = [json.dumps({"prompt": f"<|im_start|>user\n<|vision_start|>{t.question}<|im_end|>\n", "predict": p,
                         "label": ref}) for t, p, ref in rows]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    (tmp_path / "r.json").write_text(json.dumps({"predict_bleu-4": 10.0, "predict_rouge-1": 20.0,
                                                 "predict_rouge-2": 5.0, "predict_rouge-l": 18.0,
                                                 "predict_runtime": 3.0}))
    report = evaluation_report(tmp_path / "p.jsonl", tmp_path / "r.json")
    assert report["generation"] == {"bleu-4": 10.0, "rouge-1": 20.0, "rouge-2": 5.0, "rouge-l": 18.0}
    e, g = report["per_task"]["pericardial_effusion"], report["per_task"]["lge"]
    assert (e["n"], e["presence_correct"], e["graded"], e["grade_correct"]) == (3, 2, 3, 1)
    assert (g["n"], g["presence_correct"], g["unparseable_predictions"]) == (2, 1, 1)
    assert "pericardial_effusion" in format_report(report)
