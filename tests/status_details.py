"""Reading the rich error details (AIP-193) of a failed call."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2

from sessionmanager.v1 import session_pb2, session_service_pb2

DETAILS_KEY = "grpc-status-details-bin"


def rpc_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == DETAILS_KEY:
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no {DETAILS_KEY} in the trailers of {error.code()}")


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
