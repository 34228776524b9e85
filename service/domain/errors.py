"""Contract errors and their mapping to gRPC and HTTP status (AIP-193).

Every error leaves the service as a gRPC status code (or, over HTTP, a status
of the same meaning) with exactly one ``google.rpc.ErrorInfo`` whose
``reason`` is the contract code. This module is the only place that knows the
mapping.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.domain.contract import Reason, Status, reason_code, status_text
from sessionmanager.v1 import session_pb2

DOMAIN = "sessionmanager.v1"

#: Each reason's gRPC status code and its HTTP equivalent (CONTRACT.md, Errors).
_STATUS: dict[Reason, tuple[grpc.StatusCode, int]] = {
    session_pb2.ERROR_REASON_SESSION_NOT_FOUND: (grpc.StatusCode.NOT_FOUND, 404),
    session_pb2.ERROR_REASON_INVALID_INSTANCE_ID: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    session_pb2.ERROR_REASON_INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    session_pb2.ERROR_REASON_SESSION_ALREADY_CONNECTED: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_SESSION_NOT_CONNECTED: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_QR_NOT_AVAILABLE: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_QR_GENERATION_FAILED: (grpc.StatusCode.INTERNAL, 500),
    session_pb2.ERROR_REASON_SESSION_MANAGER_ERROR: (grpc.StatusCode.INTERNAL, 500),
    session_pb2.ERROR_REASON_WHATSAPP_ERROR: (grpc.StatusCode.UNAVAILABLE, 502),
    session_pb2.ERROR_REASON_SESSION_ALREADY_EXISTS: (grpc.StatusCode.ALREADY_EXISTS, 409),
    session_pb2.ERROR_REASON_INVALID_TRANSITION: (grpc.StatusCode.FAILED_PRECONDITION, 409),
    session_pb2.ERROR_REASON_UNAUTHENTICATED: (grpc.StatusCode.UNAUTHENTICATED, 401),
    session_pb2.ERROR_REASON_PERMISSION_DENIED: (grpc.StatusCode.PERMISSION_DENIED, 403),
    session_pb2.ERROR_REASON_LIMIT_EXCEEDED: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, 503),
    session_pb2.ERROR_REASON_MESSAGE_OUTCOME_UNKNOWN: (grpc.StatusCode.UNKNOWN, 500),
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
    def grpc_code(self) -> grpc.StatusCode:
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
    return status_pb2.Status(code=error.grpc_code.value[0], message=error.message, details=details)


def limit_exceeded(
    limit: str, message: str, retry_after: float, instance_id: str = ""
) -> ContractError:
    error = ContractError(
        session_pb2.ERROR_REASON_LIMIT_EXCEEDED, message, retry_after=retry_after, limit=limit
    )
    if instance_id:
        error.metadata["instance_id"] = instance_id
    return error


def to_grpc_status(error: ContractError) -> grpc.Status:
    """The status a servicer aborts with (``context.abort_with_status``)."""
    return rpc_status.to_status(to_rpc_status(error))
