"""The synchronous client (plain ``grpc``): ``SessionManagerClient``.

The same surface as ``sessionmanager_client.aio.AsyncSessionManagerClient``:
the generated messages come back (``session_pb2.WhatsAppSession``,
``SendResponse``), and every failure is one exception of
``sessionmanager_client.errors``. What to send and when to re-subscribe is
decided in ``_base``; this module only does the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
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

    def __init__(self, settings: ChannelSettings, timeout: float, channel: grpc.Channel):
        self._timeout = timeout
        self._metadata = settings.metadata()
        self._channel = channel

    def _call(
        self,
        rpc: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        timeout: float | None,
    ) -> ResponseT:
        deadline = self._timeout if timeout is None else timeout
        try:
            return rpc(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error


class Simulator(_Calls):
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
        return self._call(self._stub.ScanQR, request, timeout).session

    def complete_handshake(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = sim.CompleteHandshakeRequest(instance_id=instance_id)
        return self._call(self._stub.CompleteHandshake, request, timeout).session

    def drop_network(
        self, instance_id: str, *, hold_reconnect: bool = False, timeout: float | None = None
    ) -> Session:
        request = sim.DropNetworkRequest(instance_id=instance_id, hold_reconnect=hold_reconnect)
        return self._call(self._stub.DropNetwork, request, timeout).session

    def unlink_device(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = sim.UnlinkDeviceRequest(instance_id=instance_id)
        return self._call(self._stub.UnlinkDevice, request, timeout).session

    def fail_session(
        self, instance_id: str, code: str = "", message: str = "", *, timeout: float | None = None
    ) -> Session:
        request = sim.FailSessionRequest(instance_id=instance_id, code=code, message=message)
        return self._call(self._stub.FailSession, request, timeout).session

    def inject_fault(self, instance_id: str, fault: str, *, timeout: float | None = None) -> None:
        """Make the next ``"pairing"`` or ``"send"`` of the session fail."""
        self._call(self._stub.InjectFault, _base.fault_request(instance_id, fault), timeout)

    def deliver_message(
        self, instance_id: str, message_id: str, *, timeout: float | None = None
    ) -> pb.Message:
        """WhatsApp reports the sent message delivered to the recipient's phone."""
        request = sim.DeliverMessageRequest(instance_id=instance_id, message_id=message_id)
        return (self._call(self._stub.DeliverMessage, request, timeout)).message

    def read_message(
        self, instance_id: str, message_id: str, *, timeout: float | None = None
    ) -> pb.Message:
        """WhatsApp reports the sent message read by the recipient."""
        request = sim.ReadMessageRequest(instance_id=instance_id, message_id=message_id)
        return (self._call(self._stub.ReadMessage, request, timeout)).message

    def fail_message(
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
        return (self._call(self._stub.FailMessage, request, timeout)).message


class SessionManagerClient(_Calls):
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
        request = _base.get_request(instance_id)
        return self._call(self._stub.GetSession, request, timeout).session

    def request_qr(self, instance_id: str, *, timeout: float | None = None) -> Session:
        """The session with its valid QR code (``qr_string``, ``qr_expires_at``)."""
        request = _base.qr_request(instance_id)
        return self._call(self._stub.RequestQR, request, timeout).session

    def pair_phone(
        self, instance_id: str, phone_number: str, *, timeout: float | None = None
    ) -> pb.PairPhoneResponse:
        """WhatsApp's 8-character linking code to type on ``phone_number``'s phone."""
        request = _base.pair_phone_request(instance_id, phone_number)
        return self._call(self._stub.PairPhone, request, timeout)

    def send(
        self,
        instance_id: str,
        to: str,
        text: str,
        idempotency_key: str | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.SendResponse:
        """As ``AsyncSessionManagerClient.send``: retried only with an idempotency key."""
        request = _base.send_request(instance_id, to, text, idempotency_key)
        retry = SendRetry(idempotency_key)
        while True:
            try:
                return self._call(self._stub.Send, request, timeout)
            except SessionManagerClientError as error:
                delay = retry.delay_after(error)
                if delay is None:
                    raise
            time.sleep(delay)

    def get_message(
        self, instance_id: str, message_id: str, *, timeout: float | None = None
    ) -> pb.Message:
        """A message the session sent, and where it stands (delivered, read, ...)."""
        request = _base.get_message_request(instance_id, message_id)
        return self._call(self._stub.GetMessage, request, timeout).message

    def disconnect(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = _base.disconnect_request(instance_id)
        return self._call(self._stub.Disconnect, request, timeout).session

    def create_session(self, instance_id: str, *, timeout: float | None = None) -> Session:
        request = _base.create_request(instance_id)
        return self._call(self._stub.CreateSession, request, timeout).session

    def delete_session(self, instance_id: str, *, timeout: float | None = None) -> None:
        self._call(self._stub.DeleteSession, _base.delete_request(instance_id), timeout)

    def list_sessions(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        status: str | None = None,
        timeout: float | None = None,
    ) -> Page:
        """One page; ``status`` (text form, e.g. ``"connected"``) filters."""
        request = _base.list_request(page_size, page_token, status)
        response = self._call(self._stub.ListSessions, request, timeout)
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
        response = self._call(self._health.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def watch(
        self, instance_id: str, *, backoff: Backoff | None = None
    ) -> Generator[Session, None, None]:
        """As ``AsyncSessionManagerClient.watch``, blocking; ``close()`` it when done."""
        cursor = WatchCursor()
        resubscription = Resubscription(backoff or self._backoff)
        request = _base.watch_request(instance_id)
        while True:
            call = self._stub.WatchSession(request, metadata=self._metadata)
            try:
                for response in call:
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
                call.cancel()  # type: ignore[no-untyped-call]
            time.sleep(delay)

    def watch_sessions(
        self,
        *,
        after_sequence: int | None = None,
        status: str | None = None,
        instance_id_prefix: str = "",
        types: Sequence[str] = (),
        cursor: StreamCursor | None = None,
        backoff: Backoff | None = None,
    ) -> Generator[pb.WatchSessionsResponse, None, None]:
        """As ``AsyncSessionManagerClient.watch_sessions``, blocking; ``close()`` it when done."""
        cursor = cursor or StreamCursor(after_sequence)
        resubscription = Resubscription(backoff or self._backoff)
        while True:
            request = _base.watch_sessions_request(
                cursor.sequence, status, instance_id_prefix, types
            )
            call = self._stub.WatchSessions(request, metadata=self._metadata)
            try:
                for item in call:
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
                call.cancel()  # type: ignore[no-untyped-call]
            time.sleep(delay)
