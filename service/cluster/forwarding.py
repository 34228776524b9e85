"""Commands between nodes: the client that forwards them, and the service that takes them.

A node forwards a command for a session another node owns over that node's
``NodeService`` (or ``SimulatorService``), with the internal token. The owner
answers with the public response or its own contract error, which the first
node passes on unchanged. A node that cannot be reached, or a session that
moved on meanwhile, is SESSION_MOVING: nothing was changed, retry.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message as ProtoMessage

from service.api.rpc import FORWARDED_BY
from service.domain import errors
from sessionmanager.v1 import session_pb2
from sessionmanager_client.errors import from_rpc_error

log = logging.getLogger(__name__)

R = TypeVar("R", bound=ProtoMessage)

#: Metadata that marks a call as forwarded by another node: it is never forwarded again.
FORWARDED = FORWARDED_BY
#: How long a forwarded command may take (a Send waits for WhatsApp).
FORWARD_TIMEOUT = 60.0


class Peers:
    """One channel per other node, and the one way to call them."""

    def __init__(
        self,
        node_id: str,
        token: bytes | None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._node_id = node_id
        self._credentials = credentials
        self._metadata: tuple[tuple[str, str], ...] = ((FORWARDED, node_id),)
        if token is not None:
            self._metadata += (("authorization", f"Bearer {token.decode()}"),)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials)
            self._channels[address] = channel
        return channel

    async def call(
        self, address: str, method: str, request: ProtoMessage, response: type[R], instance_id: str
    ) -> R:
        """Call ``method`` (``/package.Service/Method``) on the node at ``address``."""
        multicallable = self._channel(address).unary_unary(
            method,
            request_serializer=_serialize,
            response_deserializer=response.FromString,
        )
        try:
            answer: R = await multicallable(
                request, metadata=self._metadata, timeout=FORWARD_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            raise _contract_error(error, instance_id, address) from None
        return answer

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _contract_error(error: grpc.aio.AioRpcError, instance_id: str, address: str) -> Exception:
    """The owner's contract error as it sent it; a node out of reach is SESSION_MOVING."""
    failure = from_rpc_error(error)
    if failure.reason is None:
        log.warning("forwarding to %s failed: %s %s", address, error.code().name, error.details())
        return errors.session_moving(
            instance_id, f"is owned by a node that cannot be reached now ({address})"
        )
    reason = session_pb2.ErrorReason.Value(f"ERROR_REASON_{failure.reason}")
    return errors.ContractError(
        reason, failure.message, retry_after=failure.retry_after, **failure.metadata
    )
