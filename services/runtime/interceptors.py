"""Server interceptors every service installs: request id + logging + metrics, and auth."""

from __future__ import annotations

import contextvars
import hmac
import logging
import time
import uuid

import grpc
from prometheus_client import Counter, Histogram

log = logging.getLogger("cmrvl.rpc")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

RPC_TOTAL = Counter("cmrvl_rpc_total", "Finished RPCs", ["method", "code"])
RPC_SECONDS = Histogram(
    "cmrvl_rpc_seconds", "RPC latency", ["method"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900),
)

# Callable without credentials: Kubernetes probes and tooling.
UNAUTHENTICATED_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class RequestIdFilter(logging.Filter):
    """Adds the current call's request id to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def _wrap(handler: grpc.RpcMethodHandler, around) -> grpc.RpcMethodHandler:
    """Return `handler` with its behaviour function replaced by `around(behaviour)`."""
    for kind, factory in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return factory(
                around(behaviour, streaming_response=handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request id (from `x-request-id` metadata or new), one log line per call, metrics."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        metadata = dict(details.invocation_metadata or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]

        def around(behaviour, streaming_response):
            def finish(context, started, error):
                code = context.code() if hasattr(context, "code") else None
                if code is None:
                    code = grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                elapsed = time.perf_counter() - started
                RPC_TOTAL.labels(method, name).inc()
                RPC_SECONDS.labels(method).observe(elapsed)
                log.info("%s %s %.3fs", method, name, elapsed)

            def unary(request, context):
                token = request_id_var.set(request_id)
                context.set_trailing_metadata((("x-request-id", request_id),))
                started, error = time.perf_counter(), None
                try:
                    return behaviour(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, started, error)
                    request_id_var.reset(token)

            def streaming(request, context):
                token = request_id_var.set(request_id)
                context.set_trailing_metadata((("x-request-id", request_id),))
                started, error = time.perf_counter(), None
                try:
                    yield from behaviour(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, started, error)
                    request_id_var.reset(token)

            return streaming if streaming_response else unary

        return _wrap(handler, around)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <one of tokens>` as UNAUTHENTICATED."""

    def __init__(self, tokens: frozenset[str]):
        self._tokens = tuple(t.encode() for t in tokens)

    def _allowed(self, metadata) -> bool:
        value = dict(metadata or ()).get("authorization", "")
        scheme, _, presented = value.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        presented_bytes = presented.strip().encode()
        # Constant-time comparison against every accepted token.
        return any(hmac.compare_digest(presented_bytes, t) for t in self._tokens)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        if self._allowed(details.invocation_metadata):
            return handler

        def around(behaviour, streaming_response):
            def deny(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

            return deny

        return _wrap(handler, around)
