"""Exceptions that map one-to-one to protocol error codes.

Catch `StokerError` for anything stoker raises, or a subclass for one wire error code.
"""

from __future__ import annotations

from stoker.protocol.messages import ErrorCode, RequestId


class StokerError(Exception):
    """Base of every stoker error. `code` is the wire error code, `request_id` the request's id."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class ProtocolError(StokerError):
    """A message that breaks the protocol."""

    code = ErrorCode.BAD_REQUEST


class BadRequest(ProtocolError):
    """The request is malformed or asks for something impossible (e.g. a prompt past the context)."""

    code = ErrorCode.BAD_REQUEST


class UnsupportedVersion(ProtocolError):
    """The request's `v` is not a version this supervisor speaks."""

    code = ErrorCode.UNSUPPORTED_VERSION


class ModelError(StokerError):
    """Something went wrong with the model itself (CLI exit code 3)."""


class UnknownModel(ModelError):
    code = ErrorCode.UNKNOWN_MODEL


class LoadFailed(ModelError):
    code = ErrorCode.LOAD_FAILED


class WorkerCrashed(ModelError):
    code = ErrorCode.WORKER_CRASHED


class InsufficientMemory(ModelError):
    code = ErrorCode.INSUFFICIENT_MEMORY


class Overloaded(StokerError):
    """The model's queue is full; retry later."""

    code = ErrorCode.OVERLOADED


class ShuttingDown(StokerError):
    """The supervisor is stopping and takes no new work."""

    code = ErrorCode.SHUTTING_DOWN


class Timeout(StokerError):
    code = ErrorCode.TIMEOUT


class Internal(StokerError):
    code = ErrorCode.INTERNAL


class Cancelled(StokerError):
    """The request was cancelled by this client before it ended (client side only)."""

    code = ErrorCode.INTERNAL


class Unreachable(StokerError):
    """No supervisor answered at the endpoint (client side only; never on the wire)."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[StokerError]] = {
    cls.code.value: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownModel,
        LoadFailed,
        WorkerCrashed,
        InsufficientMemory,
        Overloaded,
        ShuttingDown,
        Timeout,
        Internal,
    )
}


def error_for_code(code: str, message: str, request_id: RequestId = None) -> StokerError:
    """The exception for a wire error code; unknown codes (a later version's) become Internal."""
    return _BY_CODE.get(code, Internal)(message, request_id)
