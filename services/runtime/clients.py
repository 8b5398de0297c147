"""Calling other CMR-VL services: channels, bearer tokens, deadlines and retries."""

from __future__ import annotations

import json
import logging
import random
import time

import grpc

from services.runtime.interceptors import request_id_var

log = logging.getLogger("cmrvl.client")

# Safe to retry because stage outputs live under deterministic keys.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_BACKOFF_S = 30.0


# Spread calls over every address the target resolves to (a headless Service's pods behind
# `dns:///`, or an `ipv4:a:p,b:p` list), instead of gRPC's default pick_first, which sends every
# call to the first address over one HTTP/2 connection. Client-side health checking (a Watch
# of the server's grpc.health.v1 status) takes out of the rotation an address that answers
# NOT_SERVING (a pod draining for its shutdown) while it is still up.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}})
# Keepalive pings find a dead connection (a pod gone without a FIN, a dropped NAT entry) during a
# long stage call or an idle watch. The servers accept pings this often (server.py
# MIN_CLIENT_PING_INTERVAL_MS, which must stay below this), or they answer GOAWAY too_many_pings.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def open_channel(target: str, max_message_mb: int = 64, tls_root: bytes | None = None) -> grpc.Channel:
    """A channel to `target`: `host:port`, `dns:///host:port` or `ipv4:a:p,b:p` (calls go round
    robin over all the addresses), with keepalive and message-size limits."""
    max_bytes = max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a long call without data
    ]
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
    """The caller stopped wanting the result (e.g. the study was cancelled): the call was cancelled."""


class Backoff:
    """Capped exponential backoff with jitter, for waiting out an outage of `outage_s` seconds.

    The outage clock starts at the first failure and restarts after a success (`reset`)."""

    def __init__(self, base_s: float, max_s: float = MAX_BACKOFF_S, outage_s: float = 600.0):
        self.base_s, self.max_s, self.outage_s = base_s, max_s, outage_s
        self.failures, self.since = 0, None

    def reset(self) -> None:
        self.failures, self.since = 0, None

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None once the outage lasted `outage_s`."""
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since >= self.outage_s:
            return None
        self.failures += 1
        delay = min(self.base_s * 2 ** (self.failures - 1), self.max_s) * (1 + random.random() / 2)
        return max(0.0, min(delay, self.since + self.outage_s - now))

    @property
    def waited_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


def call_with_retry(method, request, *, timeout_s: float, token: str = "", attempts: int = 3,
                    backoff_s: float = 1.0, max_backoff_s: float = MAX_BACKOFF_S, outage_s: float | None = None,
                    what: str = "call", abandon=None, on_attempt=None, on_wait=None):
    """Unary call that waits out outages and stops when abandoned.

    UNAVAILABLE (the service is restarting, a rolling update, its model loading) is retried with
    capped exponential backoff until it has lasted `outage_s` (None: `attempts` tries, as for
    DEADLINE_EXCEEDED); DEADLINE_EXCEEDED (the service ran and was too slow) `attempts` tries. `abandon` (a threading.Event) cancels the call in
    flight and the waits between tries: CallAbandoned. `on_attempt()` runs before each try,
    `on_wait(seconds, reason)` before each wait."""
    outage = Backoff(backoff_s, max_backoff_s, float("inf") if outage_s is None else outage_s)
    slow = 0
    while True:
        if abandon is not None and abandon.is_set():
            raise CallAbandoned(what)
        if on_attempt is not None:
            on_attempt()
        try:
            return _call(method, request, timeout_s, token, abandon, what)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                slow += 1
                outage.reset()  # the service answered: no outage
                if slow >= attempts:
                    raise
                delay = min(backoff_s * 2 ** (slow - 1), max_backoff_s)
            elif code == grpc.StatusCode.UNAVAILABLE:
                delay = outage.next_delay()
                if delay is None or (outage_s is None and outage.failures >= attempts):
                    raise
            else:
                raise
            reason = f"{code.name} ({exc.details()})"
            log.warning("%s: %s, retry in %.1fs (unavailable for %.0fs)", what, reason, delay, outage.waited_s)
            if on_wait is not None:
                on_wait(delay, reason)
            if abandon is not None:
                if abandon.wait(delay):
                    raise CallAbandoned(what) from None
            else:
                time.sleep(delay)


POLL_S = 0.1


def _call(method, request, timeout_s: float, token: str, abandon, what: str):
    if abandon is None:
        return method(request, timeout=timeout_s, metadata=call_metadata(token))
    # As a future, so that an abandoned call is cancelled on the wire (the stage sees its
    # context cancelled) instead of running to its end.
    future = method.future(request, timeout=timeout_s, metadata=call_metadata(token))
    while True:
        try:
            return future.result(timeout=POLL_S)
        except grpc.FutureTimeoutError:
            if abandon.is_set():
                future.cancel()
                raise CallAbandoned(what) from None
