"""The versioned catalog of findings questions: one source of truth for training and serving.

The catalog data lives in `tasks_v<N>.json` beside this module (question text, visual-input spec
with every size and count, answer type). Both the training dataset builder and the findings
service render the user turn through `build_user_message`, so a prompt can never differ between
the two. Message layout follows CMR-VL / LLaMA-Factory "sharegpt" samples: all `<image>` (or the
one `<video>`) placeholders first, then the question, nothing in between.

Prompt provenance (also stored per task as `prompt_source`): the effusion and wall-motion
questions are byte-for-byte the examples in EstelleXIA/CMR-VL README.md (commit b9a444d); the
LGE, edema and thrombus questions are not published there and are written in the same style.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CATALOG_VERSION = "v1"
_CATALOG_DIR = Path(__file__).resolve().parent

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

VISUAL_KINDS = ("cine_sax_images", "cine_sax_video", "enhancement_images", "lv_masked_images")
ANSWER_TYPES = ("presence_grade", "wall_motion", "presence_segments")


@dataclass(frozen=True)
class Task:
    """One question of the catalog. `visual` holds the size/count spec of its visual input."""

    id: str
    title: str
    question: str
    prompt_source: str
    visual: dict[str, Any]
    answer_type: str
    grades: tuple[str, ...]
    catalog_version: str

    @property
    def is_video(self) -> bool:
        return self.visual["kind"] == "cine_sax_video"

    @property
    def placeholder(self) -> str:
        return VIDEO_PLACEHOLDER if self.is_video else IMAGE_PLACEHOLDER

    @property
    def n_visuals(self) -> int:
        """How many placeholders (images, or 1 video) the prompt carries."""
        return int(self.visual["count"])

    @property
    def prompt(self) -> str:
        """The full user message with the catalog's number of placeholders."""
        return build_user_message(self)


@dataclass(frozen=True)
class Catalog:
    version: str
    tasks: tuple[Task, ...]
    defaults: dict[str, Any]
    fingerprint: str  # sha256 of the catalog file: record it with datasets and served models

    def get(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(f"unknown findings task {task_id!r}; catalog {self.version} has {self.ids()}")

    def ids(self) -> list[str]:
        return [t.id for t in self.tasks]


def _validate(raw: dict[str, Any]) -> None:
    if raw.get("image_placeholder") != IMAGE_PLACEHOLDER or raw.get("video_placeholder") != VIDEO_PLACEHOLDER:
        raise ValueError("catalog placeholders must be <image> and <video> (LLaMA-Factory defaults)")
    seen = set()
    for t in raw["tasks"]:
        if t["id"] in seen:
            raise ValueError(f"duplicate task id {t['id']!r}")
        seen.add(t["id"])
        if t["visual"]["kind"] not in VISUAL_KINDS:
            raise ValueError(f"task {t['id']}: unknown visual kind {t['visual']['kind']!r}")
        if t["answer"]["type"] not in ANSWER_TYPES:
            raise ValueError(f"task {t['id']}: unknown answer type {t['answer']['type']!r}")
        if IMAGE_PLACEHOLDER in t["question"] or VIDEO_PLACEHOLDER in t["question"]:
            raise ValueError(f"task {t['id']}: placeholders are added by build_user_message, not stored")
        if t["visual"]["kind"] == "cine_sax_video" and int(t["visual"]["count"]) != 1:
            raise ValueError(f"task {t['id']}: a video task takes exactly one video")


@lru_cache(maxsize=None)
def load_catalog(version: str = CATALOG_VERSION) -> Catalog:
    path = _CATALOG_DIR / f"tasks_{version}.json"
    data = path.read_bytes()
    raw = json.loads(data)
    if raw.get("version") != version:
        raise ValueError(f"{path.name} declares version {raw.get('version')!r}, expected {version!r}")
    _validate(raw)
    tasks = tuple(
        Task(
            id=t["id"],
            title=t["title"],
            question=t["question"],
            prompt_source=t["prompt_source"],
            visual=dict(t["visual"]),
            answer_type=t["answer"]["type"],
            grades=tuple(t["answer"].get("grades", ())),
            catalog_version=version,
        )
        for t in raw["tasks"]
    )
    return Catalog(version, tasks, dict(raw.get("defaults", {})), hashlib.sha256(data).hexdigest())


def get_task(task_id: str, version: str = CATALOG_VERSION) -> Task:
    return load_catalog(version).get(task_id)


def build_user_message(task: Task | str, n_visuals: int | None = None) -> str:
    """The user turn: `n` placeholders then the question (LLaMA-Factory sharegpt layout).

    `n_visuals` is a check, not a choice: it must equal the catalog count, because the model was
    trained on exactly that many images per question.
    """
    if isinstance(task, str):
        task = get_task(task)
    if n_visuals is not None and n_visuals != task.n_visuals:
        raise ValueError(f"task {task.id} takes {task.n_visuals} {task.placeholder}, got {n_visuals}")
    return task.placeholder * task.n_visuals + task.question


def build_sharegpt_sample(task: Task | str, visual_paths: list[str], answer: str) -> dict[str, Any]:
    """One training sample in the CMR-VL / LLaMA-Factory sharegpt format (README example)."""
    if isinstance(task, str):
        task = get_task(task)
    user = build_user_message(task, len(visual_paths))
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
        "images": [] if task.is_video else list(visual_paths),
        "videos": list(visual_paths) if task.is_video else [],
    }


def build_openai_content(task: Task | str, visual_urls: list[str]) -> list[dict[str, Any]]:
    """The same user turn as OpenAI chat content parts (for vLLM's /v1/chat/completions).

    Parts follow the placeholder order of `build_user_message`: each placeholder becomes an
    image_url/video_url part and the question a text part. Qwen2.5-VL's chat template renders an
    image part as `<|vision_start|><|image_pad|><|vision_end|>`, which is what LLaMA-Factory's
    qwen2_vl template puts in place of `<image>`, so training and serving see the same tokens.
    """
    if isinstance(task, str):
        task = get_task(task)
    message = build_user_message(task, len(visual_urls))
    parts: list[dict[str, Any]] = []
    urls = iter(visual_urls)
    for kind, text in split_placeholders(message):
        if kind == "text":
            parts.append({"type": "text", "text": text})
        else:
            key = f"{kind}_url"
            parts.append({"type": key, key: {"url": next(urls)}})
    return parts


def split_placeholders(message: str) -> list[tuple[str, str]]:
    """Split a user message into ("image"|"video"|"text", piece) in order."""
    out: list[tuple[str, str]] = []
    rest = message
    while rest:
        hits = [(rest.find(p), p) for p in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) if p in rest]
        if not hits:
            out.append(("text", rest))
            break
        pos, ph = min(hits)
        if pos:
            out.append(("text", rest[:pos]))
        out.append(("image" if ph == IMAGE_PLACEHOLDER else "video", ph))
        rest = rest[pos + len(ph):]
    return out


def join_parts(parts: list[dict[str, Any]]) -> str:
    """Inverse of `build_openai_content` for the text: placeholders for media parts, text as is."""
    pieces = []
    for part in parts:
        if part["type"] == "text":
            pieces.append(part["text"])
        elif part["type"] == "image_url":
            pieces.append(IMAGE_PLACEHOLDER)
        elif part["type"] == "video_url":
            pieces.append(VIDEO_PLACEHOLDER)
        else:
            raise ValueError(f"unknown content part {part['type']!r}")
    return "".join(pieces)
