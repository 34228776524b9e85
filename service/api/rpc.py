"""The gRPC servicers: request validation, the call into the domain, the reply.

Contract errors become a gRPC status with one ErrorInfo (``errors``); anything
unexpected becomes SESSION_MANAGER_ERROR and is logged, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from service.api.aborts import abort
from service.api.resources import event_proto, message_proto, session_message, timestamp
from service.domain import errors, states, validation
from service.domain.contract import (
    DELIVERED,
    FAILED,
    READ,
    MessageStatus,
    Status,
    event_type_text,
    message_status_text,
    status_text,
)
from service.domain.event_stream import Opened
from service.domain.events import Event
from service.domain.facade import Sessions
from service.domain.sending import SendResult
from service.domain.states import Session, SessionEvent, SessionRef
from service.domain.watch import WatchClosed
from service.engine.port import EngineError, Phone
from service.store import failures
from sessionmanager.v1 import (
    engine_service_pb2 as engine_pb,
)
from sessionmanager.v1 import (
    engine_service_pb2_grpc,
    node_service_pb2_grpc,
    session_pb2,
    session_service_pb2_grpc,
    simulator_service_pb2_grpc,
)
from sessionmanager.v1 import (
    node_service_pb2 as node_pb,
)
from sessionmanager.v1 import (
    session_service_pb2 as pb,
)
from sessionmanager.v1 import (
    simulator_service_pb2 as sim_pb,
)

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[Any, Any]

#: Seconds a list-wide stream idles before it sends a checkpoint (``SessionService(idle=)``).
IDLE_CHECKPOINT = 15.0
_EVENT_TYPES = {number for number in pb.EventType.values() if number != 0}
_DISCONNECT_REASONS = {
    session_pb2.DISCONNECT_REASON_LOGOUT,
    session_pb2.DISCONNECT_REASON_NETWORK,
    session_pb2.DISCONNECT_REASON_TIMEOUT,
    session_pb2.DISCONNECT_REASON_UNKNOWN,
}


@functools.lru_cache(maxsize=4096)
def _get_response(s: Session) -> pb.GetSessionResponse:
    """GetSession's reply for a committed state, built once and shared: never modify it."""
    return pb.GetSessionResponse(session=session_message(s))


@functools.lru_cache(maxsize=1024)
def _qr_response(s: Session) -> pb.RequestQRResponse:
    """RequestQR's reply for a state that shows a code, built once and shared: never modify it.

    Building it copies the code's PNG data URL twice and converts its expiry: 7 µs of
    each call that returns the same code again.
    """
    assert s.qr_string is not None
    assert s.qr_expires_at is not None
    return pb.RequestQRResponse(
        qr_string=s.qr_string,
        qr_expires_at=timestamp(s.qr_expires_at),
        session=session_message(s),
    )


@functools.lru_cache(maxsize=1024)
def _watch_response(s: Session) -> pb.WatchSessionResponse:
    """One message per committed state, shared by all of its watchers."""
    return pb.WatchSessionResponse(session=session_message(s))


def _unexpected(error: Exception) -> errors.ContractError:
    storage = failures.storage_unavailable(error)
    if storage is not None:  # the operator can act on it: one line, no traceback
        log.error("%s", storage.message)
        return storage
    log.exception("unexpected failure", exc_info=error)
    return errors.internal(f"the Session Manager failed: {type(error).__name__}")


def unary(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Turn contract errors, and anything unexpected, into the contract's status."""

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except errors.ContractError as error:
            await abort(context, error)
        except Exception as error:  # noqa: BLE001 - the contract's SESSION_MANAGER_ERROR
            await abort(context, _unexpected(error))
        raise AssertionError("unreachable: abort raises")

    return handler


class SessionService(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, manager: Sessions, idle: float = IDLE_CHECKPOINT) -> None:
        self._manager = manager
        #: Seconds a list-wide stream idles before it sends how far it has read the log.
        self._idle = idle

    @unary
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        session = await self._manager.get(validation.instance_id(request.instance_id))
        return _get_response(session)

    @unary
    async def RequestQR(
        self, request: pb.RequestQRRequest, context: Context
    ) -> pb.RequestQRResponse:
        session = await self._manager.request_qr(validation.instance_id(request.instance_id))
        return _qr_response(session)

    @unary
    async def PairPhone(
        self, request: pb.PairPhoneRequest, context: Context
    ) -> pb.PairPhoneResponse:
        iid = validation.instance_id(request.instance_id)
        phone = validation.phone_number(request.phone_number, iid=iid)
        code, session = await self._manager.pair_phone(iid, phone)
        return pb.PairPhoneResponse(linking_code=code, session=session_message(session))

    @unary
    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        iid = validation.instance_id(request.instance_id)
        to = validation.recipient(request.to, iid)
        text = validation.text(request.text, iid)
        key = (
            validation.idempotency_key(request.idempotency_key, iid)
            if request.HasField("idempotency_key")
            else None
        )
        return _send_response(await self._manager.send(iid, to, text, key))

    @unary
    async def Disconnect(
        self, request: pb.DisconnectRequest, context: Context
    ) -> pb.DisconnectResponse:
        session = await self._manager.disconnect(validation.instance_id(request.instance_id))
        return pb.DisconnectResponse(session=session_message(session))

    async def WatchSession(
        self, request: pb.WatchSessionRequest, context: Context
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        try:
            iid = validation.instance_id(request.instance_id)
            watcher = await self._manager.watch(iid)
        except errors.ContractError as error:
            await abort(context, error)
            return
        try:
            while True:
                yield _watch_response(await watcher.next())
        except WatchClosed as closed:
            if closed.deleted:
                await abort(context, errors.session_not_found(iid))
            await context.abort(grpc.StatusCode.UNAVAILABLE, closed.why)
        finally:
            self._manager.unwatch(iid, watcher)

    async def WatchSessions(
        self, request: pb.WatchSessionsRequest, context: Context
    ) -> AsyncIterator[pb.WatchSessionsResponse]:
        try:
            selected = validation.event_filter(
                status_text(request.status) if request.HasField("status") else None,
                request.instance_id_prefix,
                [_event_type(number) for number in request.types],
            )
            after = request.after_sequence if request.HasField("after_sequence") else None
            opened = await self._manager.watch_events(selected, after)
        except errors.ContractError as error:
            await abort(context, error)
            return
        except Exception as error:  # noqa: BLE001 - the contract's error for it
            await abort(context, _unexpected(error))
            return
        try:
            async for item in _stream_items(opened, self._idle):
                yield item
        except WatchClosed as closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, closed.why)
        except errors.ContractError as error:  # the log was trimmed past this reader
            await abort(context, error)
        except Exception as error:  # noqa: BLE001 - the contract's error for it
            await abort(context, _unexpected(error))
        finally:
            self._manager.unwatch_events(opened.stream)

    @unary
    async def GetMessage(
        self, request: pb.GetMessageRequest, context: Context
    ) -> pb.GetMessageResponse:
        iid = validation.instance_id(request.instance_id)
        message_id = validation.message_id(request.message_id, iid)
        message = await self._manager.get_message(iid, message_id)
        return pb.GetMessageResponse(message=message_proto(message))

    @unary
    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        session = await self._manager.create(validation.instance_id(request.instance_id))
        return pb.CreateSessionResponse(session=session_message(session))

    @unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        size = validation.page_size(request.page_size)
        after = validation.page_token(request.page_token)
        status: Status | None = None
        if request.HasField("status"):
            status = validation.enum_value(  # type: ignore[assignment]
                request.status, set(session_pb2.SessionStatus.values()), "status"
            )
        sessions, last = await self._manager.list(size, after, status)
        return pb.ListSessionsResponse(
            sessions=[session_message(s) for s in sessions],
            next_page_token=validation.encode_page_token(last) if last is not None else "",
        )

    @unary
    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        await self._manager.delete(validation.instance_id(request.instance_id))
        return pb.DeleteSessionResponse()


def _event_type(number: int) -> str:
    if number not in _EVENT_TYPES:
        raise errors.invalid_argument("types", f"types has no valid value ({number})")
    return event_type_text(number)  # type: ignore[arg-type]


async def _stream_items(opened: Opened, idle: float) -> AsyncIterator[pb.WatchSessionsResponse]:
    """A list-wide stream's items: the current state and its checkpoint (without a cursor),
    then each event; a checkpoint when it idles past events that did not match."""
    stream = opened.stream
    if opened.current is not None:
        for session in opened.current:
            yield _state_response(session)
        yield _checkpoint(opened.position)
    sent = opened.position
    while True:
        try:
            async with asyncio.timeout(idle):
                event = await stream.next()
        except TimeoutError:
            if stream.position > sent:
                sent = stream.position
                yield _checkpoint(sent)
            continue
        sent = event.sequence
        yield _event_response(event)


def _state_response(session: Session) -> pb.WatchSessionsResponse:
    return pb.WatchSessionsResponse(session=session_message(session))


def _checkpoint(sequence: int) -> pb.WatchSessionsResponse:
    return pb.WatchSessionsResponse(checkpoint=pb.Checkpoint(sequence=sequence))


@functools.lru_cache(maxsize=1024)
def _event_response(event: Event) -> pb.WatchSessionsResponse:
    """One message per event, shared by all of its readers."""
    return pb.WatchSessionsResponse(event=event_proto(event))


def _send_response(result: SendResult) -> pb.SendResponse:
    message = result.message
    response = pb.SendResponse(
        message_id=message.id,
        status=message.status,
        accepted_at=timestamp(message.accepted_at),
        replayed=result.replayed,
    )
    if message.whatsapp_message_id is not None:
        response.whatsapp_message_id = message.whatsapp_message_id
    return response


class NodeService(node_service_pb2_grpc.NodeServiceServicer):
    """Commands forwarded by the other nodes: run here, by the session's owner, or refused.

    Each one is the public call it wraps, answered by ``SessionService`` over
    sessions that never forward (``ClusterSessions.owner_only``).
    """

    def __init__(self, owner_only: Sessions) -> None:
        self._public = SessionService(owner_only)

    async def CreateSession(
        self, request: node_pb.NodeServiceCreateSessionRequest, context: Context
    ) -> node_pb.NodeServiceCreateSessionResponse:
        response = await self._public.CreateSession(request.request, context)
        return node_pb.NodeServiceCreateSessionResponse(response=response)

    async def DeleteSession(
        self, request: node_pb.NodeServiceDeleteSessionRequest, context: Context
    ) -> node_pb.NodeServiceDeleteSessionResponse:
        response = await self._public.DeleteSession(request.request, context)
        return node_pb.NodeServiceDeleteSessionResponse(response=response)

    async def RequestQR(
        self, request: node_pb.NodeServiceRequestQRRequest, context: Context
    ) -> node_pb.NodeServiceRequestQRResponse:
        response = await self._public.RequestQR(request.request, context)
        return node_pb.NodeServiceRequestQRResponse(response=response)

    async def PairPhone(
        self, request: node_pb.NodeServicePairPhoneRequest, context: Context
    ) -> node_pb.NodeServicePairPhoneResponse:
        response = await self._public.PairPhone(request.request, context)
        return node_pb.NodeServicePairPhoneResponse(response=response)

    async def Send(
        self, request: node_pb.NodeServiceSendRequest, context: Context
    ) -> node_pb.NodeServiceSendResponse:
        response = await self._public.Send(request.request, context)
        return node_pb.NodeServiceSendResponse(response=response)

    async def Disconnect(
        self, request: node_pb.NodeServiceDisconnectRequest, context: Context
    ) -> node_pb.NodeServiceDisconnectResponse:
        response = await self._public.Disconnect(request.request, context)
        return node_pb.NodeServiceDisconnectResponse(response=response)


class EngineService(engine_service_pb2_grpc.EngineServiceServicer):
    """The internal reports of the engine side, over gRPC: each one is an engine event."""

    def __init__(self, manager: Sessions) -> None:
        self._manager = manager

    async def _report(self, instance_id: str, event: SessionEvent) -> session_pb2.WhatsAppSession:
        """Commit ``event`` on the current incarnation of ``instance_id``."""
        session = await self._manager.report_current(instance_id, event)
        return session_message(session)

    @unary
    async def ReportQRCode(
        self, request: engine_pb.ReportQRCodeRequest, context: Context
    ) -> engine_pb.ReportQRCodeResponse:
        iid = validation.instance_id(request.instance_id)
        code = validation.pairing_code(request.code, iid)
        if not request.HasField("expires_at"):
            raise errors.invalid_argument("expires_at", "expires_at is required", iid)
        expires_at = validation.timestamp(request.expires_at, "expires_at", iid)
        session = await self._report(iid, states.QRShown(code, expires_at))
        return engine_pb.ReportQRCodeResponse(session=session)

    @unary
    async def ReportQRScanned(
        self, request: engine_pb.ReportQRScannedRequest, context: Context
    ) -> engine_pb.ReportQRScannedResponse:
        iid = validation.instance_id(request.instance_id)
        return engine_pb.ReportQRScannedResponse(
            session=await self._report(iid, states.QRScanned())
        )

    @unary
    async def ReportConnecting(
        self, request: engine_pb.ReportConnectingRequest, context: Context
    ) -> engine_pb.ReportConnectingResponse:
        iid = validation.instance_id(request.instance_id)
        session = await self._report(iid, states.Reconnecting())
        return engine_pb.ReportConnectingResponse(session=session)

    @unary
    async def ReportConnected(
        self, request: engine_pb.ReportConnectedRequest, context: Context
    ) -> engine_pb.ReportConnectedResponse:
        iid = validation.instance_id(request.instance_id)
        phone = validation.phone_number(request.phone_number, iid=iid)
        session = await self._report(iid, states.Connected(phone))
        return engine_pb.ReportConnectedResponse(session=session)

    @unary
    async def ReportDisconnected(
        self, request: engine_pb.ReportDisconnectedRequest, context: Context
    ) -> engine_pb.ReportDisconnectedResponse:
        iid = validation.instance_id(request.instance_id)
        reason = validation.enum_value(request.reason, _DISCONNECT_REASONS, "reason", iid)
        message = validation.error_message(request.message, iid) if request.message else ""
        event = states.Disconnected(reason, message)  # type: ignore[arg-type]
        return engine_pb.ReportDisconnectedResponse(session=await self._report(iid, event))

    @unary
    async def ReportError(
        self, request: engine_pb.ReportErrorRequest, context: Context
    ) -> engine_pb.ReportErrorResponse:
        iid = validation.instance_id(request.instance_id)
        code = validation.error_code(request.code, iid)
        message = validation.error_message(request.message, iid)
        session = await self._report(iid, states.Failed(code, message))
        return engine_pb.ReportErrorResponse(session=session)


_FAULTS = {sim_pb.FAULT_PAIRING: "pairing", sim_pb.FAULT_SEND: "send"}
_FAULT_MESSAGES = {
    "TEMPORARY_BAN": "WhatsApp banned this number temporarily",
    "CLIENT_OUTDATED": "WhatsApp refused this client version as outdated",
}


class SimulatorForwarding(Protocol):
    """Several nodes: the simulated phone of a session is in its owner's workers."""

    def owner_only(self) -> SimulatorForwarding: ...

    async def here(self, instance_id: str, call: Callable[[], Awaitable[Any]]) -> Any: ...

    async def forward_simulator(
        self, instance_id: str, method: str, request: Any, response: type[Any]
    ) -> Any | None: ...


#: Metadata set by a node that forwards a call (``service.cluster.forwarding.FORWARDED``).
FORWARDED_BY = "x-session-manager-forwarded-by"


def simulated(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """A SimulatorService call, forwarded to the node whose worker holds the session's phone."""
    path = f"/sessionmanager.v1.SimulatorService/{method.__name__}"
    answer = getattr(sim_pb, f"{method.__name__}Response")

    @functools.wraps(method)
    async def handler(self: SimulatorService, request: Request, context: Context) -> Response:
        try:
            return await forwarded_or_here(self, request, context)
        except EngineError as error:  # the phone's engine could not act (no worker, a restart)
            raise errors.ContractError(
                session_pb2.ERROR_REASON_SESSION_NOT_CONNECTED,
                f"the simulated phone could not act: {error.message}",
                instance_id=request.instance_id,  # type: ignore[attr-defined]
                engine_code=error.code,
            ) from error

    async def forwarded_or_here(
        self: SimulatorService, request: Request, context: Context
    ) -> Response:
        forwarding = self._forwarding
        if forwarding is not None:
            metadata = context.invocation_metadata() or ()
            if any(key == FORWARDED_BY for key, _ in metadata):
                forwarding = forwarding.owner_only()
            iid = validation.instance_id(request.instance_id)  # type: ignore[attr-defined]
            forwarded = await forwarding.forward_simulator(iid, path, request, answer)
            if forwarded is not None:
                return forwarded  # type: ignore[no-any-return]
            return await forwarding.here(  # type: ignore[no-any-return]
                iid, lambda: method(self, request, context)
            )
        return await method(self, request, context)

    return unary(handler)


class SimulatorService(simulator_service_pb2_grpc.SimulatorServiceServicer):
    """Commands to the simulated phone; served only with the simulated engine."""

    def __init__(
        self, manager: Sessions, phone: Phone, forwarding: SimulatorForwarding | None = None
    ) -> None:
        self._manager = manager
        self._engine = phone
        self._forwarding = forwarding

    async def _existing(self, instance_id: str) -> SessionRef:
        return await self._manager.ref(validation.instance_id(instance_id))

    async def _current(self, session: SessionRef) -> session_pb2.WhatsAppSession:
        return session_message(await self._manager.get(session.instance_id))

    @simulated
    async def ScanQR(
        self, request: sim_pb.ScanQRRequest, context: Context
    ) -> sim_pb.ScanQRResponse:
        session = await self._existing(request.instance_id)
        phone = (
            validation.phone_number(request.phone_number, iid=session.instance_id)
            if request.phone_number
            else ""
        )
        await self._engine.scan(session, phone, request.hold_handshake)
        return sim_pb.ScanQRResponse(session=await self._current(session))

    @simulated
    async def CompleteHandshake(
        self, request: sim_pb.CompleteHandshakeRequest, context: Context
    ) -> sim_pb.CompleteHandshakeResponse:
        session = await self._existing(request.instance_id)
        await self._engine.complete_handshake(session)
        return sim_pb.CompleteHandshakeResponse(session=await self._current(session))

    @simulated
    async def DropNetwork(
        self, request: sim_pb.DropNetworkRequest, context: Context
    ) -> sim_pb.DropNetworkResponse:
        session = await self._existing(request.instance_id)
        await self._engine.drop_network(session, request.hold_reconnect)
        return sim_pb.DropNetworkResponse(session=await self._current(session))

    @simulated
    async def UnlinkDevice(
        self, request: sim_pb.UnlinkDeviceRequest, context: Context
    ) -> sim_pb.UnlinkDeviceResponse:
        session = await self._existing(request.instance_id)
        await self._engine.unlink(session)
        return sim_pb.UnlinkDeviceResponse(session=await self._current(session))

    @simulated
    async def FailSession(
        self, request: sim_pb.FailSessionRequest, context: Context
    ) -> sim_pb.FailSessionResponse:
        session = await self._existing(request.instance_id)
        code = validation.error_code(request.code or "TEMPORARY_BAN", session.instance_id)
        message = request.message or _FAULT_MESSAGES.get(code, f"The session failed: {code}")
        await self._engine.fail(
            session, code, validation.error_message(message, session.instance_id)
        )
        return sim_pb.FailSessionResponse(session=await self._current(session))

    @simulated
    async def DeliverMessage(
        self, request: sim_pb.DeliverMessageRequest, context: Context
    ) -> sim_pb.DeliverMessageResponse:
        message = await self._receipt(request.instance_id, request.message_id, DELIVERED)
        return sim_pb.DeliverMessageResponse(message=message)

    @simulated
    async def ReadMessage(
        self, request: sim_pb.ReadMessageRequest, context: Context
    ) -> sim_pb.ReadMessageResponse:
        message = await self._receipt(request.instance_id, request.message_id, READ)
        return sim_pb.ReadMessageResponse(message=message)

    @simulated
    async def FailMessage(
        self, request: sim_pb.FailMessageRequest, context: Context
    ) -> sim_pb.FailMessageResponse:
        iid = validation.instance_id(request.instance_id)
        code = validation.error_code(request.code or "SERVER_ERROR", iid)
        text = request.message or "WhatsApp could not deliver the message"
        failure = (code, validation.error_message(text, iid))
        message = await self._receipt(iid, request.message_id, FAILED, failure)
        return sim_pb.FailMessageResponse(message=message)

    async def _receipt(
        self,
        instance_id: str,
        message_id: str,
        status: MessageStatus,
        failure: tuple[str, str] = ("", ""),
    ) -> pb.Message:
        """Have WhatsApp report a receipt for a sent message; the message after it."""
        session = await self._existing(instance_id)
        iid = session.instance_id
        message_id = validation.message_id(message_id, iid)
        message = await self._manager.get_message(iid, message_id)
        if message.whatsapp_message_id is None:
            raise errors.ContractError(
                session_pb2.ERROR_REASON_INVALID_TRANSITION,
                f"message {message_id!r} was never accepted by WhatsApp "
                f"({message_status_text(message.status)}): it gets no receipt",
                instance_id=iid,
                message_id=message_id,
            )
        await self._engine.receipt(session, message.whatsapp_message_id, status, *failure)
        return message_proto(await self._manager.get_message(iid, message_id))

    @simulated
    async def InjectFault(
        self, request: sim_pb.InjectFaultRequest, context: Context
    ) -> sim_pb.InjectFaultResponse:
        session = await self._existing(request.instance_id)
        fault = validation.enum_value(request.fault, set(_FAULTS), "fault", session.instance_id)
        await self._engine.inject_fault(session, _FAULTS[fault])  # type: ignore[index]
        return sim_pb.InjectFaultResponse()
