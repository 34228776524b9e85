"""Contract errors as exceptions: one class per ``ErrorInfo.reason``.

The Session Manager sends every error as a gRPC status plus one
``google.rpc.ErrorInfo`` (in a ``google.rpc.Status``, read with grpcio-status) whose
``reason`` is the contract code and whose ``metadata`` carries the dynamic
values (``instance_id``, often ``status``). ``from_rpc_error`` turns a
``grpc.RpcError`` (sync or ``grpc.aio``) into the matching exception;
``REASONS`` is the one reason -> class mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "sessionmanager.v1"

DetailT = TypeVar("DetailT", bound=Message)


class SessionManagerClientError(Exception):
    """Any failure of a call to the Session Manager.

    ``reason`` is the contract code (``SESSION_NOT_FOUND``) or ``None`` when the
    status carried no ErrorInfo; ``code`` the gRPC status code; ``message`` the
    server's message; ``metadata`` the ErrorInfo metadata.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.code = code
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Seconds to wait before retrying, from a ``google.rpc.RetryInfo``, if sent.
        self.retry_after = retry_after

    @property
    def instance_id(self) -> str | None:
        return self.metadata.get("instance_id")

    @property
    def status(self) -> str | None:
        """The session's status in text form, when the error depends on it."""
        return self.metadata.get("status")

    @property
    def field(self) -> str | None:
        """The invalid request field, for INVALID_ARGUMENT."""
        return self.metadata.get("field")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={self.reason!r}, code={self.code.name}, "
            f"message={self.message!r}, metadata={self.metadata!r})"
        )


class SessionNotFoundError(SessionManagerClientError):
    """SESSION_NOT_FOUND (NOT_FOUND, 404)."""


class InvalidInstanceIdError(SessionManagerClientError):
    """INVALID_INSTANCE_ID (INVALID_ARGUMENT, 400)."""


class InvalidArgumentError(SessionManagerClientError):
    """INVALID_ARGUMENT (INVALID_ARGUMENT, 400); ``field`` names the field."""


class SessionAlreadyConnectedError(SessionManagerClientError):
    """SESSION_ALREADY_CONNECTED (FAILED_PRECONDITION, 409)."""


class SessionNotConnectedError(SessionManagerClientError):
    """SESSION_NOT_CONNECTED (FAILED_PRECONDITION, 409); ``status`` is the current status."""


class QRNotAvailableError(SessionManagerClientError):
    """QR_NOT_AVAILABLE (FAILED_PRECONDITION, 409)."""


class QRGenerationFailedError(SessionManagerClientError):
    """QR_GENERATION_FAILED (INTERNAL, 500)."""


class SessionManagerError(SessionManagerClientError):
    """SESSION_MANAGER_ERROR (INTERNAL, 500)."""


class WhatsAppError(SessionManagerClientError):
    """WHATSAPP_ERROR (UNAVAILABLE, 502)."""


class SessionAlreadyExistsError(SessionManagerClientError):
    """SESSION_ALREADY_EXISTS (ALREADY_EXISTS, 409)."""


class InvalidTransitionError(SessionManagerClientError):
    """INVALID_TRANSITION (FAILED_PRECONDITION, 409); engine reports only."""


class UnauthenticatedError(SessionManagerClientError):
    """UNAUTHENTICATED (UNAUTHENTICATED, 401): no valid bearer token."""


class PermissionDeniedError(SessionManagerClientError):
    """PERMISSION_DENIED (PERMISSION_DENIED, 403): the token is not for this service."""


class LimitExceededError(SessionManagerClientError):
    """LIMIT_EXCEEDED (RESOURCE_EXHAUSTED, 429); ``limit`` names it, ``retry_after`` says when."""

    @property
    def limit(self) -> str | None:
        return self.metadata.get("limit")


class MessageOutcomeUnknownError(SessionManagerClientError):
    """MESSAGE_OUTCOME_UNKNOWN (UNKNOWN, 500): WhatsApp may or may not have the message.

    It is never sent again by itself; ``message_id`` names it. Do not send it
    again without its idempotency key.
    """

    @property
    def message_id(self) -> str | None:
        return self.metadata.get("message_id")


class StorageUnavailableError(SessionManagerClientError):
    """STORAGE_UNAVAILABLE (UNAVAILABLE, 503): the change was not stored; ``cause`` says why."""

    @property
    def cause(self) -> str | None:
        """``disk_full``, ``locked``, ``corrupt``, ``read_only``, ``io_error``, ``unreachable``."""
        return self.metadata.get("cause")


class SessionMovingError(SessionManagerClientError):
    """SESSION_MOVING (UNAVAILABLE, 503): with several nodes, the session is changing owner.

    Nothing was changed; retry after ``retry_after`` seconds.
    """


class CursorExpiredError(SessionManagerClientError):
    """CURSOR_EXPIRED (OUT_OF_RANGE, 410): the events after the stream's cursor are no
    longer kept; start again without a cursor, from the current state."""

    @property
    def trimmed_through(self) -> int | None:
        """The last sequence number the log no longer keeps."""
        value = self.metadata.get("trimmed_through")
        return int(value) if value is not None else None


class MessageNotFoundError(SessionManagerClientError):
    """MESSAGE_NOT_FOUND (NOT_FOUND, 404): the session sent no message with that id."""

    @property
    def message_id(self) -> str | None:
        return self.metadata.get("message_id")


class SessionManagerTimeoutError(SessionManagerClientError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""


class SessionManagerUnavailableError(SessionManagerClientError):
    """The Session Manager could not be reached (UNAVAILABLE without ErrorInfo)."""


#: The one mapping from ``ErrorInfo.reason`` to exception class.
REASONS: dict[str, type[SessionManagerClientError]] = {
    "SESSION_NOT_FOUND": SessionNotFoundError,
    "INVALID_INSTANCE_ID": InvalidInstanceIdError,
    "INVALID_ARGUMENT": InvalidArgumentError,
    "SESSION_ALREADY_CONNECTED": SessionAlreadyConnectedError,
    "SESSION_NOT_CONNECTED": SessionNotConnectedError,
    "QR_NOT_AVAILABLE": QRNotAvailableError,
    "QR_GENERATION_FAILED": QRGenerationFailedError,
    "SESSION_MANAGER_ERROR": SessionManagerError,
    "WHATSAPP_ERROR": WhatsAppError,
    "SESSION_ALREADY_EXISTS": SessionAlreadyExistsError,
    "INVALID_TRANSITION": InvalidTransitionError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "LIMIT_EXCEEDED": LimitExceededError,
    "MESSAGE_OUTCOME_UNKNOWN": MessageOutcomeUnknownError,
    "STORAGE_UNAVAILABLE": StorageUnavailableError,
    "SESSION_MOVING": SessionMovingError,
    "CURSOR_EXPIRED": CursorExpiredError,
    "MESSAGE_NOT_FOUND": MessageNotFoundError,
}

#: Failures that carry no ErrorInfo, by gRPC code.
_TRANSPORT: dict[grpc.StatusCode, type[SessionManagerClientError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: SessionManagerTimeoutError,
    grpc.StatusCode.UNAVAILABLE: SessionManagerUnavailableError,
}


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` a failed call carries, read by grpcio-status.

    ``None`` when there is none, or when it contradicts the call's own code or
    message (then only the code is trusted).
    """
    call: Any = error  # the error of either flavour is also its call (code, details, trailers)
    try:
        status: status_pb2.Status | None = rpc_status.from_call(call)
    except ValueError:
        return None
    return status


def _detail(status: status_pb2.Status | None, kind: type[DetailT]) -> DetailT | None:
    for detail in status.details if status is not None else ():
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of a rich status, if there is one."""
    return _detail(status, error_details_pb2.ErrorInfo)


def retry_after(status: status_pb2.Status | None) -> float | None:
    """The delay of a ``google.rpc.RetryInfo`` in a rich status, in seconds."""
    retry = _detail(status, error_details_pb2.RetryInfo)
    return retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else None


def from_rpc_error(error: grpc.RpcError) -> SessionManagerClientError:
    """The exception for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    status = rich_status(error)
    info = error_info(status)
    if info is not None:
        cls = REASONS.get(info.reason, SessionManagerClientError)
        return cls(
            message,
            reason=info.reason,
            code=code,
            metadata=dict(info.metadata),
            retry_after=retry_after(status),
        )
    cls = _TRANSPORT.get(code, SessionManagerClientError)
    return cls(message or code.name, code=code)
