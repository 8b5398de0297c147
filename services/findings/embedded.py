"""In-process Qwen2.5-VL backend (transformers) for machines without a model server.

It takes the SAME OpenAI chat messages the HTTP client sends to vLLM (content parts built by
`catalog.build_openai_content`, media as data/http(s)/file URLs) and returns the same
`ChatResult`, so the pipeline and the answer parser cannot tell the backends apart. The prompt is
rendered with the model's own chat template (Qwen2.5-VL's), as vLLM does.

Videos are decoded with PyAV, every frame, at the file's frame rate: the catalog writes its
wall-motion MP4 at LLaMA-Factory's `video_fps` so training took every frame too, and vLLM is
started with `--media-io-kwargs '{"video": {"num_frames": -1}}'` to do the same.

torch and transformers are imported when a backend is created, never at module import.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from services.findings.vlm_client import ChatResult, VLMError

DEFAULT_MAX_NEW_TOKENS = 256


def fetch_media(url: str, timeout_s: float = 60.0) -> bytes:
    """Bytes behind a data:, file:// or http(s):// URL (a presigned object-store URL included)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        return base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
    if url.startswith("file://"):
        return Path(url[len("file://"):]).read_bytes()
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    raise VLMError(f"unsupported media URL scheme: {url[:40]!r}")


def decode_video(data: bytes) -> tuple[Any, float]:
    """All frames of a video as a uint8 array (T, H, W, 3) and its frame rate."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 2.0)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise VLMError("video has no frames")
    return np.stack(frames), fps


class EmbeddedBackend:
    """Qwen2.5-VL run with transformers in this process (CPU by default).

    `model_dir` is a Hugging Face model folder (config, weights, tokenizer, processor configs),
    e.g. the one `cmrvl models upload` puts into the store. Generation is greedy and serialized
    (one request at a time: the model already uses every core).
    """

    backend = "embedded"

    def __init__(self, model_dir: str | Path, *, model_name: str | None = None, version: str = "",
                 device: str = "cpu", dtype: str = "auto", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").exists():
            raise VLMError(f"no model at {self.model_dir} (config.json missing)")
        self.model_name = model_name or self.model_dir.name
        self.version = version
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=torch_dtype).to(device).eval()
        self.device = device
        self._lock = threading.Lock()

    @property
    def model_info(self) -> dict[str, str]:
        return {"name": self.model_name, "version": self.version, "backend": self.backend}

    def _convert(self, messages: list[dict[str, Any]]):
        """OpenAI messages -> (template messages, images, videos, video fps)."""
        from PIL import Image

        images, videos, fps = [], [], []
        converted = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                converted.append({"role": message["role"], "content": content})
                continue
            parts = []
            for part in content:
                kind = part["type"]
                if kind == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    data = fetch_media(part["image_url"]["url"])
                    images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                    parts.append({"type": "image"})
                elif kind == "video_url":
                    frames, rate = decode_video(fetch_media(part["video_url"]["url"]))
                    videos.append(frames)
                    fps.append(rate)
                    parts.append({"type": "video"})
                else:
                    raise VLMError(f"unsupported content part {kind!r}")
            converted.append({"role": message["role"], "content": parts})
        return converted, images, videos, fps

    def render_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text the model sees (before the vision pads are expanded)."""
        template_messages = [
            {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else [
                {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": p["type"].removesuffix("_url")}
                for p in m["content"]]}
            for m in messages
        ]
        return self.processor.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None,
             temperature: float = 0.0, stream: bool = False) -> ChatResult:
        import torch
        from transformers.video_utils import VideoMetadata

        t0 = time.monotonic()
        converted, images, videos, fps = self._convert(messages)
        prompt = self.processor.apply_chat_template(converted, add_generation_prompt=True, tokenize=False)
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
            # Every decoded frame, at the file's rate (sets second_per_grid_ts for mRoPE time).
            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(v), fps=r, frames_indices=list(range(len(v))))
                                        for v, r in zip(videos, fps)]
            kwargs["do_sample_frames"] = False
        generation = {"max_new_tokens": max_tokens or self.max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            generation["temperature"] = temperature
        with self._lock, torch.inference_mode():  # one request at a time: it uses every core
            inputs = self.processor(**kwargs).to(self.device)
            n_prompt = int(inputs["input_ids"].shape[1])
            out = self.model.generate(**inputs, **generation)
        new_tokens = out[0, n_prompt:]
        text = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        finish = "stop" if len(new_tokens) and int(new_tokens[-1]) in eos else "length"
        return ChatResult(text=text, model=self.model_name, finish_reason=finish, prompt_tokens=n_prompt,
                          completion_tokens=int(len(new_tokens)), latency_s=time.monotonic() - t0)

    def generate(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> str:
        return self.chat(messages, max_tokens=max_tokens).text

    def close(self) -> None:
        pass
