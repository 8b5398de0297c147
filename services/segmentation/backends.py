"""Where the segmentation network runs: one small interface, two backends.

``infer(batch)`` takes float32 [n, channels, *patch] (nnU-Net-preprocessed patches, any n) and
returns float32 logits [n, classes, *patch]. Backends split n into requests of at most
``max_batch_size`` themselves.

- ``OnnxRuntimeBackend``: in-process ONNX Runtime on ``<version>/model.onnx`` (embedded default,
  and the fallback where no Triton is deployed).
- ``TritonBackend``: Triton Inference Server over gRPC (tritonclient), production. Requests of up
  to ``max_batch_size`` patches, several in flight so Triton's dynamic batcher can merge them.
- ``FallbackBackend``: Triton first; ONNX Runtime in-process when Triton stays unavailable.

Errors a caller (the gRPC servicer) maps to status codes: ``BackendUnavailable`` -> UNAVAILABLE,
``BackendTimeout`` -> DEADLINE_EXCEEDED, ``InvalidInput`` -> INVALID_ARGUMENT.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


class SegmentationError(Exception):
    """Base class of the errors below."""


class BackendUnavailable(SegmentationError):
    """The inference server cannot be reached (after retries) or the model is not loaded."""


class BackendTimeout(SegmentationError):
    """The inference server did not answer within the deadline."""


class InvalidInput(SegmentationError, ValueError):
    """The input does not fit the model (shape, dtype, values)."""


class Backend(Protocol):
    max_batch_size: int

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def _check_batch(batch: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    if not isinstance(batch, np.ndarray) or batch.ndim != len(input_shape) + 1:
        raise InvalidInput(f"expected a batch [n, {', '.join(map(str, input_shape))}], "
                           f"got {getattr(batch, 'shape', type(batch).__name__)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


class OnnxRuntimeBackend:
    """The ONNX network in this process."""

    def __init__(self, onnx_path, input_name: str = "input", output_name: str = "logits",
                 max_batch_size: int = 32, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name, self.output_name = input_name, output_name
        self.max_batch_size = max_batch_size
        self.input_shape = list(self.session.get_inputs()[0].shape[1:])  # without the batch axis

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = _check_batch(batch, self.input_shape)
        if list(batch.shape[1:]) != self.input_shape:
            raise InvalidInput(f"patch shape {list(batch.shape[1:])} does not match the model's "
                               f"{self.input_shape}")
        outs = [self.session.run([self.output_name], {self.input_name: batch[i:i + self.max_batch_size]})[0]
                for i in range(0, len(batch), self.max_batch_size)]
        return np.concatenate(outs, 0)

    def close(self) -> None:
        pass


class TritonBackend:
    """The network on Triton Inference Server, over gRPC.

    ``timeout_s`` bounds each request. UNAVAILABLE (server down, restarting, model not loaded yet)
    and RESOURCE_EXHAUSTED are retried ``max_attempts`` times with exponential backoff: inference
    has no side effects, and nothing ran. DEADLINE_EXCEEDED is not retried: the time is spent and
    a second try would only add load to a slow server.
    """

    RETRIED = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")

    def __init__(self, url: str, model_name: str = "cmr_seg", model_version: str = "",
                 input_name: str = "input", output_name: str = "logits", max_batch_size: int = 32,
                 timeout_s: float = 60.0, max_attempts: int = 4, backoff_s: float = 0.2,
                 max_in_flight: int = 2):
        self.url, self.model_name, self.model_version = url, model_name, str(model_version or "")
        self.input_name, self.output_name = input_name, output_name
        self.max_batch_size, self.timeout_s = max_batch_size, timeout_s
        self.max_attempts, self.backoff_s = max(1, max_attempts), backoff_s
        self.attempts = 0  # requests sent, retries included (observability and tests)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_in_flight), thread_name_prefix="triton")

    def _client(self):
        # One client per worker thread: each gRPC stream stays on its own thread.
        import tritonclient.grpc as grpcclient

        if getattr(self._local, "client", None) is None:
            self._local.client = grpcclient.InferenceServerClient(self.url)
        return self._local.client

    def _infer_one(self, chunk: np.ndarray) -> np.ndarray:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inp = grpcclient.InferInput(self.input_name, list(chunk.shape), "FP32")
        inp.set_data_from_numpy(chunk)
        out = grpcclient.InferRequestedOutput(self.output_name)
        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            self.attempts += 1
            try:
                result = self._client().infer(self.model_name, [inp], model_version=self.model_version,
                                              outputs=[out], client_timeout=self.timeout_s)
                return result.as_numpy(self.output_name)
            except InferenceServerException as exc:
                status = str(exc.status() or "")
                where = f"Triton at {self.url}, model {self.model_name!r}"
                if status.endswith("DEADLINE_EXCEEDED"):
                    raise BackendTimeout(f"{where} did not answer within {self.timeout_s:g} s "
                                         f"({exc.message()})") from exc
                if status.endswith("INVALID_ARGUMENT"):
                    raise InvalidInput(f"{where} rejected the input {list(chunk.shape)}: {exc.message()}") from exc
                retried = any(status.endswith(s) for s in self.RETRIED)
                if not retried or attempt == self.max_attempts:
                    if retried or status.endswith(("NOT_FOUND", "UNAVAILABLE")) or "not found" in str(exc):
                        raise BackendUnavailable(f"{where} unavailable after {attempt} attempt(s): "
                                                 f"{exc.message()}") from exc
                    raise SegmentationError(f"{where} failed: {status} {exc.message()}") from exc
                log.warning("Triton %s (%s), retry %d/%d in %.2f s", status, exc.message(), attempt,
                            self.max_attempts - 1, delay)
                self._local.client = None  # reconnect
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray) or batch.ndim < 3:
            raise InvalidInput(f"expected a batch [n, channels, *patch], got {getattr(batch, 'shape', batch)}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        chunks = [batch[i:i + self.max_batch_size] for i in range(0, len(batch), self.max_batch_size)]
        return np.concatenate(list(self._pool.map(self._infer_one, chunks)), 0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class FallbackBackend:
    """``primary`` (Triton) unless it is unavailable after its own retries, then ``fallback``
    (in-process ONNX Runtime on the same model.onnx). Timeouts and invalid input are not masked."""

    def __init__(self, primary: Backend, fallback: Backend, cooldown_s: float = 30.0):
        self.primary, self.fallback = primary, fallback
        self.max_batch_size = primary.max_batch_size
        self.cooldown_s = cooldown_s  # after a failure, skip the primary this long (no retry storm)
        self._primary_down_until = 0.0
        self.fallbacks = 0  # calls served by the fallback

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if time.monotonic() >= self._primary_down_until:
            try:
                return self.primary.infer(batch)
            except BackendUnavailable as exc:
                log.warning("falling back to in-process ONNX Runtime for %.0f s: %s", self.cooldown_s, exc)
                self._primary_down_until = time.monotonic() + self.cooldown_s
        self.fallbacks += 1
        return self.fallback.infer(batch)

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()
