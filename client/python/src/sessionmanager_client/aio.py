"""The asyncio client (``grpc.aio``): ``AsyncSessionManagerClient``.

Every method returns the generated messages (``session_pb2.WhatsAppSession``,
``SendResponse``) and raises one exception of ``sessionmanager_client.errors`` on failure.
Each call has a deadline (``timeout``, default 10 s) overridable per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sessionmanager_client._common import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    FAULTS,
    TLS,
    Backoff,
    ChannelSettings,
    Page,
    list_request,
    send_request,
)
from sessionmanager_client.errors import SessionManagerUnavailableError, from_rpc_error
from sessionmanager.v1 import (
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    simulator_service_pb2,
    simulator_service_pb2_grpc,
)

pb = session_service_pb2
sim = simulator_service_pb2
Session = session_pb2.WhatsAppSession


class _Base:
    def __init__(self, settings: ChannelSettings, timeout: float, channel: grpc.aio.Channel):
        self._settings = settings
        self._timeout = timeout
        self._metadata = settings.metadata()
        self._channel = channel

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error


class AsyncSimulator(_Base):
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
        response = await self._unary(self._stub.ScanQR, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def complete_handshake(
        self, instance_id: str, *, timeout: float | None = None
    ) -> Session:
        request = sim.CompleteHandshakeRequest(instance_id=instance_id)
        response = await self._unary(self._stub.CompleteHandshake, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def drop_network(
        self, instance_id: str, *, hold_reconnect: bool = False, timeout: float | None = None
    ) -> Session:
        request = sim.DropNetworkRequest(instance_id=instance_id, hold_reconnect=hold_reconnect)
        response = await self._unary(self._stub.DropNetwork, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def unlink_device(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = sim.UnlinkDeviceRequest(instance_id=instance_id)
        response = await self._unary(self._stub.UnlinkDevice, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def fail_session(
        self, instance_id: str, code: str = "", message: str = "", *, timeout: float | None = None
    ) -> Session:
        request = sim.FailSessionRequest(instance_id=instance_id, code=code, message=message)
        response = await self._unary(self._stub.FailSession, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def inject_fault(
        self, instance_id: str, fault: str, *, timeout: float | None = None
    ) -> None:
        """Make the next ``"pairing"`` or ``"send"`` of the session fail."""
        request = sim.InjectFaultRequest(
            instance_id=instance_id,
            fault=FAULTS.get(fault, sim.FAULT_UNSPECIFIED),
        )
        await self._unary(self._stub.InjectFault, request, timeout)


class AsyncSessionManagerClient(_Base):
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
        self._stub = session_service_pb2_grpc.SessionServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._backoff = backoff or Backoff()
        simulator_settings = ChannelSettings(
            address, simulator_token or token, tls, tuple(options), retry
        )
        self.simulator = AsyncSimulator(simulator_settings, timeout, channel)

    @property
    def address(self) -> str:
        return self._settings.address

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
        request = pb.GetSessionRequest(instance_id=instance_id)
        response = await self._unary(self._stub.GetSession, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def request_qr(self, instance_id: str, *, timeout: float | None = None) -> Session:
        """The session with its valid QR code (``qr_string``, ``qr_expires_at``)."""
        request = pb.RequestQRRequest(instance_id=instance_id)
        response = await self._unary(self._stub.RequestQR, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def pair_phone(
        self, instance_id: str, phone_number: str, *, timeout: float | None = None
    ) -> pb.PairPhoneResponse:
        """WhatsApp's 8-character linking code to type on ``phone_number``'s phone."""
        request = pb.PairPhoneRequest(instance_id=instance_id, phone_number=phone_number)
        return await self._unary(self._stub.PairPhone, request, timeout)  # type: ignore[no-any-return]

    async def send(
        self,
        instance_id: str,
        to: str,
        text: str,
        idempotency_key: str | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.SendResponse:
        request = send_request(instance_id, to, text, idempotency_key)
        return await self._unary(self._stub.Send, request, timeout)  # type: ignore[no-any-return]

    async def disconnect(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = pb.DisconnectRequest(instance_id=instance_id)
        response = await self._unary(self._stub.Disconnect, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def create_session(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = pb.CreateSessionRequest(instance_id=instance_id)
        response = await self._unary(self._stub.CreateSession, request, timeout)
        return response.session  # type: ignore[no-any-return]

    async def delete_session(self, instance_id: str, *, timeout: float | None = None) -> None:
        request = pb.DeleteSessionRequest(instance_id=instance_id)
        await self._unary(self._stub.DeleteSession, request, timeout)

    async def list_sessions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        status: str | None = None,
        timeout: float | None = None,
    ) -> Page:
        """One page; ``status`` (text form, e.g. ``"connected"``) filters."""
        request = list_request(page_size, page_token, status)
        response = await self._unary(self._stub.ListSessions, request, timeout)
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
        response = await self._unary(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def watch(
        self, instance_id: str, *, backoff: Backoff | None = None
    ) -> AsyncGenerator[Session, None]:
        """The session's current state, then each committed change, as they happen.

        After UNAVAILABLE (a server restart or a lost connection) it subscribes
        again by itself, waiting ``backoff`` between attempts, and never yields
        a revision at or below one it already yielded. Other errors (e.g. the
        session was deleted: ``SessionNotFoundError``) end it. Close it with
        ``aclose()`` (or ``contextlib.aclosing``) when you stop early.
        """
        policy = backoff or self._backoff
        last_revision = 0
        failures = 0
        request = pb.WatchSessionRequest(instance_id=instance_id)
        while True:
            call = self._stub.WatchSession(request, metadata=self._metadata)
            try:
                async for response in call:
                    failures = 0
                    session = response.session
                    if session.revision <= last_revision:
                        continue
                    last_revision = session.revision
                    yield session
                return
            except grpc.RpcError as error:
                mapped = from_rpc_error(error)
                if not isinstance(mapped, SessionManagerUnavailableError):
                    raise mapped from error
                failures += 1
                if policy.max_attempts is not None and failures > policy.max_attempts:
                    raise mapped from error
            finally:
                call.cancel()
            await asyncio.sleep(policy.delay(failures))
