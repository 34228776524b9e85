"""The synchronous client through grpc_testing: this test plays the server side."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sessionmanager.v1 import session_pb2, session_service_pb2
from sessionmanager_client import errors
from sessionmanager_client.sync import SessionManagerClient

pb = session_service_pb2
SERVICE = pb.DESCRIPTOR.services_by_name["SessionService"]
T = TypeVar("T")


def method(name: str) -> Any:
    return SERVICE.methods_by_name[name]


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


class Calls:
    """Runs client calls in daemon threads, so a failing test never hangs on one."""

    def __call__(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as error:  # noqa: BLE001 - handed to the test
                future.set_exception(error)

        threading.Thread(target=run, daemon=True).start()
        return future


@pytest.fixture
def pool() -> Calls:
    return Calls()


@pytest.fixture
def client(channel: Any) -> SessionManagerClient:
    return SessionManagerClient(channel=channel, token="s3cret", timeout=7)


def call(pool: Calls, fn: Callable[[], T]) -> Future[T]:
    return pool(fn)


def trailers(
    reason: str, code: grpc.StatusCode, message: str, retry_ms: int | None = None, **meta: str
) -> Any:
    """The trailers of a contract error, as a server sends them with grpcio-status."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain="sessionmanager.v1", metadata=meta)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if retry_ms is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(retry_ms)
        extra = any_pb2.Any()
        extra.Pack(retry)
        details.append(extra)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(status).trailing_metadata


def test_get_session_sends_request_token_and_returns_the_message(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    future = call(pool, lambda: client.get_session("sender_51"))
    metadata, request, rpc = channel.take_unary_unary(method("GetSession"))
    assert request == pb.GetSessionRequest(instance_id="sender_51")
    assert ("authorization", "Bearer s3cret") in metadata
    stored = session_pb2.WhatsAppSession(
        instance_id="sender_51", status=session_pb2.SESSION_STATUS_CONNECTED, revision=4
    )
    rpc.terminate(pb.GetSessionResponse(session=stored), (), grpc.StatusCode.OK, "")
    assert future.result(5) == stored


def test_send_with_idempotency_key_and_per_call_timeout(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    future = call(pool, lambda: client.send("sender_51", "+549", "hola", "k1", timeout=2))
    _, request, rpc = channel.take_unary_unary(method("Send"))
    assert request.idempotency_key == "k1"
    assert request.HasField("idempotency_key")
    rpc.terminate(pb.SendResponse(message_id="m1", replayed=True), (), grpc.StatusCode.OK, "")
    assert future.result(5).replayed

    future = call(pool, lambda: client.send("sender_51", "+549", "hola"))
    _, request, rpc = channel.take_unary_unary(method("Send"))
    assert not request.HasField("idempotency_key")
    rpc.terminate(pb.SendResponse(message_id="m2"), (), grpc.StatusCode.OK, "")
    assert future.result(5).message_id == "m2"


def test_list_iterates_every_page(client: SessionManagerClient, channel: Any, pool: Calls) -> None:
    future = call(pool, lambda: [s.instance_id for s in client.iter_sessions(status="connected")])
    _, first, rpc = channel.take_unary_unary(method("ListSessions"))
    assert first.status == session_pb2.SESSION_STATUS_CONNECTED
    assert first.page_token == ""
    page = [session_pb2.WhatsAppSession(instance_id="a")]
    rpc.terminate(
        pb.ListSessionsResponse(sessions=page, next_page_token="t2"), (), grpc.StatusCode.OK, ""
    )
    _, second, rpc = channel.take_unary_unary(method("ListSessions"))
    assert second.page_token == "t2"
    page = [session_pb2.WhatsAppSession(instance_id="b")]
    rpc.terminate(pb.ListSessionsResponse(sessions=page), (), grpc.StatusCode.OK, "")
    assert future.result(5) == ["a", "b"]


@pytest.mark.parametrize(
    ("reason", "code", "expected"),
    [
        ("SESSION_NOT_FOUND", grpc.StatusCode.NOT_FOUND, errors.SessionNotFoundError),
        (
            "SESSION_NOT_CONNECTED",
            grpc.StatusCode.FAILED_PRECONDITION,
            errors.SessionNotConnectedError,
        ),
        ("WHATSAPP_ERROR", grpc.StatusCode.UNAVAILABLE, errors.WhatsAppError),
        ("INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        ("SESSION_MANAGER_ERROR", grpc.StatusCode.INTERNAL, errors.SessionManagerError),
    ],
)
def test_error_info_becomes_the_exception(
    client: SessionManagerClient,
    channel: Any,
    pool: Calls,
    reason: str,
    code: grpc.StatusCode,
    expected: type[errors.SessionManagerClientError],
) -> None:
    future = call(pool, lambda: client.send("sender_51", "+5491100000000", "hola"))
    _, _, rpc = channel.take_unary_unary(method("Send"))
    sent = trailers(reason, code, "told so", instance_id="sender_51", status="init")
    rpc.terminate(None, sent, code, "told so")
    with pytest.raises(expected) as caught:
        future.result(5)
    assert caught.value.reason == reason
    assert caught.value.code is code
    assert caught.value.message == "told so"
    assert caught.value.status == "init"
    assert caught.value.instance_id == "sender_51"


def test_limit_exceeded_carries_retry_after(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    future = call(pool, lambda: client.send("sender_51", "+5491100000000", "hola"))
    _, _, rpc = channel.take_unary_unary(method("Send"))
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    sent = trailers("LIMIT_EXCEEDED", code, "slow", 1500, limit="send_rate")
    rpc.terminate(None, sent, code, "slow")
    with pytest.raises(errors.LimitExceededError) as caught:
        future.result(5)
    assert caught.value.limit == "send_rate"
    assert caught.value.retry_after == 1.5


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, errors.SessionManagerUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.SessionManagerTimeoutError),
    ],
)
def test_transport_errors_without_error_info(
    client: SessionManagerClient,
    channel: Any,
    pool: Calls,
    code: grpc.StatusCode,
    expected: type[errors.SessionManagerClientError],
) -> None:
    future = call(pool, lambda: client.get_session("sender_51"))
    _, _, rpc = channel.take_unary_unary(method("GetSession"))
    rpc.terminate(None, (), code, "gone")
    with pytest.raises(expected) as caught:
        future.result(5)
    assert caught.value.reason is None
    assert caught.value.code is code


def test_watch_skips_revisions_already_seen(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    def first_three() -> list[int]:
        watch = client.watch("sender_51")
        revisions = [next(watch).revision for _ in range(3)]
        watch.close()
        return revisions

    future = call(pool, first_three)
    _, request, rpc = channel.take_unary_stream(method("WatchSession"))
    assert request.instance_id == "sender_51"
    for revision in (3, 2, 3, 4, 6):
        rpc.send_response(
            pb.WatchSessionResponse(session=session_pb2.WhatsAppSession(id=7, revision=revision))
        )
    assert future.result(5) == [3, 4, 6]
    rpc.terminate((), grpc.StatusCode.OK, "")


def test_watch_follows_id_and_revision(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    """A new incarnation (another id) is yielded from its revision 1 on, never hidden."""

    def first_four() -> list[tuple[int, int]]:
        watch = client.watch("sender_51")
        states = [(s.id, s.revision) for s in (next(watch) for _ in range(4))]
        watch.close()
        return states

    future = call(pool, first_four)
    _, _, rpc = channel.take_unary_stream(method("WatchSession"))
    for session_id, revision in ((7, 5), (7, 5), (8, 1), (8, 1), (8, 2), (8, 3)):
        session = session_pb2.WhatsAppSession(id=session_id, revision=revision)
        rpc.send_response(pb.WatchSessionResponse(session=session))
    assert future.result(5) == [(7, 5), (8, 1), (8, 2), (8, 3)]
    rpc.terminate((), grpc.StatusCode.OK, "")


def test_retry_policy_covers_only_idempotent_reads() -> None:
    import json

    from sessionmanager_client._base import ChannelSettings

    options = dict(ChannelSettings().channel_options())
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    (method_config,) = config["methodConfig"]
    names = {entry["method"] for entry in method_config["name"]}
    assert names == {"GetSession", "ListSessions", "WatchSession", "WatchSessions", "GetMessage"}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "grpc.service_config" not in dict(ChannelSettings(retry=False).channel_options())


def test_a_send_with_its_key_is_sent_again_after_unavailable(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    """The server answers a repeated key with the first result: trying again is safe."""
    future = call(pool, lambda: client.send("sender_51", "+5491100000000", "hola", "order-1"))
    _, first, rpc = channel.take_unary_unary(method("Send"))
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, second, rpc = channel.take_unary_unary(method("Send"))
    assert second == first
    assert second.idempotency_key == "order-1"
    rpc.terminate(pb.SendResponse(message_id="m-1", replayed=True), (), grpc.StatusCode.OK, "")
    assert future.result(5).message_id == "m-1"


def test_a_send_without_a_key_is_never_sent_again(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    future = call(pool, lambda: client.send("sender_51", "+5491100000000", "hola"))
    _, request, rpc = channel.take_unary_unary(method("Send"))
    assert not request.HasField("idempotency_key")
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    with pytest.raises(errors.SessionManagerUnavailableError):
        future.result(5)  # answered after one call: a second one would keep it waiting


def test_a_keyed_send_refused_by_the_contract_is_not_sent_again(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    future = call(pool, lambda: client.send("sender_51", "+5491100000000", "hola", "order-2"))
    _, _, rpc = channel.take_unary_unary(method("Send"))
    refused = trailers("WHATSAPP_ERROR", grpc.StatusCode.UNAVAILABLE, "no", instance_id="s")
    rpc.terminate(None, refused, grpc.StatusCode.UNAVAILABLE, "no")
    with pytest.raises(errors.WhatsAppError):
        future.result(5)


def test_the_list_stream_resumes_after_the_last_event_it_received(
    client: SessionManagerClient, channel: Any, pool: Calls
) -> None:
    """After UNAVAILABLE the stream subscribes again after its cursor: nothing twice."""

    items: list[str] = []

    def first_five() -> list[str]:
        stream = client.watch_sessions(types=["session.updated"])
        items.extend(_item(next(stream)) for _ in range(5))
        stream.close()
        return items

    future = call(pool, first_five)
    _, request, rpc = channel.take_unary_stream(method("WatchSessions"))
    assert not request.HasField("after_sequence")
    assert list(request.types) == [pb.EVENT_TYPE_SESSION_UPDATED]
    rpc.send_response(pb.WatchSessionsResponse(session=session_pb2.WhatsAppSession(id=1)))
    rpc.send_response(pb.WatchSessionsResponse(checkpoint=pb.Checkpoint(sequence=5)))
    rpc.send_response(pb.WatchSessionsResponse(event=pb.Event(sequence=6)))
    _until(lambda: len(items) == 3)  # read before the stream breaks, as over a real connection
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "the server restarted")
    _, again, rpc = channel.take_unary_stream(method("WatchSessions"))
    assert again.after_sequence == 6
    for sequence in (6, 7, 8):  # a repeated event is not handed out twice
        rpc.send_response(pb.WatchSessionsResponse(event=pb.Event(sequence=sequence)))
    assert future.result(5) == ["session 1", "checkpoint 5", "event 6", "event 7", "event 8"]
    rpc.terminate((), grpc.StatusCode.OK, "")


def _item(item: pb.WatchSessionsResponse) -> str:
    kind = item.WhichOneof("item")
    if kind == "session":
        return f"session {item.session.id}"
    if kind == "checkpoint":
        return f"checkpoint {item.checkpoint.sequence}"
    return f"event {item.event.sequence}"


def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)
