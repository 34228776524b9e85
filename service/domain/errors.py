"""Contract errors and their mapping to gRPC and HTTP status (AIP-193).

Every error leaves the service as a gRPC status code (or, over HTTP, a status
of the same meaning) with exactly one ``google.rpc.ErrorInfo`` whose
``reason`` is the contract code. This module is the only place that knows the
mapping.
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service.domain.contract import Reason, Status, reason_code, status_text
from sessionmanager.v1 import session_pb2

DOMAIN = "sessionmanager.v1"

#: Each reason's gRPC status code (``google.rpc.Code``) and its HTTP equivalent
#: (CONTRACT.md, Errors).
_STATUS: dict[Reason, tuple[int, int]] = {
    session_pb2.ERROR_REASON_SESSION_NOT_FOUND: (code_pb2.NOT_FOUND, 404),
    session_pb2.ERROR_REASON_INVALID_INSTANCE_ID: (code_pb2.INVALID_ARGUMENT, 400),
    session_pb2.ERROR_REASON_INVALID_ARGUMENT: (code_pb2.INVALID_ARGUMENT, 400),
    session_pb2.ERROR_REASON_SESSION_ALREADY_CONNECTED: (code_pb2.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_SESSION_NOT_CONNECTED: (code_pb2.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_QR_NOT_AVAILABLE: (code_pb2.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_QR_GENERATION_FAILED: (code_pb2.INTERNAL, 500),
    session_pb2.ERROR_REASON_SESSION_MANAGER_ERROR: (code_pb2.INTERNAL, 500),
    session_pb2.ERROR_REASON_WHATSAPP_ERROR: (code_pb2.UNAVAILABLE, 502),
    session_pb2.ERROR_REASON_SESSION_ALREADY_EXISTS: (code_pb2.ALREADY_EXISTS, 409),
    session_pb2.ERROR_REASON_INVALID_TRANSITION: (code_pb2.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_UNAUTHENTICATED: (code_pb2.UNAUTHENTICATED, 401),
    session_pb2.ERROR_REASON_PERMISSION_DENIED: (code_pb2.PERMISSION_DENIED, 403),
    session_pb2.ERROR_REASON_LIMIT_EXCEEDED: (code_pb2.RESOURCE_EXHAUSTED, 429),
    session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE: (code_pb2.UNAVAILABLE, 503),
    session_pb2.ERROR_REASON_MESSAGE_OUTCOME_UNKNOWN: (code_pb2.UNKNOWN, 500),
    session_pb2.ERROR_REASON_SESSION_MOVING: (code_pb2.UNAVAILABLE, 503),
    session_pb2.ERROR_REASON_CURSOR_EXPIRED: (code_pb2.OUT_OF_RANGE, 410),
    session_pb2.ERROR_REASON_MESSAGE_NOT_FOUND: (code_pb2.NOT_FOUND, 404),
}


class ContractError(Exception):
    """An error of the contract: a reason, a message and metadata for ErrorInfo."""

    def __init__(
        self, reason: Reason, message: str, *, retry_after: float | None = None, **metadata: str
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = metadata
        self.retry_after = retry_after

    @property
    def code(self) -> str:
        return reason_code(self.reason)

    @property
    def rpc_code(self) -> int:
        """The gRPC status code, as a ``google.rpc.Code`` number."""
        return _STATUS[self.reason][0]

    @property
    def http_status(self) -> int:
        return _STATUS[self.reason][1]

    def __repr__(self) -> str:
        return f"ContractError({self.code}, {self.message!r}, {self.metadata!r})"


def session_not_found(instance_id: str) -> ContractError:
    return ContractError(
        session_pb2.ERROR_REASON_SESSION_NOT_FOUND,
        f"session {instance_id!r} does not exist",
        instance_id=instance_id,
    )


def invalid_argument(field: str, message: str, instance_id: str = "") -> ContractError:
    error = ContractError(session_pb2.ERROR_REASON_INVALID_ARGUMENT, message, field=field)
    if instance_id:
        error.metadata["instance_id"] = instance_id
    return error


def in_status(reason: Reason, message: str, instance_id: str, status: Status) -> ContractError:
    """An error that depends on the session's status, which travels in the metadata."""
    return ContractError(reason, message, instance_id=instance_id, status=status_text(status))


def session_moving(instance_id: str, why: str, retry_after: float = 1.0) -> ContractError:
    """Several nodes: the session is changing owner, or its owner cannot be reached."""
    return ContractError(
        session_pb2.ERROR_REASON_SESSION_MOVING,
        f"session {instance_id!r} {why}; nothing was changed, retry in {retry_after:g} s",
        retry_after=retry_after,
        instance_id=instance_id,
    )


def internal(message: str) -> ContractError:
    return ContractError(session_pb2.ERROR_REASON_SESSION_MANAGER_ERROR, message)


def to_rpc_status(error: ContractError) -> status_pb2.Status:
    """The ``google.rpc.Status`` carrying the error's one ErrorInfo."""
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=DOMAIN, metadata=error.metadata)
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(max(1, round(error.retry_after * 1000)))
        details.append(any_pb2.Any())
        details[1].Pack(retry)
    return status_pb2.Status(code=error.rpc_code, message=error.message, details=details)


def limit_exceeded(
    limit: str, message: str, retry_after: float, instance_id: str = ""
) -> ContractError:
    error = ContractError(
        session_pb2.ERROR_REASON_LIMIT_EXCEEDED, message, retry_after=retry_after, limit=limit
    )
    if instance_id:
        error.metadata["instance_id"] = instance_id
    return error


def message_not_found(instance_id: str, message_id: str) -> ContractError:
    return ContractError(
        session_pb2.ERROR_REASON_MESSAGE_NOT_FOUND,
        f"session {instance_id!r} sent no message {message_id!r}",
        instance_id=instance_id,
        message_id=message_id,
    )


def cursor_expired(after: int, trimmed: int) -> ContractError:
    """A stream's cursor points at events the log no longer keeps."""
    return ContractError(
        session_pb2.ERROR_REASON_CURSOR_EXPIRED,
        f"the events after sequence {after} are no longer kept (the log was trimmed through "
        f"{trimmed}, past its retention): start again without a cursor, from the current state",
        after_sequence=str(after),
        trimmed_through=str(trimmed),
    )
