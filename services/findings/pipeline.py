"""Visual inputs + catalog -> one VLM question per task -> the findings document.

    document = generate_findings(inputs, backend)

`inputs` maps a catalog task id to its media in placeholder order, each item a pair
`(source, media_type)`: source is a file path, raw bytes, a PIL image, or a URL string
(`http(s)://` e.g. a presigned object-store URL, `data:`, `file://`) that is sent as is;
media_type is "image/png", "video/mp4", ... Paths, bytes and images are sent inline as base64 data
URLs. `backend` is anything with `chat(messages, max_tokens=...) -> ChatResult` and `model_info`:
`VLMClient` (vLLM / KServe over HTTP) or `EmbeddedBackend` (transformers in process).

The user turn comes from `catalog.build_openai_content`, the same function family the training
dataset builder uses, so served prompts are byte-identical to the training prompts; answers go
through `answers.parse_answer`. A model that talks nonsense gives status "unparseable"; a request
the server rejects gives status "error" for that task only. When the server is down or too slow
(`VLMUnavailable` / `VLMTimeout` after the client's retries), the remaining requests are cancelled
and the exception is raised with the partial document attached as `exc.partial`, so the servicer
can answer UNAVAILABLE / DEADLINE_EXCEEDED and the gateway can still deliver the measurements.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from services.findings.answers import ABSENT, PRESENT, parse_answer
from services.findings.catalog import Catalog, Task, build_openai_content, build_user_message, load_catalog
from services.findings.vlm_client import ChatResult, VLMError, VLMTimeout, VLMUnavailable

SCHEMA = "cmrvl.findings/v1"
MediaItem = tuple[Any, str]
CANCELLED = "not asked: the model server failed on an earlier question"


class ChatBackend(Protocol):
    @property
    def model_info(self) -> dict[str, str]: ...

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None) -> ChatResult: ...


def media_url(source: Any, media_type: str | None = None) -> str:
    """A URL the model server can read: URLs pass through, everything else becomes a data URL."""
    if isinstance(source, str) and source.startswith(("http://", "https://", "data:", "file://")):
        return source
    if hasattr(source, "save") and hasattr(source, "mode"):  # a PIL image
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        source, media_type = buffer.getvalue(), "image/png"
    elif isinstance(source, (str, Path)):
        path = Path(source)
        media_type = media_type or mimetypes.guess_type(path.name)[0]
        source = path.read_bytes()
    if not isinstance(source, (bytes, bytearray)):
        raise TypeError(f"unsupported media source {type(source).__name__}")
    if not media_type:
        raise ValueError("media type needed for raw bytes (e.g. image/png, video/mp4)")
    return f"data:{media_type};base64,{base64.b64encode(source).decode()}"


def inputs_from_visual(visual) -> list[MediaItem]:
    """Media items of a `visual_inputs.VisualInput` (PNG images or the MP4), in placeholder order."""
    if visual.video is not None:
        return [(visual.video, "video/mp4")]
    return [(image, "image/png") for image in visual.images]


MEDIA_MODES = ("data", "presigned")


def object_store_items(store, bucket: str, objects: Sequence[tuple[str, str]], *, mode: str = "data",
                       expires_s: int = 3600) -> list[MediaItem]:
    """Media items for inputs already in the object store, `objects` = [(key, media_type), ...].

    mode "data": read the bytes and send them inline (works wherever the model server runs);
    "presigned": send presigned GET URLs and let the model server download the media itself
    (smaller requests; the server must reach the object store at the URL's host).
    """
    if mode not in MEDIA_MODES:
        raise ValueError(f"media mode must be one of {MEDIA_MODES}, got {mode!r}")
    if mode == "presigned":
        return [(store.presigned_get(bucket, key, expires_s), media_type) for key, media_type in objects]
    return [(store.get_bytes(bucket, key), media_type) for key, media_type in objects]


def build_messages(task: Task | str, items: Sequence[MediaItem]) -> list[dict[str, Any]]:
    """The chat request for one task: a single user turn, media parts then the question."""
    urls = [media_url(source, media_type) for source, media_type in items]
    return [{"role": "user", "content": build_openai_content(task, urls)}]


def _finding(task: Task, model: dict[str, str], *, result: ChatResult | None = None,
             error: str = "") -> dict[str, Any]:
    entry: dict[str, Any] = {
        "task_id": task.id,
        "title": task.title,
        "question": task.question,
        "prompt": build_user_message(task),
        "catalog_version": task.catalog_version,
        "answer": "",
        "finding": None,
        "status": "error",
        "error": error,
        "model": dict(model),
        "usage": None,
        "latency_s": None,
    }
    if result is not None:
        finding = parse_answer(task, result.text)
        entry.update(
            answer=result.text,
            finding=finding.to_dict(),
            status="ok" if finding.status in (PRESENT, ABSENT) else "unparseable",
            error="" if finding.status in (PRESENT, ABSENT) else finding.reason,
            model={**model, "served_name": result.model},
            usage={"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                   "finish_reason": result.finish_reason, "attempts": result.attempts},
            latency_s=round(result.latency_s, 3),
        )
    return entry


def generate_findings(inputs: Mapping[str, Sequence[MediaItem]], backend: ChatBackend, *,
                      catalog: Catalog | None = None, concurrency: int = 4, max_tokens: int | None = None,
                      not_assessable: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Ask every task in `inputs` (catalog order) and return the findings document.

    `not_assessable` maps task ids whose inputs could not be built (e.g. no LGE series) to the
    reason; they are listed with status "error" and that reason, without a request.
    Raises VLMUnavailable / VLMTimeout (with `.partial`) as described in the module doc.
    """
    catalog = catalog or load_catalog()
    model = dict(backend.model_info)
    unknown = set(inputs) - set(catalog.ids())
    if unknown:
        raise KeyError(f"unknown findings tasks {sorted(unknown)}; catalog {catalog.version} has {catalog.ids()}")
    tasks = [t for t in catalog.tasks if t.id in inputs]
    results: dict[str, dict[str, Any]] = {
        task_id: _finding(catalog.get(task_id), model, error=f"not assessable: {reason}")
        for task_id, reason in (not_assessable or {}).items()
    }

    stop = threading.Event()  # set on the first unavailable/timeout: later tasks are not sent

    def ask(task: Task) -> dict[str, Any]:
        if stop.is_set():
            return _finding(task, model, error=CANCELLED)
        try:
            messages = build_messages(task, inputs[task.id])
        except (ValueError, TypeError, OSError) as exc:  # wrong count, unreadable file
            return _finding(task, model, error=f"bad input: {exc}")
        try:
            result = backend.chat(messages, max_tokens=max_tokens)
        except (VLMUnavailable, VLMTimeout):
            stop.set()
            raise
        except VLMError as exc:
            return _finding(task, model, error=str(exc))
        return _finding(task, model, result=result)

    t0 = time.monotonic()
    failure: VLMError | None = None
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="vlm") as pool:
        futures = {pool.submit(ask, task): task for task in tasks}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in list(done) + [f for f in pending if not f.cancelled()]:
            task = futures[future]
            try:
                results[task.id] = future.result()
            except (VLMUnavailable, VLMTimeout) as exc:
                failure = failure or exc
                results[task.id] = _finding(task, model, error=str(exc))
        for future in pending:
            if future.cancelled():
                task = futures[future]
                results[task.id] = _finding(task, model, error=CANCELLED)

    document = {
        "schema": SCHEMA,
        "catalog": {"version": catalog.version, "fingerprint": catalog.fingerprint},
        "model": model,
        "elapsed_s": round(time.monotonic() - t0, 3),
        "findings": [results[t.id] for t in catalog.tasks if t.id in results],
    }
    if failure is not None:
        failure.partial = document
        raise failure
    return document
