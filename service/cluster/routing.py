"""Any node answers any call: reads from the shared store, commands where the owner is.

``ClusterSessions`` answers the transports as ``SessionManager`` does on one
node. A command for a session this node owns (or should, and can take now)
runs here; otherwise it is forwarded to the owner's ``NodeService``, whose
``ClusterSessions(forward=False)`` runs it only if that node owns the session.
A local command that meets SESSION_MOVING (the session left this node while
the command waited) is routed once more: SESSION_MOVING promises that nothing
was changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message as ProtoMessage

from service.cluster import wire
from service.cluster.feed import Feed
from service.cluster.forwarding import Peers
from service.cluster.node import Local, Node
from service.domain import errors
from service.domain.contract import Status
from service.domain.event_stream import EventStream, Opened
from service.domain.events import EventFilter
from service.domain.sending import SendResult
from service.domain.sessions import SessionManager
from service.domain.states import Session, SessionEvent, SessionRef
from service.domain.watch import Watcher
from service.engine.port import EngineError
from service.store.messages import Message
from service.store.postgres import Store
from sessionmanager.v1 import node_service_pb2 as node_pb
from sessionmanager.v1 import session_pb2
from sessionmanager.v1 import session_service_pb2 as pb

T = TypeVar("T")
R = TypeVar("R", bound=ProtoMessage)

NODE_SERVICE = "/sessionmanager.v1.NodeService/"
#: Failures of the engine side that a hand-over in the middle of the call explains.
_ENGINE_FAILURES = (
    session_pb2.ERROR_REASON_QR_GENERATION_FAILED,
    session_pb2.ERROR_REASON_SESSION_MANAGER_ERROR,
)


class ClusterSessions:
    """The sessions as one node of several answers for them."""

    def __init__(
        self,
        manager: SessionManager,
        node: Node,
        store: Store,
        feed: Feed,
        peers: Peers,
        *,
        forward: bool = True,
    ) -> None:
        self._manager = manager
        self._node = node
        self._store = store
        self._feed = feed
        self._peers = peers
        self._forward = forward

    def owner_only(self) -> ClusterSessions:
        """The same sessions for NodeService: commands run here or not at all."""
        return ClusterSessions(
            self._manager, self._node, self._store, self._feed, self._peers, forward=False
        )

    # Reads.

    async def get(self, instance_id: str) -> Session:
        if self._manager.holds(instance_id):
            return await self._manager.get(instance_id)
        session = await self._store.get_session(instance_id)
        if session is None:
            raise errors.session_not_found(instance_id)
        return session

    async def ref(self, instance_id: str) -> SessionRef:
        return (await self.get(instance_id)).ref

    async def list(
        self, page_size: int, after: str, status: Status | None
    ) -> tuple[list[Session], str | None]:
        return await self._manager.list(page_size, after, status)

    async def watch(self, instance_id: str) -> Watcher[Session]:
        return await self._feed.watch(instance_id, await self.get(instance_id))

    def unwatch(self, instance_id: str, watcher: Watcher[Session]) -> None:
        self._feed.unwatch(instance_id, watcher)

    async def watch_events(self, selected: EventFilter, after: int | None) -> Opened:
        """The event log is the database's: any node streams all of it, in commit order."""
        return await self._manager.watch_events(selected, after)

    def unwatch_events(self, stream: EventStream) -> None:
        self._manager.unwatch_events(stream)

    async def get_message(self, instance_id: str, message_id: str) -> Message:
        if self._manager.holds(instance_id):  # it may know an outcome not stored yet
            return await self._manager.get_message(instance_id, message_id)
        await self.get(instance_id)
        message = await self._store.get_message(instance_id, message_id)
        if message is None:
            raise errors.message_not_found(instance_id, message_id)
        return message

    def status_counts(self) -> dict[str, int]:
        """The sessions this node owns, by status."""
        return self._manager.status_counts()

    def watcher_count(self) -> int:
        """Open watch streams: of one session, and of the event log."""
        return self._feed.hub.count() + self._manager.events.count()

    def close_watches(self) -> None:
        self._feed.close_watches()

    # Commands.

    async def create(self, instance_id: str) -> Session:
        request = pb.CreateSessionRequest(instance_id=instance_id)
        response = await self._command(
            instance_id,
            lambda: self._create_here(instance_id),
            "CreateSession",
            node_pb.NodeServiceCreateSessionRequest(request=request),
            node_pb.NodeServiceCreateSessionResponse,
            creating=True,
        )
        if isinstance(response, Session):
            return response
        return wire.session_from_message(response.response.session)

    async def delete(self, instance_id: str) -> None:
        request = pb.DeleteSessionRequest(instance_id=instance_id)
        await self._command(
            instance_id,
            lambda: self._delete_here(instance_id),
            "DeleteSession",
            node_pb.NodeServiceDeleteSessionRequest(request=request),
            node_pb.NodeServiceDeleteSessionResponse,
        )

    async def _delete_here(self, instance_id: str) -> None:
        async with self._node.session_lock(instance_id):  # no creation in between
            await self._manager.delete(instance_id)
            await self._node.forget(instance_id)

    async def _create_here(self, instance_id: str) -> Session:
        async with self._node.session_lock(instance_id):
            try:
                return await self._manager.create(instance_id)
            except BaseException:
                if not self._manager.holds(instance_id):  # no session: its lease goes too
                    await self._node.forget(instance_id)
                raise

    async def request_qr(self, instance_id: str) -> Session:
        request = pb.RequestQRRequest(instance_id=instance_id)
        response = await self._command(
            instance_id,
            lambda: self._manager.request_qr(instance_id),
            "RequestQR",
            node_pb.NodeServiceRequestQRRequest(request=request),
            node_pb.NodeServiceRequestQRResponse,
        )
        if isinstance(response, Session):
            return response
        return wire.session_from_message(response.response.session)

    async def pair_phone(self, instance_id: str, phone_number: str) -> tuple[str, Session]:
        request = pb.PairPhoneRequest(instance_id=instance_id, phone_number=phone_number)
        response = await self._command(
            instance_id,
            lambda: self._manager.pair_phone(instance_id, phone_number),
            "PairPhone",
            node_pb.NodeServicePairPhoneRequest(request=request),
            node_pb.NodeServicePairPhoneResponse,
        )
        if isinstance(response, tuple):
            return response
        answer = response.response
        return answer.linking_code, wire.session_from_message(answer.session)

    async def send(
        self, instance_id: str, to: str, text: str, idempotency_key: str | None
    ) -> SendResult:
        request = pb.SendRequest(
            instance_id=instance_id, to=to, text=text, idempotency_key=idempotency_key
        )
        response = await self._command(
            instance_id,
            lambda: self._manager.send(instance_id, to, text, idempotency_key),
            "Send",
            node_pb.NodeServiceSendRequest(request=request),
            node_pb.NodeServiceSendResponse,
        )
        if isinstance(response, SendResult):
            return response
        return wire.send_result_from_response(response.response, request, session_id=0)

    async def disconnect(self, instance_id: str) -> Session:
        request = pb.DisconnectRequest(instance_id=instance_id)
        response = await self._command(
            instance_id,
            lambda: self._manager.disconnect(instance_id),
            "Disconnect",
            node_pb.NodeServiceDisconnectRequest(request=request),
            node_pb.NodeServiceDisconnectResponse,
        )
        if isinstance(response, Session):
            return response
        return wire.session_from_message(response.response.session)

    async def report_current(self, instance_id: str, event: SessionEvent) -> Session:
        """An engine side's report: only the owner's engine can make one."""
        if not self._manager.holds(instance_id):
            await self.get(instance_id)  # SESSION_NOT_FOUND first, if that is the case
            raise errors.session_moving(instance_id, "is owned by another node")
        return await self._manager.report_current(instance_id, event)

    async def _command(
        self,
        instance_id: str,
        here: Callable[[], Awaitable[T]],
        method: str,
        request: ProtoMessage,
        response: type[R],
        *,
        creating: bool = False,
    ) -> T | R:
        """Run ``here`` if this node owns the session, else forward ``request`` to the owner."""
        for attempt in (1, 2):
            where = await self._node.route(instance_id, creating=creating)
            if isinstance(where, Local):
                try:
                    return await self.here(instance_id, here)
                except errors.ContractError as error:
                    moving = error.reason == session_pb2.ERROR_REASON_SESSION_MOVING
                    if moving and self._forward and attempt == 1:
                        continue
                    raise
            if not self._forward:
                raise errors.session_moving(instance_id, "is owned by another node")
            return await self._peers.call(
                where.address, NODE_SERVICE + method, request, response, instance_id
            )
        raise errors.session_moving(instance_id, "is moving between nodes")

    async def here(self, instance_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` on this node; a failure because the session left meanwhile is moving.

        A worker stopped by a hand-over fails the call under way (the engine's
        error, or a code that could not be shown); when the session is no
        longer here afterwards, the answer is SESSION_MOVING. Outcomes that
        are known to the contract (a message's unknown outcome) stay as they are.
        """
        try:
            return await call()
        except (EngineError, errors.ContractError) as error:
            engine_side = isinstance(error, EngineError) or error.reason in _ENGINE_FAILURES
            if engine_side and not self._manager.holds(instance_id):
                raise errors.session_moving(instance_id, "moved to another node") from error
            raise

    async def forward_simulator(
        self, instance_id: str, method: str, request: ProtoMessage, response: type[R]
    ) -> R | None:
        """Forward a SimulatorService call to the owner's simulated phone; None if it is here."""
        if not self._forward:
            if self._manager.holds(instance_id):
                return None
            raise errors.session_moving(instance_id, "is owned by another node")
        where = await self._node.route(instance_id)
        if isinstance(where, Local):
            return None
        return await self._peers.call(where.address, method, request, response, instance_id)
