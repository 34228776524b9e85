"""The asyncio client (``grpc.aio``): ``AsyncSessionManagerClient``.

Every method returns the generated messages (``session_pb2.WhatsAppSession``,
``SendResponse``) and raises one exception of ``sessionmanager_client.errors``
on failure. Each call has a deadline (``timeout``, default 10 s) overridable
per call. What to send and when to re-subscribe is decided in ``_base``; this
module only does the I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager_client import _base
from sessionmanager_client._base import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    TLS,
    Backoff,
    ChannelSettings,
    Page,
    Resubscription,
    SendRetry,
    Session,
    StreamCursor,
    WatchCursor,
    pb,
    sim,
)
from sessionmanager_client.errors import SessionManagerClientError, from_rpc_error

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


class _Calls:
    """Typed unary calls on one channel, with the deadline and the token of each call."""

    def __init__(self, settings: ChannelSettings, timeout: float, channel: grpc.aio.Channel):
        self._timeout = timeout
        self._metadata = settings.metadata()
        self._channel = channel

    async def _call(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        timeout: float | None,
    ) -> ResponseT:
        deadline = self._timeout if timeout is None else timeout
        try:
            return await rpc(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error


class AsyncSimulator(_Calls):
    """Commands to the simulated engine's phone (servers run with ``--engine simulated``)."""

    def __init__(self, settings: ChannelSettings, timeout: float, channel: grpc.aio.Channel):
        super().__init__(settings, timeout, channel)
        self._stub = simulator_service_pb2_grpc.SimulatorServiceStub(channel)

    async def scan_qr(
        self,
        instance_id: str,
        phone_number: str = "",
        *,
        hold_handshake: bool = False,
        timeout: float | None = None,
    ) -> Session:
        request = sim.ScanQRRequest(
            instance_id=instance_id, phone_number=phone_number, hold_handshake=hold_handshake
        )
        return (await self._call(self._stub.ScanQR, request, timeout)).session

    async def complete_handshake(
        self, instance_id: str, *, timeout: float | None = None
    ) -> Session:
        request = sim.CompleteHandshakeRequest(instance_id=instance_id)
        return (await self._call(self._stub.CompleteHandshake, request, timeout)).session

    async def drop_network(
        self, instance_id: str, *, hold_reconnect: bool = False, timeout: float | None = None
    ) -> Session:
        request = sim.DropNetworkRequest(instance_id=instance_id, hold_reconnect=hold_reconnect)
        return (await self._call(self._stub.DropNetwork, request, timeout)).session

    async def unlink_device(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = sim.UnlinkDeviceRequest(instance_id=instance_id)
        return (await self._call(self._stub.UnlinkDevice, request, timeout)).session

    async def fail_session(
        self, instance_id: str, code: str = "", message: str = "", *, timeout: float | None = None
    ) -> Session:
        request = sim.FailSessionRequest(instance_id=instance_id, code=code, message=message)
        return (await self._call(self._stub.FailSession, request, timeout)).session

    async def inject_fault(
        self, instance_id: str, fault: str, *, timeout: float | None = None
    ) -> None:
        """Make the next ``"pairing"`` or ``"send"`` of the session fail."""
        await self._call(self._stub.InjectFault, _base.fault_request(instance_id, fault), timeout)

    async def deliver_message(
        self, instance_id: str, message_id: str, *, timeout: float | None = None
    ) -> pb.Message:
        """WhatsApp reports the sent message delivered to the recipient's phone."""
        request = sim.DeliverMessageRequest(instance_id=instance_id, message_id=message_id)
        return (await self._call(self._stub.DeliverMessage, request, timeout)).message

    async def read_message(
        self, instance_id: str, message_id: str, *, timeout: float | None = None
    ) -> pb.Message:
        """WhatsApp reports the sent message read by the recipient."""
        request = sim.ReadMessageRequest(instance_id=instance_id, message_id=message_id)
        return (await self._call(self._stub.ReadMessage, request, timeout)).message

    async def fail_message(
        self,
        instance_id: str,
        message_id: str,
        code: str = "",
        message: str = "",
        *,
        timeout: float | None = None,
    ) -> pb.Message:
        """WhatsApp reports that it could not deliver the sent message after all."""
        request = sim.FailMessageRequest(
            instance_id=instance_id, message_id=message_id, code=code, message=message
        )
        return (await self._call(self._stub.FailMessage, request, timeout)).message


class AsyncSessionManagerClient(_Calls):
    """The public SessionService over ``grpc.aio``.

    ``address`` is ``host:port``; ``token`` is sent as ``authorization: Bearer
    <token>`` on every call; ``tls`` switches to a secure channel; ``options``
    are extra channel options; ``simulator_token`` (default ``token``) is the
    token for ``.simulator``, an internal service. ``retry`` enables gRPC
    retries on UNAVAILABLE for the idempotent reads only (GetSession,
    ListSessions, opening WatchSession), never for Send or any other write.
    ``backoff`` bounds how ``watch`` re-subscribes. Use it as an async context
    manager or call ``close()``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        simulator_token: str | None = None,
        tls: TLS | None = None,
        options: Sequence[tuple[str, Any]] = (),
        retry: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        settings = ChannelSettings(address, token, tls, tuple(options), retry)
        if tls is not None:
            channel = grpc.aio.secure_channel(
                address, tls.credentials(), options=settings.channel_options()
            )
        else:
            channel = grpc.aio.insecure_channel(address, options=settings.channel_options())
        super().__init__(settings, timeout, channel)
        self._address = address
        self._stub = session_service_pb2_grpc.SessionServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._backoff = backoff or Backoff()
        simulator_settings = ChannelSettings(
            address, simulator_token or token, tls, tuple(options), retry
        )
        self.simulator = AsyncSimulator(simulator_settings, timeout, channel)

    @property
    def address(self) -> str:
        return self._address

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def get_session(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = _base.get_request(instance_id)
        return (await self._call(self._stub.GetSession, request, timeout)).session

    async def request_qr(self, instance_id: str, *, timeout: float | None = None) -> Session:
        """The session with its valid QR code (``qr_string``, ``qr_expires_at``)."""
        request = _base.qr_request(instance_id)
        return (await self._call(self._stub.RequestQR, request, timeout)).session

    async def pair_phone(
        self, instance_id: str, phone_number: str, *, timeout: float | None = None
    ) -> pb.PairPhoneResponse:
        """WhatsApp's 8-character linking code to type on ``phone_number``'s phone."""
        request = _base.pair_phone_request(instance_id, phone_number)
        return await self._call(self._stub.PairPhone, request, timeout)

    async def send(
        self,
        instance_id: str,
        to: str,
        text: str,
        idempotency_key: str | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.SendResponse:
        """Send a text from a connected session.

        With an ``idempotency_key`` it is tried again after UNAVAILABLE (a lost
        connection, a restart): the server answers a repeated key with the first
        result and sends nothing again. Without one it is never retried.
        """
        request = _base.send_request(instance_id, to, text, idempotency_key)
        retry = SendRetry(idempotency_key)
        while True:
            try:
                return await self._call(self._stub.Send, request, timeout)
            except SessionManagerClientError as error:
                delay = retry.delay_after(error)
                if delay is None:
                    raise
            await asyncio.sleep(delay)

    async def get_message(
        self, instance_id: str, message_id: str, *, timeout: float | None = None
    ) -> pb.Message:
        """A message the session sent, and where it stands (delivered, read, ...)."""
        request = _base.get_message_request(instance_id, message_id)
        return (await self._call(self._stub.GetMessage, request, timeout)).message

    async def disconnect(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = _base.disconnect_request(instance_id)
        return (await self._call(self._stub.Disconnect, request, timeout)).session

    async def create_session(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = _base.create_request(instance_id)
        return (await self._call(self._stub.CreateSession, request, timeout)).session

    async def delete_session(self, instance_id: str, *, timeout: float | None = None) -> None:
        await self._call(self._stub.DeleteSession, _base.delete_request(instance_id), timeout)

    async def list_sessions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        status: str | None = None,
        timeout: float | None = None,
    ) -> Page:
        """One page; ``status`` (text form, e.g. ``"connected"``) filters."""
        request = _base.list_request(page_size, page_token, status)
        response = await self._call(self._stub.ListSessions, request, timeout)
        return Page(list(response.sessions), response.next_page_token)

    async def iter_sessions(
        self, *, page_size: int = 0, status: str | None = None, timeout: float | None = None
    ) -> AsyncIterator[Session]:
        """Every session, page after page."""
        token = ""
        while True:
            page = await self.list_sessions(
                page_size=page_size, page_token=token, status=status, timeout=timeout
            )
            for session in page.sessions:
                yield session
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status from ``grpc.health.v1`` (``"SERVING"``, ...)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def watch(
        self, instance_id: str, *, backoff: Backoff | None = None
    ) -> AsyncGenerator[Session, None]:
        """The session's current state, then each committed change, as they happen.

        After UNAVAILABLE (a server restart or a lost connection) it subscribes
        again by itself, waiting ``backoff`` between attempts. It follows
        ``(id, revision)``: it never repeats a state nor goes back in revision,
        and a session deleted and created again meanwhile (another ``id``) is
        followed from its first state on (``WatchCursor``). Other errors end
        it: once the session is deleted, ``SessionNotFoundError``. Close it
        with ``aclose()`` (or ``contextlib.aclosing``) when you stop early.
        """
        cursor = WatchCursor()
        resubscription = Resubscription(backoff or self._backoff)
        request = _base.watch_request(instance_id)
        while True:
            call = self._stub.WatchSession(request, metadata=self._metadata)
            try:
                async for response in call:
                    resubscription.received()
                    if cursor.admit(response.session):
                        yield response.session
                return
            except grpc.RpcError as error:
                mapped = from_rpc_error(error)
                delay = resubscription.delay_after(mapped)
                if delay is None:
                    raise mapped from error
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def watch_sessions(
        self,
        *,
        after_sequence: int | None = None,
        status: str | None = None,
        instance_id_prefix: str = "",
        types: Sequence[str] = (),
        cursor: StreamCursor | None = None,
        backoff: Backoff | None = None,
    ) -> AsyncGenerator[pb.WatchSessionsResponse, None]:
        """Every session and message, from the event log, as they change.

        Without ``after_sequence``: the current state first (``item.session``,
        one per session, then ``item.checkpoint``), then each event
        (``item.event``: ``session.updated``, ``session.deleted``,
        ``message.updated``). With it: every event after that sequence number.
        After UNAVAILABLE it subscribes again by itself from the last event or
        checkpoint received (kept in ``cursor``; pass your own to read it, and
        keep ``cursor.sequence`` to resume in another process), so nothing is
        missed and nothing comes twice. ``status``, ``instance_id_prefix`` and
        ``types`` (``"session.updated"``, ...) narrow it. CURSOR_EXPIRED ends
        it when the log no longer keeps what follows the cursor: start again
        without one.
        """
        cursor = cursor or StreamCursor(after_sequence)
        resubscription = Resubscription(backoff or self._backoff)
        while True:
            request = _base.watch_sessions_request(
                cursor.sequence, status, instance_id_prefix, types
            )
            call = self._stub.WatchSessions(request, metadata=self._metadata)
            try:
                async for item in call:
                    resubscription.received()
                    if cursor.admit(item):
                        yield item
                return
            except grpc.RpcError as error:
                mapped = from_rpc_error(error)
                delay = resubscription.delay_after(mapped)
                if delay is None:
                    raise mapped from error
            finally:
                call.cancel()
            await asyncio.sleep(delay)
