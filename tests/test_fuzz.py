"""Property-based fuzzing of every RPC's request fields.

Whatever a caller sends, the answer is success or a contract error with
exactly one ErrorInfo, never UNKNOWN or an unexpected INTERNAL, and a rejected
call changes nothing. ``FUZZ_CASES=10000`` runs the full count (default 2,000).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.server import start
from sessionmanager.v1 import engine_service_pb2 as engine
from sessionmanager.v1 import (
    engine_service_pb2_grpc,
    session_service_pb2_grpc,
    simulator_service_pb2_grpc,
)
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim

CASES = int(os.environ.get("FUZZ_CASES", "2000"))
KNOWN = ["fz_init", "fz_qr", "fz_live"]
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
SMALL_ENUM: st.SearchStrategy[Any] = st.one_of(st.integers(min_value=-3, max_value=20), INT32)

# (gRPC code, reason) pairs a well-behaved service may answer with.
ALLOWED = {
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INSTANCE_ID"),
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"),
    (grpc.StatusCode.ALREADY_EXISTS, "SESSION_ALREADY_EXISTS"),
    (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_ALREADY_CONNECTED"),
    (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_NOT_CONNECTED"),
    (grpc.StatusCode.FAILED_PRECONDITION, "QR_NOT_AVAILABLE"),
    (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION"),
    (grpc.StatusCode.UNAVAILABLE, "WHATSAPP_ERROR"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"),
}
# The contract's one INTERNAL answer: the engine could not show a code (here, a
# fault the simulator injects). Only RequestQR can give it; no input ever does.
ENGINE_FAILURE = (grpc.StatusCode.INTERNAL, "QR_GENERATION_FAILED")

_chars = st.characters(blacklist_categories=["Cs"])  # protobuf strings are valid UTF-8
texts = st.one_of(
    st.text(_chars, max_size=80),
    st.builds(lambda char, n: char * n, st.sampled_from("x ñ\u200b😀"), st.integers(4000, 5000)),
    st.sampled_from(["", " ", "\x00", "+5491122334455", "2@abc,def", "TEMPORARY_BAN", "ñ" * 70]),
    st.sampled_from(["\u200b\u200d", "\u3164", "\x1b[2J", "\u202eabc", " \n\t", "🙂" * 700]),
)
instance_ids = st.one_of(st.sampled_from(KNOWN), st.sampled_from(["nobody", "sender_9"]), texts)
# Valid timestamps (years 1 to 9999), and the ones protobuf can carry but no
# calendar has: seconds out of that range, nanos out of [0, 1e9).
timestamps = st.builds(
    lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
    st.one_of(
        st.integers(min_value=-62135596800, max_value=253402300799),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.sampled_from([-62135596801, 253402300800, -(2**63), 2**63 - 1]),
    ),
    st.one_of(
        st.integers(min_value=0, max_value=999_999_999),
        INT32,
        st.sampled_from([-1, 1_000_000_000]),
    ),
)


def _send(draw: st.DrawFn, iid: str) -> pb.SendRequest:
    request = pb.SendRequest(instance_id=iid, to=draw(texts), text=draw(texts))
    if draw(st.booleans()):
        request.idempotency_key = draw(texts)
    return request


def _list(draw: st.DrawFn, iid: str) -> pb.ListSessionsRequest:
    request = pb.ListSessionsRequest(page_size=draw(INT32), page_token=draw(texts))
    if draw(st.booleans()):
        request.status = draw(SMALL_ENUM)
    return request


# method -> (service, a function of (draw, instance_id) giving the request)
REQUESTS: dict[str, tuple[str, Callable[[st.DrawFn, str], Any]]] = {
    "GetSession": ("sessions", lambda d, i: pb.GetSessionRequest(instance_id=i)),
    "RequestQR": ("sessions", lambda d, i: pb.RequestQRRequest(instance_id=i)),
    "Disconnect": ("sessions", lambda d, i: pb.DisconnectRequest(instance_id=i)),
    "CreateSession": ("sessions", lambda d, i: pb.CreateSessionRequest(instance_id=i)),
    "DeleteSession": ("sessions", lambda d, i: pb.DeleteSessionRequest(instance_id=i)),
    "Send": ("sessions", _send),
    "ListSessions": ("sessions", _list),
    "ReportQRCode": (
        "engine",
        lambda d, i: engine.ReportQRCodeRequest(
            instance_id=i, code=d(texts), expires_at=d(timestamps)
        ),
    ),
    "ReportQRScanned": ("engine", lambda d, i: engine.ReportQRScannedRequest(instance_id=i)),
    "ReportConnecting": ("engine", lambda d, i: engine.ReportConnectingRequest(instance_id=i)),
    "ReportConnected": (
        "engine",
        lambda d, i: engine.ReportConnectedRequest(instance_id=i, phone_number=d(texts)),
    ),
    "ReportDisconnected": (
        "engine",
        lambda d, i: engine.ReportDisconnectedRequest(
            instance_id=i, reason=d(SMALL_ENUM), message=d(texts)
        ),
    ),
    "ReportError": (
        "engine",
        lambda d, i: engine.ReportErrorRequest(instance_id=i, code=d(texts), message=d(texts)),
    ),
    "ScanQR": (
        "simulator",
        lambda d, i: sim.ScanQRRequest(
            instance_id=i, phone_number=d(texts), hold_handshake=d(st.booleans())
        ),
    ),
    "DropNetwork": (
        "simulator",
        lambda d, i: sim.DropNetworkRequest(instance_id=i, hold_reconnect=d(st.booleans())),
    ),
    "FailSession": (
        "simulator",
        lambda d, i: sim.FailSessionRequest(instance_id=i, code=d(texts), message=d(texts)),
    ),
    "InjectFault": (
        "simulator",
        lambda d, i: sim.InjectFaultRequest(instance_id=i, fault=d(SMALL_ENUM)),
    ),
}


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, str, Any]:
    """(service, method, request) for a random RPC with random fields."""
    method = draw(st.sampled_from(sorted(REQUESTS)))
    service, build = REQUESTS[method]
    return service, method, build(draw, draw(instance_ids))


class Live:
    """A real server in a background event loop, called with the synchronous client."""

    def __init__(self, database: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = replace(
            Settings(),
            address="127.0.0.1:0",
            http_address="",  # gRPC only: never the shared default port 8080
            database=database,
            engine="simulated",
            send_rate=0,
            qr_first_seconds=3600,
        )
        self.running = self._run(start(config))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stubs: dict[str, Any] = {
            "sessions": session_service_pb2_grpc.SessionServiceStub(self.channel),
            "engine": engine_service_pb2_grpc.EngineServiceStub(self.channel),
            "simulator": simulator_service_pb2_grpc.SimulatorServiceStub(self.channel),
        }

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def snapshot(self) -> dict[str, bytes]:
        listed = self.stubs["sessions"].ListSessions(pb.ListSessionsRequest(page_size=1000))
        return {x.instance_id: x.SerializeToString(deterministic=True) for x in listed.sessions}

    def close(self) -> None:
        self.channel.close()
        self._run(self.running.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Live(tmp_path_factory.mktemp("fuzz") / "sessions.db")
    sessions, phone = server.stubs["sessions"], server.stubs["simulator"]
    for iid in KNOWN:
        sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
    sessions.RequestQR(pb.RequestQRRequest(instance_id="fz_qr"))
    sessions.RequestQR(pb.RequestQRRequest(instance_id="fz_live"))
    phone.ScanQR(sim.ScanQRRequest(instance_id="fz_live"))
    yield server
    server.close()
    # Each case fails on its own assertions; this line is the run's summary.
    total = sum(counts.values())
    print(f"fuzz: {total} cases, {dict(sorted(counts.items()))}, {len(failures)} failures")


def _error_infos(error: grpc.RpcError) -> list[Any]:
    trailers: Any = error.trailing_metadata() or ()
    raw = dict(trailers).get("grpc-status-details-bin")
    if raw is None:
        return []
    infos = []
    for detail in status_pb2.Status.FromString(raw).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    return infos


counts: Counter[str] = Counter()
failures: list[str] = []


@settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(call=calls())
def test_every_answer_is_success_or_a_contract_error(
    live: Live, call: tuple[str, str, Any]
) -> None:
    service, method, request = call
    counts[method] += 1
    before = live.snapshot()
    invoke: Callable[..., Any] = getattr(live.stubs[service], method)
    try:
        invoke(request, timeout=10)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        infos = _error_infos(error)
        allowed = ALLOWED | {ENGINE_FAILURE} if method == "RequestQR" else ALLOWED
        if len(infos) != 1 or (code, infos[0].reason) not in allowed:
            failures.append(f"{method}: {code} {[i.reason for i in infos]}")
        assert len(infos) == 1, f"{method} answered {code} with {len(infos)} ErrorInfo"
        assert (code, infos[0].reason) in allowed, f"{method} answered {code} {infos[0].reason}"
        # A refused send is recorded as a message, never as a session change; an
        # engine that could not pair is a fact the session records (its cause in
        # last_error_*, its shown code expired), not a refusal of the input.
        if method != "Send" and (code, infos[0].reason) != ENGINE_FAILURE:
            assert live.snapshot() == before, f"the rejected {method} changed a session"


def test_oversized_requests_are_refused(live: Live) -> None:
    sessions = live.stubs["sessions"]
    huge = pb.SendRequest(instance_id="fz_live", to="+5491122334455", text="x" * (1 << 20))
    with pytest.raises(grpc.RpcError) as too_big:
        sessions.Send(huge, timeout=10)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    long = pb.SendRequest(instance_id="fz_live", to="+5491122334455", text="x" * 4097)
    with pytest.raises(grpc.RpcError) as too_long:
        sessions.Send(long, timeout=10)
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
