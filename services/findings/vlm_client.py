"""Client for the OpenAI-compatible chat-completions API of vLLM and KServe's Hugging Face runtime.

`base_url` is the API root: `http://vllm:8000/v1` for a plain vLLM server, and
`http://<isvc host>/openai/v1` for a KServe InferenceService (KServe mounts the OpenAI routes under
the `/openai` prefix). The client sends `POST {base_url}/chat/completions`.

Failure semantics (the findings servicer maps them to gRPC codes):
* 429 / 502 / 503 / 504 and connection failures are retried with exponential backoff (honouring a
  `Retry-After` header); when the attempts are used up -> `VLMUnavailable` (UNAVAILABLE).
* no answer within `timeout_s` -> `VLMTimeout` (DEADLINE_EXCEEDED); not retried, since a retry
  would only double the wait on a server that is already slow.
* any other non-2xx answer or a body that is not a chat completion -> `VLMError` (the finding is
  marked "error"; a malformed *answer text* is the parser's business, not an error here).

Thread safe: one `httpx.Client` with a connection pool sized for the pipeline's concurrency.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx

RETRY_STATUS = frozenset({429, 502, 503, 504})


class VLMError(RuntimeError):
    """The model server answered, but not with a usable chat completion."""


class VLMUnavailable(VLMError):
    """The model server cannot be reached or stays overloaded (after retries)."""


class VLMTimeout(VLMError):
    """The model server did not answer within the timeout."""


@dataclass
class ChatResult:
    text: str
    model: str  # the model name the server reports (vLLM: --served-model-name)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict):
            error = body.get("error", body)
            message = error.get("message") if isinstance(error, dict) else error
            return str(message or body)[:500]
        return str(body)[:500]
    except ValueError:
        return response.text[:500]


class VLMClient:
    """Chat completions against one served model.

    `model` is the served model name (vLLM `--served-model-name`, KServe: the model name);
    `version` is what we record with each finding (the weights' version in the object store).
    """

    backend = "openai"

    def __init__(self, base_url: str, model: str, *, version: str = "", api_key: str = "",
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0, max_attempts: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0, max_tokens: int = 256,
                 temperature: float = 0.0, stream: bool = False, max_connections: int = 16):
        if not base_url:
            raise ValueError("base_url is empty: set CMRVL_VLM_BASE_URL (e.g. http://host:8000/v1)")
        self.base_url = base_url.rstrip("/")
        self.model, self.version = model, version
        self.timeout_s, self.max_attempts = timeout_s, max(1, max_attempts)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_tokens, self.temperature, self.stream = max_tokens, temperature, stream
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    @classmethod
    def from_settings(cls, settings, **overrides) -> "VLMClient":
        """Build from `services.runtime.settings.Settings` (CMRVL_VLM_BASE_URL, CMRVL_VLM_MODEL, and
        the optional CMRVL_VLM_* fields below when the settings define them)."""
        options = {
            "version": getattr(settings, "vlm_model_version", ""),
            "api_key": getattr(settings, "vlm_api_key", ""),
            "timeout_s": getattr(settings, "vlm_timeout_s", 120.0),
            "max_attempts": getattr(settings, "vlm_max_attempts", 4),
            "stream": getattr(settings, "vlm_stream", False),
        }
        options.update(overrides)
        return cls(settings.vlm_base_url, settings.vlm_model, **options)

    @property
    def model_info(self) -> dict[str, str]:
        return {"name": self.model, "version": self.version, "backend": self.backend}

    # ------------------------------------------------------------------ requests

    def _backoff(self, attempt: int, response: httpx.Response | None) -> float:
        hinted = _retry_after_s(response) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff_s)
        base = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        return base * (0.5 + random.random() / 2)  # jitter: concurrent requests don't retry in step

    def chat(self, messages: list[dict[str, Any]], *, max_tokens: int | None = None,
             temperature: float | None = None, stream: bool | None = None) -> ChatResult:
        """One chat completion (greedy by default); retries as described in the module doc."""
        stream = self.stream if stream is None else stream
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
            "stream": stream,
        }
        if stream:  # token counts arrive in a last chunk only when asked for
            body["stream_options"] = {"include_usage": True}
        url = f"{self.base_url}/chat/completions"
        t0 = time.monotonic()
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            response = None
            try:
                if stream:
                    with self._http.stream("POST", url, json=body) as response:
                        if response.status_code == 200:
                            result = self._read_stream(response.iter_lines(), t0)
                        else:
                            response.read()
                else:
                    response = self._http.post(url, json=body)
                    if response.status_code == 200:
                        result = self._read_completion(response)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    last = f"connect timeout to {self.base_url}"
                else:
                    raise VLMTimeout(f"{self.base_url}: no answer within {self.timeout_s:g} s") from None
            except httpx.TransportError as exc:  # refused, reset, DNS: the server is not there
                last = f"cannot reach {self.base_url}: {exc.__class__.__name__}: {exc}"
            else:
                if response.status_code == 200:
                    result.latency_s = time.monotonic() - t0
                    result.attempts = attempt
                    return result
                last = f"{self.base_url} answered HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise VLMError(last)
            if attempt < self.max_attempts:
                time.sleep(self._backoff(attempt, response))
        raise VLMUnavailable(f"{last} (after {self.max_attempts} attempts)")

    def _read_completion(self, response: httpx.Response) -> ChatResult:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise VLMError(f"{self.base_url}: not a chat completion: {response.text[:200]!r}") from None
        usage = data.get("usage") or {}
        return ChatResult(text=text if isinstance(text, str) else "", model=data.get("model") or self.model,
                          finish_reason=choice.get("finish_reason") or "",
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0), raw=data)

    def _read_stream(self, lines: Iterator[str], t0: float) -> ChatResult:
        """Accumulate server-sent `chat.completion.chunk` events until `[DONE]`."""
        pieces, model, finish, usage = [], self.model, "", {}
        for line in lines:
            if time.monotonic() - t0 > self.timeout_s:  # a server that trickles tokens forever
                raise VLMTimeout(f"{self.base_url}: stream still running after {self.timeout_s:g} s")
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise VLMError(f"{self.base_url}: malformed stream event {payload[:200]!r}") from None
            if "error" in chunk:
                raise VLMError(f"{self.base_url}: stream error: {str(chunk['error'])[:300]}")
            model = chunk.get("model") or model
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    pieces.append(delta["content"])
                finish = choice.get("finish_reason") or finish
        return ChatResult(text="".join(pieces), model=model, finish_reason=finish,
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0))

    def list_models(self) -> list[str]:
        """Served model names (`GET {base_url}/models`); VLMUnavailable when unreachable."""
        try:
            response = self._http.get(f"{self.base_url}/models")
        except httpx.TransportError as exc:
            raise VLMUnavailable(f"cannot reach {self.base_url}: {exc}") from None
        if response.status_code != 200:
            raise VLMError(f"{self.base_url}/models answered HTTP {response.status_code}")
        return [m["id"] for m in response.json().get("data", [])]

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
