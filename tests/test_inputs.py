"""Inputs: text must show something, odd internal reports are INVALID_ARGUMENT, and
control characters never reach logs or error messages raw."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from service import logs
from sessionmanager.v1 import engine_service_pb2 as engine
from sessionmanager.v1 import engine_service_pb2_grpc, session_service_pb2_grpc
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness
from tests.servers import ServerProcess
from tests.status_details import error_info

PHONE = "+5491122334455"

INVISIBLE = [
    " \t\n ",
    "\x00",
    "\x00\x01\x1b",
    "\u200b",  # zero-width space (Cf)
    "\u200b\u200c\u200d\u2060\ufeff",  # zero-width joiners, word joiner, BOM
    "\u00a0\u2003\u3000",  # no-break, em and ideographic spaces (Zs)
    "\u2028\u2029",  # line and paragraph separators
    "\u202e\u2066",  # bidirectional override and isolate
    "\u3164\u115f",  # Hangul fillers: letters that draw nothing
    "\u2800",  # blank braille pattern
    "\u0301\u0308",  # combining marks with nothing to mark
]
VISIBLE = [
    "hola",
    "¿Qué tal? ñandú",
    "line one\nline two\r\n\ttabbed",
    "🙂",
    "👨\u200d👩\u200d👧",  # a family emoji: joined by zero-width joiners
    "e\u0301",  # e with a combining acute accent
    "שלום",
    ".",
]


async def _connected(harness: Harness, iid: str) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
    await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid))
    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid, phone_number=PHONE))


async def _invalid(call: object, field: str) -> str:
    """Await a call that must fail with INVALID_ARGUMENT naming ``field``; returns the message."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    info = error_info(refused.value)
    assert (info.reason, info.metadata["field"]) == ("INVALID_ARGUMENT", field)
    return refused.value.details() or ""


async def test_send_refuses_text_with_nothing_visible(harness: Harness) -> None:
    await _connected(harness, "sender_1")
    for n, text in enumerate(INVISIBLE):
        request = pb.SendRequest(
            instance_id="sender_1", to=PHONE, text=text, idempotency_key=f"invisible-{n}"
        )
        message = await _invalid(harness.sessions.Send(request), "text")
        assert not any(ord(char) < 0x20 for char in message), repr(message)
    embedded_nul = pb.SendRequest(instance_id="sender_1", to=PHONE, text="hi\x00there")
    await _invalid(harness.sessions.Send(embedded_nul), "text")
    for n, text in enumerate(VISIBLE):
        request = pb.SendRequest(
            instance_id="sender_1", to=PHONE, text=text, idempotency_key=f"visible-{n}"
        )
        sent = await harness.sessions.Send(request)
        assert sent.message_id
    # The refused ones were never recorded: their keys are still free.
    again = pb.SendRequest(
        instance_id="sender_1", to=PHONE, text="now visible", idempotency_key="invisible-0"
    )
    assert (await harness.sessions.Send(again)).message_id


async def test_engine_reports_with_invisible_messages_are_refused(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_2"))
    report = engine.ReportErrorRequest(
        instance_id="sender_2", code="TEMPORARY_BAN", message="\u200b"
    )
    await _invalid(harness.engine.ReportError(report), "message")
    session = (
        await harness.sessions.GetSession(pb.GetSessionRequest(instance_id="sender_2"))
    ).session
    assert session.revision == 1  # nothing changed


def _stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


async def test_odd_qr_reports_are_invalid_arguments_not_internal(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_3"))
    fine = _stamp(int(harness.clock.now().timestamp()) + 60)
    too_long = engine.ReportQRCodeRequest(instance_id="sender_3", code="ñ" * 1100, expires_at=fine)
    message = await _invalid(harness.engine.ReportQRCode(too_long), "code")
    assert "2200 bytes" in message
    for stamp in (
        _stamp(-62135596801),  # the year 0
        _stamp(253402300800),  # the year 10000
        _stamp(-(2**63)),
        _stamp(1_800_000_000, nanos=-1),
        _stamp(1_800_000_000, nanos=1_000_000_000),
    ):
        request = engine.ReportQRCodeRequest(instance_id="sender_3", code="2@abc", expires_at=stamp)
        await _invalid(harness.engine.ReportQRCode(request), "expires_at")
    session = (
        await harness.sessions.GetSession(pb.GetSessionRequest(instance_id="sender_3"))
    ).session
    assert session.revision == 1  # nothing changed


async def test_error_messages_quote_user_input_escaped(harness: Harness) -> None:
    request = pb.CreateSessionRequest(instance_id="\x1b[2Jevil\nline")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.sessions.CreateSession(request)
    details = refused.value.details() or ""
    assert "\\x1b[2Jevil\\nline" in details
    assert not {"\x1b", "\n"} & set(details)
    assert error_info(refused.value).metadata["instance_id"] == "\\x1b[2Jevil\\nline"


HOSTILE = "bad\x1b[2J\x9b31m\u202eevil\nFORGED INFO line"


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()])
def test_log_lines_escape_control_characters(formatter: logging.Formatter) -> None:
    record = logging.makeLogRecord(
        {
            "msg": "error %s: %s",
            "args": ("CODE", HOSTILE),
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "name": "service",
            "instance_id": "s\x07x",
        }
    )
    line = formatter.format(record)
    assert len(line.splitlines()) == 1
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in line)
    if isinstance(formatter, logs.JsonFormatter):
        fields = json.loads(line)
        shown = f"{fields['message']} instance_id={fields['instance_id']}"
    else:
        shown = line
    assert "bad\\x1b[2J\\x9b31m\\u202eevil\\nFORGED INFO line" in shown
    assert "instance_id=s\\x07x" in shown


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_hostile_error_message_reaches_the_log_escaped(tmp_path: Path, log_format: str) -> None:
    with ServerProcess.start(
        tmp_path / "s.db", f"--log-format={log_format}", "--log-level=info"
    ) as server:
        with grpc.insecure_channel(server.address) as channel:
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            reports = engine_service_pb2_grpc.EngineServiceStub(channel)
            sessions.CreateSession(pb.CreateSessionRequest(instance_id="logged"), timeout=10)
            failed = reports.ReportError(
                engine.ReportErrorRequest(instance_id="logged", code="BANNED", message=HOSTILE),
                timeout=10,
            )
        assert failed.session.last_error_message == HOSTILE  # stored as sent
        assert server.stop() == 0
        written = server.stderr()
    assert not {"\x1b", "\x9b", "\u202e"} & set(written)
    assert not any(line.startswith("FORGED") for line in written.splitlines())
    if log_format == "json":
        written = "\n".join(json.loads(line)["message"] for line in written.splitlines())
    assert "evil\\nFORGED INFO line" in written
