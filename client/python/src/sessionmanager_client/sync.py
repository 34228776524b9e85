"""The synchronous client (plain ``grpc``): ``SessionManagerClient``.

The same surface as ``client.aio.AsyncSessionManagerClient``: the generated
messages come back (``session_pb2.WhatsAppSession``, ``SendResponse``), and
every failure is one exception of ``sessionmanager_client.errors``.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
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
    def __init__(self, settings: ChannelSettings, timeout: float, channel: grpc.Channel):
        self._settings = settings
        self._timeout = timeout
        self._metadata = settings.metadata()
        self._channel = channel

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error


class Simulator(_Base):
    """Commands to the simulated engine's phone (servers run with ``--engine simulated``)."""

    def __init__(self, settings: ChannelSettings, timeout: float, channel: grpc.Channel):
        super().__init__(settings, timeout, channel)
        self._stub = simulator_service_pb2_grpc.SimulatorServiceStub(channel)

    def scan_qr(
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
        return self._unary(self._stub.ScanQR, request, timeout).session  # type: ignore[no-any-return]

    def complete_handshake(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = sim.CompleteHandshakeRequest(instance_id=instance_id)
        return self._unary(self._stub.CompleteHandshake, request, timeout).session  # type: ignore[no-any-return]

    def drop_network(
        self, instance_id: str, *, hold_reconnect: bool = False, timeout: float | None = None
    ) -> Session:
        request = sim.DropNetworkRequest(instance_id=instance_id, hold_reconnect=hold_reconnect)
        return self._unary(self._stub.DropNetwork, request, timeout).session  # type: ignore[no-any-return]

    def unlink_device(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = sim.UnlinkDeviceRequest(instance_id=instance_id)
        return self._unary(self._stub.UnlinkDevice, request, timeout).session  # type: ignore[no-any-return]

    def fail_session(
        self, instance_id: str, code: str = "", message: str = "", *, timeout: float | None = None
    ) -> Session:
        request = sim.FailSessionRequest(instance_id=instance_id, code=code, message=message)
        return self._unary(self._stub.FailSession, request, timeout).session  # type: ignore[no-any-return]

    def inject_fault(self, instance_id: str, fault: str, *, timeout: float | None = None) -> None:
        """Make the next ``"pairing"`` or ``"send"`` of the session fail."""
        request = sim.InjectFaultRequest(
            instance_id=instance_id,
            fault=FAULTS.get(fault, sim.FAULT_UNSPECIFIED),
        )
        self._unary(self._stub.InjectFault, request, timeout)


class SessionManagerClient(_Base):
    """The public SessionService over a synchronous gRPC channel.

    Arguments as ``AsyncSessionManagerClient`` (``simulator_token`` included);
    ``channel`` lets a caller (or a test with ``grpc_testing``) supply the
    channel. Use it as a context manager or call ``close()``.
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
        channel: grpc.Channel | None = None,
    ) -> None:
        settings = ChannelSettings(address, token, tls, tuple(options), retry)
        if channel is None:
            if tls is not None:
                channel = grpc.secure_channel(
                    address, tls.credentials(), options=settings.channel_options()
                )
            else:
                channel = grpc.insecure_channel(address, options=settings.channel_options())
        super().__init__(settings, timeout, channel)
        self._stub = session_service_pb2_grpc.SessionServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._backoff = backoff or Backoff()
        simulator_settings = ChannelSettings(
            address, simulator_token or token, tls, tuple(options), retry
        )
        self.simulator = Simulator(simulator_settings, timeout, channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def get_session(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = pb.GetSessionRequest(instance_id=instance_id)
        return self._unary(self._stub.GetSession, request, timeout).session  # type: ignore[no-any-return]

    def request_qr(self, instance_id: str, *, timeout: float | None = None) -> Session:
        """The session with its valid QR code (``qr_string``, ``qr_expires_at``)."""
        request = pb.RequestQRRequest(instance_id=instance_id)
        return self._unary(self._stub.RequestQR, request, timeout).session  # type: ignore[no-any-return]

    def pair_phone(
        self, instance_id: str, phone_number: str, *, timeout: float | None = None
    ) -> pb.PairPhoneResponse:
        """WhatsApp's 8-character linking code to type on ``phone_number``'s phone."""
        request = pb.PairPhoneRequest(instance_id=instance_id, phone_number=phone_number)
        return self._unary(self._stub.PairPhone, request, timeout)  # type: ignore[no-any-return]

    def send(
        self,
        instance_id: str,
        to: str,
        text: str,
        idempotency_key: str | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.SendResponse:
        request = send_request(instance_id, to, text, idempotency_key)
        return self._unary(self._stub.Send, request, timeout)  # type: ignore[no-any-return]

    def disconnect(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = pb.DisconnectRequest(instance_id=instance_id)
        return self._unary(self._stub.Disconnect, request, timeout).session  # type: ignore[no-any-return]

    def create_session(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = pb.CreateSessionRequest(instance_id=instance_id)
        return self._unary(self._stub.CreateSession, request, timeout).session  # type: ignore[no-any-return]

    def delete_session(self, instance_id: str, *, timeout: float | None = None) -> None:
        request = pb.DeleteSessionRequest(instance_id=instance_id)
        self._unary(self._stub.DeleteSession, request, timeout)

    def list_sessions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        status: str | None = None,
        timeout: float | None = None,
    ) -> Page:
        """One page; ``status`` (text form, e.g. ``"connected"``) filters."""
        request = list_request(page_size, page_token, status)
        response = self._unary(self._stub.ListSessions, request, timeout)
        return Page(list(response.sessions), response.next_page_token)

    def iter_sessions(
        self, *, page_size: int = 0, status: str | None = None, timeout: float | None = None
    ) -> Iterator[Session]:
        """Every session, page after page."""
        token = ""
        while True:
            page = self.list_sessions(
                page_size=page_size, page_token=token, status=status, timeout=timeout
            )
            yield from page.sessions
            if not page.next_page_token:
                return
            token = page.next_page_token

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status from ``grpc.health.v1`` (``"SERVING"``, ...)."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._unary(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def watch(
        self, instance_id: str, *, backoff: Backoff | None = None
    ) -> Generator[Session, None, None]:
        """As ``AsyncSessionManagerClient.watch``, blocking; ``close()`` it when done."""
        policy = backoff or self._backoff
        last_revision = 0
        failures = 0
        request = pb.WatchSessionRequest(instance_id=instance_id)
        while True:
            call = self._stub.WatchSession(request, metadata=self._metadata)
            try:
                for response in call:
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
                call.cancel()  # type: ignore[no-untyped-call]
            time.sleep(policy.delay(failures))
