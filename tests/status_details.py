"""Reading the rich error details (AIP-193) of a failed call."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status as grpc_rpc_status

from sessionmanager.v1 import session_pb2, session_service_pb2


def rpc_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The error's ``google.rpc.Status``; fails if there is none or it contradicts the call."""
    status = grpc_rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in the trailers of {error.code()}"
    assert isinstance(status, status_pb2.Status)
    return status


def _unpacked(error: grpc.aio.AioRpcError, kind: type[message.Message]) -> list[message.Message]:
    found = []
    for detail in rpc_status(error).details:
        if detail.Is(kind.DESCRIPTOR):
            unpacked = kind()
            detail.Unpack(unpacked)
            found.append(unpacked)
    return found


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo of the error; fails if there is none or more than one."""
    (info,) = _unpacked(error, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    (retry,) = _unpacked(error, error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo)
    return float(retry.retry_delay.ToTimedelta().total_seconds())


async def next_state(call: Any) -> session_pb2.WhatsAppSession:
    """The next state a WatchSession call receives."""
    response = await call.read()
    assert isinstance(response, session_service_pb2.WatchSessionResponse), response
    return response.session
