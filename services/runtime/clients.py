"""Calling other CMR-VL services: channels, bearer tokens, deadlines and retries."""

from __future__ import annotations

import logging
import random
import time

import grpc

from services.runtime.interceptors import request_id_var

log = logging.getLogger("cmrvl.client")

# Safe to retry because stage outputs live under deterministic keys.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_BACKOFF_S = 30.0


def open_channel(target: str, max_message_mb: int = 64, tls_root: bytes | None = None) -> grpc.Channel:
    max_bytes = max_message_mb * 1024 * 1024
    options = [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]
    if tls_root is not None:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_root), options=options)
    return grpc.insecure_channel(target, options=options)


def call_metadata(token: str = "") -> tuple[tuple[str, str], ...]:
    metadata = [("x-request-id", request_id_var.get() if request_id_var.get() != "-" else "")]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    return tuple((k, v) for k, v in metadata if v)


def remaining_timeout(context: grpc.ServicerContext | None, default_s: float) -> float:
    """The downstream deadline: ours if the caller set one, never more than `default_s`."""
    remaining = context.time_remaining() if context is not None else None
    return default_s if remaining is None else max(0.001, min(default_s, remaining))


class CallAbandoned(Exception):
    """The caller stopped wanting the result (e.g. the study was cancelled) between retries."""


def call_with_retry(method, request, *, timeout_s: float, token: str = "", attempts: int = 3,
                    backoff_s: float = 1.0, what: str = "call", still_wanted=lambda: True):
    """Unary call with exponential backoff (+ jitter) on UNAVAILABLE / DEADLINE_EXCEEDED."""
    for attempt in range(1, attempts + 1):
        try:
            return method(request, timeout=timeout_s, metadata=call_metadata(token))
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt == attempts:
                raise
            if not still_wanted():
                raise CallAbandoned(what) from exc
            delay = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) * (1 + random.random() / 2)
            log.warning("%s: %s (%s), retry %d/%d in %.1fs", what, exc.code().name, exc.details(),
                        attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
