"""Map the stage logic's exceptions to gRPC status codes, in one place."""

from __future__ import annotations

import functools
import logging

import grpc

from services.runtime.storage import ObjectNotFound, StorageAuthError

log = logging.getLogger("cmrvl.errors")


class StageError(Exception):
    """An error that already knows its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, StageError):
        return exc.code
    if isinstance(exc, ObjectNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, StorageAuthError):
        return grpc.StatusCode.INTERNAL  # our credentials, not the caller's
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, ConnectionError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, (ValueError, KeyError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def grpc_errors(method):
    """Decorator for servicer methods: exceptions become status codes with a clear message."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the caller as a status
            if context.code() not in (None, grpc.StatusCode.OK):
                raise  # the method already aborted with its own status
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", method.__name__)
            message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0] if exc.args else exc)
            context.abort(code, message or type(exc).__name__)

    return wrapper
