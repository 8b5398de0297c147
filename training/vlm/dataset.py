"""Annotated studies -> VQA dataset in LLaMA-Factory's sharegpt format (train / val / test).

Input: one or more annotated studies. A study folder is the preprocessing output (`manifest.json`
and `series/*.nii.gz`, as `services.preprocess.study.preprocess_study` writes it) plus

* `labels.nii.gz`: the cine segmentation in the cine's grid (4D, one map per phase, as the
  segmentation stage writes it; 0 bg, 1 LV cavity, 2 LV myocardium, 3 RV cavity), and
* `annotations.json`: `{"patient_id": "P001", "answers": {"<task_id>": "reference answer", ...}}`
  with optional `"study_id"` (default: the manifest's StudyInstanceUID) and `"labels"` (another
  labels path, relative to the study folder). An answer of `null` says "not annotated": the task
  is left out for that study and counted in the summary.

`sources` may name study folders, folders whose sub-folders are studies, or a JSON index: a list
(or `{"studies": [...]}`) of objects with `"study_dir"` plus the annotation keys above (paths
relative to the index's folder); the index's entries replace any `annotations.json`.

The visual inputs come from `services.findings.service.prepare_inputs`, the very function the
findings service runs on a study, so prompts (catalog `build_sharegpt_sample`) and pixels are
identical in training and serving.

Output (`out_dir`): `cmr_{train,val,test}.json`, `dataset_info.json` (entries
`cmr_{split}_sharegpt`), `media/<patient>/<study>/<task>/...` (the inputs; sample paths are
relative to `out_dir`, LLaMA-Factory's default `media_dir` = `dataset_dir`) and `summary.json`
(seed, patients per split, samples per task and split, catalog fingerprint).

Splits are by patient (a patient's studies all land in one split): patient ids sorted, shuffled
with `random.Random(seed)`, then cut by the val/test fractions. Everything is first checked
(missing or unknown task answers, missing files, answers for inputs the study cannot provide,
placeholder/file count per sample); any problem raises `DatasetError` listing every offending
study or sample, and nothing is left in `out_dir`: the dataset is built in a temporary sibling
folder and moved into place only when complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.findings.catalog import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    build_sharegpt_sample,
    load_catalog,
)

SPLITS = ("train", "val", "test")
ANNOTATIONS_NAME = "annotations.json"
LABELS_NAME = "labels.nii.gz"
MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.json"
MEDIA_DIR = "media"


def split_file(split: str) -> str:
    return f"cmr_{split}.json"


def dataset_name(split: str) -> str:
    return f"cmr_{split}_sharegpt"


def dataset_info() -> dict[str, Any]:
    """LLaMA-Factory's dataset_info.json entries for the three splits."""
    return {
        dataset_name(split): {
            "file_name": split_file(split),
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images", "videos": "videos"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant"},
        }
        for split in SPLITS
    }


class DatasetError(ValueError):
    """Invalid input or output; `problems` lists every offending study or sample."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the annotated studies:\n{lines}")


@dataclass
class Study:
    study_dir: Path
    patient_id: str
    study_id: str
    answers: dict[str, str | None]
    labels: Path
    origin: str  # where the annotation came from, for error messages


# --- reading the annotated studies --------------------------------------------------------------

def _study_from_annotation(study_dir: Path, ann: Any, origin: str, problems: list[str]) -> Study | None:
    if not isinstance(ann, dict):
        problems.append(f"{origin}: an annotation must be a JSON object")
        return None
    if not study_dir.is_dir():
        problems.append(f"{origin}: study folder {study_dir} does not exist")
        return None
    manifest_path = study_dir / MANIFEST_NAME
    manifest = {}
    if not manifest_path.is_file():
        problems.append(f"{origin}: {manifest_path} does not exist (run `cmrvl preprocess` on the study)")
    else:
        manifest = json.loads(manifest_path.read_text())
    patient = ann.get("patient_id")
    if not isinstance(patient, str) or not patient.strip():
        problems.append(f"{origin}: patient_id is missing or empty (the splits are by patient)")
        patient = None
    answers = ann.get("answers")
    if not isinstance(answers, dict):
        problems.append(f"{origin}: 'answers' must be an object {{task_id: answer text}}")
        answers = None
    labels = study_dir / ann.get("labels", LABELS_NAME)
    if not labels.is_file():
        problems.append(f"{origin}: labels file {labels} does not exist")
    study_id = ann.get("study_id") or manifest.get("study_instance_uid") or study_dir.name
    if patient is None or answers is None:
        return None
    return Study(study_dir, patient.strip(), str(study_id), answers, labels, origin)


def load_studies(sources: Iterable[str | Path]) -> list[Study]:
    """Every annotated study named by `sources` (see the module docstring); DatasetError lists
    every problem found."""
    studies, problems = _collect(sources)
    if problems:
        raise DatasetError(problems)
    return studies


def _collect(sources: Iterable[str | Path]) -> tuple[list[Study], list[str]]:
    problems: list[str] = []
    studies: list[Study] = []
    for source in sources:
        source = Path(source)
        if source.is_file():
            try:
                index = json.loads(source.read_text())
            except json.JSONDecodeError as exc:
                problems.append(f"{source}: not valid JSON ({exc})")
                continue
            entries = index.get("studies") if isinstance(index, dict) else index
            if not isinstance(entries, list):
                problems.append(f"{source}: an index is a list of studies or {{\"studies\": [...]}}")
                continue
            for i, entry in enumerate(entries):
                origin = f"{source}[{i}]"
                if not isinstance(entry, dict) or not entry.get("study_dir"):
                    problems.append(f"{origin}: each index entry needs 'study_dir'")
                    continue
                study = _study_from_annotation(source.parent / entry["study_dir"], entry, origin, problems)
                if study:
                    studies.append(study)
        elif (source / ANNOTATIONS_NAME).is_file():
            studies += _load_folder(source, problems)
        elif source.is_dir():
            subs = sorted(p for p in source.iterdir() if (p / ANNOTATIONS_NAME).is_file())
            if not subs:
                problems.append(f"{source}: no {ANNOTATIONS_NAME} in it or in its sub-folders")
            for sub in subs:
                studies += _load_folder(sub, problems)
        else:
            problems.append(f"{source}: no such file or folder")
    return studies, problems


def _load_folder(study_dir: Path, problems: list[str]) -> list[Study]:
    path = study_dir / ANNOTATIONS_NAME
    try:
        ann = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        problems.append(f"{path}: not valid JSON ({exc})")
        return []
    study = _study_from_annotation(study_dir, ann, str(path), problems)
    return [study] if study else []


def check_answers(studies: list[Study]) -> list[str]:
    """Annotation problems found without building any input: unknown task ids, missing or empty
    answers, studies annotated twice."""
    catalog = load_catalog()
    ids = catalog.ids()
    problems: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for s in studies:
        unknown = sorted(set(s.answers) - set(ids))
        if unknown:
            problems.append(f"{s.origin}: unknown task id(s) {unknown}; catalog {catalog.version} has {ids}")
        missing = [t for t in ids if t not in s.answers]
        if missing:
            problems.append(f"{s.origin}: no answer for task(s) {missing} (give null to leave a task out)")
        for task_id, answer in s.answers.items():
            if answer is not None and (not isinstance(answer, str) or not answer.strip()):
                problems.append(f"{s.origin}: answer for {task_id!r} must be non-empty text or null")
        key = (s.patient_id, s.study_id)
        if key in seen:
            problems.append(f"{s.origin}: study {s.study_id} of patient {s.patient_id} is also annotated in {seen[key]}")
        seen.setdefault(key, s.origin)
    return problems


# --- splits -------------------------------------------------------------------------------------

def split_patients(patient_ids: Iterable[str], seed: int, val_fraction: float = 0.1,
                   test_fraction: float = 0.1) -> dict[str, list[str]]:
    """Patient-level split, deterministic from `seed` and the set of patients (not their order).

    val/test get round(n * fraction) patients, at least one each when the fraction is > 0 and
    there are enough patients to leave one for training."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to less than 1")
    patients = sorted(set(patient_ids))
    random.Random(seed).shuffle(patients)
    n = len(patients)

    def size(fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 0 and n >= 3 else round(n * fraction)

    n_test = size(test_fraction)
    n_val = min(size(val_fraction), max(n - n_test - 1, 0))
    return {
        "test": sorted(patients[:n_test]),
        "val": sorted(patients[n_test:n_test + n_val]),
        "train": sorted(patients[n_test + n_val:]),
    }


# --- visual inputs (the findings service's code) ------------------------------------------------

def volume_paths(manifest: dict, study_dir: Path) -> dict[str, Path]:
    """Volumes the findings inputs take, picked as the findings service picks them."""
    from services.findings.service import input_volumes

    return {name: study_dir / volume for name, volume in input_volumes(manifest).items()}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def _build_study(study: Study, media_root: Path, rel_root: str, problems: list[str]) -> list[tuple[str, dict]]:
    """Visual inputs + samples of one study: [(task_id, sample)]."""
    from services.findings.service import prepare_inputs

    manifest = json.loads((study.study_dir / MANIFEST_NAME).read_text())
    paths = volume_paths(manifest, study.study_dir)
    own = [f"{study.origin}: {name} volume {path} (from the manifest) does not exist"
           for name, path in paths.items() if not path.is_file()]
    if "cine" not in paths:
        own.append(f"{study.origin}: the manifest has no short-axis cine volume")
    if own:
        problems += own
        return []
    prepared, skipped = prepare_inputs(paths, study.labels, media_root)
    out = []
    for task in load_catalog().tasks:
        answer = study.answers.get(task.id)
        if answer is None:
            continue
        if task.id not in prepared:
            problems.append(f"{study.origin}: task {task.id!r} is answered but the study has no input for it "
                            f"({skipped.get(task.id, 'not built')}); give null to leave it out")
            continue
        media = [f"{rel_root}/{rel}" for rel in prepared[task.id]]
        out.append((task.id, build_sharegpt_sample(task, media, answer.strip())))
    return out


def check_samples(samples: list[dict], dataset_dir: Path, where: str) -> list[str]:
    """Format problems of samples: roles, placeholder count vs files, files that do not exist."""
    problems = []
    for i, sample in enumerate(samples):
        tag = f"{where}[{i}]"
        msgs = sample.get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2 or len(msgs) % 2:
            problems.append(f"{tag}: messages must be user/assistant pairs")
            continue
        roles = [m.get("role") for m in msgs]
        if roles != ["user", "assistant"] * (len(msgs) // 2):
            problems.append(f"{tag}: roles {roles} do not alternate user/assistant")
        text = "".join(str(m.get("content", "")) for m in msgs)
        for ph, key in ((IMAGE_PLACEHOLDER, "images"), (VIDEO_PLACEHOLDER, "videos")):
            files = sample.get(key, [])
            if text.count(ph) != len(files):
                problems.append(f"{tag}: {text.count(ph)} {ph} placeholder(s) but {len(files)} {key}")
            missing = [f for f in files if not (dataset_dir / f).is_file()]
            if missing:
                problems.append(f"{tag}: {key} missing on disk: {missing}")
    return problems


# --- the builder --------------------------------------------------------------------------------

def build_dataset(sources: Iterable[str | Path], out_dir: str | Path, *, seed: int = 12345,
                  val_fraction: float = 0.1, test_fraction: float = 0.1, overwrite: bool = False) -> dict:
    """Build the dataset into `out_dir`; returns the summary (also written as summary.json)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    studies, problems = _collect(sources)
    problems += check_answers(studies)
    if not studies and not problems:
        problems.append("no annotated study found")
    if problems:
        raise DatasetError(problems)
    splits = split_patients((s.patient_id for s in studies), seed, val_fraction, test_fraction)
    split_of = {p: split for split, ps in splits.items() for p in ps}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        samples: dict[str, list[dict]] = {split: [] for split in SPLITS}
        per_task = {split: Counter() for split in SPLITS}
        not_annotated = Counter()
        used_dirs: set[str] = set()
        for study in sorted(studies, key=lambda s: (s.patient_id, s.study_id)):
            rel_root = f"{MEDIA_DIR}/{_safe(study.patient_id)}/{_safe(study.study_id)}"
            if rel_root in used_dirs:  # two ids that differ only in unsafe characters
                rel_root += f"-{len(used_dirs)}"
            used_dirs.add(rel_root)
            split = split_of[study.patient_id]
            for task_id, sample in _build_study(study, tmp / rel_root, rel_root, problems):
                samples[split].append(sample)
                per_task[split][task_id] += 1
            not_annotated.update(t for t, a in study.answers.items() if a is None)
        for split in SPLITS:
            problems += check_samples(samples[split], tmp, split_file(split))
        if problems:
            raise DatasetError(problems)

        catalog = load_catalog()
        summary = {
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "catalog_version": catalog.version,
            "catalog_fingerprint": catalog.fingerprint,
            "n_patients": len(split_of),
            "n_studies": len(studies),
            "splits": {
                split: {
                    "patients": splits[split],
                    "n_studies": sum(1 for s in studies if split_of[s.patient_id] == split),
                    "n_samples": len(samples[split]),
                    "samples_per_task": {t: per_task[split][t] for t in catalog.ids()},
                }
                for split in SPLITS
            },
            "not_annotated_per_task": {t: not_annotated[t] for t in catalog.ids()},
            "dataset_names": {split: dataset_name(split) for split in SPLITS},
        }
        for split in SPLITS:
            (tmp / split_file(split)).write_text(json.dumps(samples[split], indent=1, ensure_ascii=False))
        (tmp / "dataset_info.json").write_text(json.dumps(dataset_info(), indent=2))
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished dataset in: the old one (if any) is removed only after the rename."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def validate_dataset(dataset_dir: str | Path) -> dict[str, int]:
    """Check a built dataset folder (dataset_info entries, sample format, files); returns the
    sample count per split."""
    dataset_dir = Path(dataset_dir)
    problems = []
    info_path = dataset_dir / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    counts = {}
    for split in SPLITS:
        entry = info.get(dataset_name(split))
        if entry is None:
            problems.append(f"dataset_info.json: no entry {dataset_name(split)!r}")
            continue
        path = dataset_dir / entry["file_name"]
        if not path.is_file():
            problems.append(f"{path} does not exist")
            continue
        samples = json.loads(path.read_text())
        counts[split] = len(samples)
        problems += check_samples(samples, dataset_dir, entry["file_name"])
    if problems:
        raise DatasetError(problems)
    return counts


def format_summary(summary: dict) -> str:
    """Counts per task and split as a small text table."""
    ids = list(summary["not_annotated_per_task"])
    width = max(len(t) for t in ids + ["patients"])
    lines = [f"{'':{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS)]
    lines.append(f"{'patients':{width}}  " + "  ".join(f"{len(summary['splits'][s]['patients']):>6}" for s in SPLITS))
    lines.append(f"{'studies':{width}}  " + "  ".join(f"{summary['splits'][s]['n_studies']:>6}" for s in SPLITS))
    for t in ids:
        lines.append(f"{t:{width}}  " + "  ".join(f"{summary['splits'][s]['samples_per_task'][t]:>6}" for s in SPLITS))
    return "\n".join(lines)
