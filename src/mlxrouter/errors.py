"""The one exception hierarchy of mlxrouter and the one place it becomes OpenAI error JSON.

Runs in the daemon (gateway) and is imported by workers for error codes; imports nothing heavy.
Worker failures cross the process boundary as `protocol.Error(rid, code, message)` and come back
as these classes through `from_code`.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class RouterError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"
    retry_after_s: ClassVar[float | None] = None
    should_retry: ClassVar[bool | None] = None

    def __init__(self, message: str, *, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidRequest(RouterError):
    status, error_type, code = 400, "invalid_request_error", "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(RouterError):
    status, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(RouterError):
    status, error_type, code = 403, "permission_error", "forbidden"


class ModelNotFound(RouterError):
    status, error_type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(RouterError):
    status, error_type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(RouterError):
    status, error_type, code = 405, "invalid_request_error", "method_not_allowed"


class BodyTooLarge(RouterError):
    status, error_type, code = 413, "invalid_request_error", "request_too_large"


class BodyTimeout(RouterError):
    status, error_type, code = 408, "invalid_request_error", "request_timeout"


class ClientGone(RouterError):
    """The client closed its connection before its request was read (nobody gets this)."""

    status, error_type, code = 499, "invalid_request_error", "client_closed_request"


class QueueFull(RouterError):
    status, error_type, code, retry_after_s = 429, "rate_limit_error", "queue_full", 1


class WorkerCrashed(RouterError):
    status, code = 502, "worker_crashed"


class ModelLoadFailed(RouterError):
    status, code, retry_after_s = 503, "model_load_failed", 5


class NoMemory(RouterError):
    status, code, retry_after_s = 503, "no_memory", 5


class InsufficientMemory(RouterError):
    """The model cannot fit even with nothing else loaded: retrying will not help."""

    status, code, should_retry = 503, "insufficient_memory", False


class ModelUnavailable(RouterError):
    """The model is FATAL (failed to start too often, or crash-looped) until `ctl start`."""

    status, code, should_retry = 503, "model_unavailable", False


class ModelStopped(ModelUnavailable):
    """`ctl stop` while the request waited for the model: a new request loads it again, so a
    retry may (it was "do not retry")."""

    should_retry = True


class ShuttingDown(RouterError):
    status, code, retry_after_s = 503, "shutting_down", 5


class Timeout(RouterError):
    status, code = 504, "timeout"


class OutOfMemory(RouterError):
    status, code, retry_after_s = 503, "out_of_memory", 1


class ConstraintFailed(RouterError):
    """Constrained decoding went wrong inside the grammar matcher; the worker lives on."""

    code = "constraint_failed"
    should_retry = False  # the same request meets the same grammar: an SDK retry fails again


# Codes a worker may send in protocol.Error, mapped back to the class the gateway raises.
_BY_CODE: dict[str, type[RouterError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ContextLengthExceeded,
        WorkerCrashed,
        ModelLoadFailed,
        NoMemory,
        Timeout,
        OutOfMemory,
        ConstraintFailed,
    )
}


def from_code(code: str, message: str, param: str | None = None) -> RouterError:
    """The gateway-side exception for an Error a worker sent."""
    return _BY_CODE.get(code, RouterError)(message, param=param)


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def error_body(exc: RouterError) -> ErrorBody:
    return ErrorBody(ErrorDetail(exc.message, exc.error_type, exc.param, exc.code))


def error_headers(exc: RouterError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if exc.should_retry is not None:
        headers["x-should-retry"] = "true" if exc.should_retry else "false"
    return headers
