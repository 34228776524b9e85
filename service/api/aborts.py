"""Ending a gRPC call with a contract error: its status and its one ErrorInfo (AIP-193)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_status import rpc_status

from service.domain.errors import ContractError, to_rpc_status


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: ContractError) -> None:
    """End the call with ``error``; raises, as ``context.abort`` does."""
    status = rpc_status.to_status(to_rpc_status(error))
    await context.abort_with_status(status)  # type: ignore[attr-defined]  # not in grpc-stubs
