"""The real engine: whatsmeow's events mapped to the contract, and real neonize
workers on a machine that cannot reach WhatsApp.

``tests/data/whatsmeow_events.json`` holds whatsmeow events as neonize hands
them to the worker: each payload is the event's neonize protobuf, serialized,
next to the fields the worker reads from it. One test decodes every payload
with neonize itself (in a subprocess: neonize rewires logging in the process
that imports it), so the fixtures cannot drift from neonize's schema; the
others check what each event does to the session.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from service.clock import ManualClock
from service.config import Settings
from service.domain.contract import DELIVERED, FAILED, LOGOUT, NETWORK, READ, TIMEOUT, UNKNOWN
from service.domain.receipts import MessageReceipt
from service.domain.states import SessionRef
from service.engine.protocol import EXIT_DONE, EXIT_RETRY
from service.engine.supervisor import WorkerEngine
from service.engine.supervisor import device_dir as device_dir_of
from service.engine.whatsmeow import map_event, map_receipt, phone_from_jid_user
from sessionmanager.v1 import engine_service_pb2 as eng
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from tests.conftest import Harness, start_harness
from tests.flows import eventually
from tests.processes import live_children
from tests.status_details import error_info

RECORDED = json.loads((Path(__file__).parent / "data" / "whatsmeow_events.json").read_text())


def _recorded(event: str, index: int = 0) -> dict[str, Any]:
    fields: dict[str, Any] = [c for c in RECORDED if c["event"] == event][index]["fields"]
    return fields


async def test_the_recorded_payloads_are_what_neonize_decodes() -> None:
    script = (
        "import json, sys\n"
        "from google.protobuf.json_format import MessageToDict\n"
        "from neonize.proto import Neonize_pb2 as N\n"
        "cases = json.load(sys.stdin)\n"
        "out = [MessageToDict(getattr(N, c['event']).FromString(bytes.fromhex(c['payload'])),"
        " preserving_proto_field_name=True) for c in cases]\n"
        "sys.stdout.write(json.dumps(out))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(json.dumps(RECORDED).encode()), 60)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == [c["fields"] for c in RECORDED]


@pytest.mark.parametrize(
    ("event", "index", "paired", "expected"),
    [
        ("PairStatus", 0, False, ("qr_scanned", None, "", None)),
        ("PairStatus", 1, False, ("pairing_failed", None, "PAIRING_REJECTED", EXIT_DONE)),
        ("Connected", 0, True, ("connected", None, "", None)),
        ("KeepAliveRestored", 0, True, ("connected", None, "", None)),
        ("Disconnected", 0, True, ("disconnected", NETWORK, "NETWORK", None)),
        ("Disconnected", 0, False, ("pairing_failed", None, "PAIRING_ENDED", EXIT_DONE)),
        ("KeepAliveTimeout", 0, True, ("disconnected", TIMEOUT, "KEEPALIVE_TIMEOUT", None)),
        ("LoggedOut", 0, True, ("disconnected", LOGOUT, "LOGOUT", EXIT_DONE)),
        ("LoggedOut", 1, True, ("disconnected", LOGOUT, "LOGOUT", EXIT_DONE)),
        ("StreamReplaced", 0, True, ("disconnected", UNKNOWN, "STREAM_REPLACED", EXIT_DONE)),
        ("TemporaryBan", 0, True, ("failed", None, "TEMPORARY_BAN", EXIT_DONE)),
        ("ClientOutdated", 0, True, ("failed", None, "CLIENT_OUTDATED", EXIT_DONE)),
        ("ConnectFailure", 0, True, ("disconnected", NETWORK, "WHATSAPP_UNAVAILABLE", EXIT_RETRY)),
        ("ConnectFailure", 1, True, ("failed", None, "CONNECT_FAILURE_BAD_USER_AGENT", EXIT_DONE)),
        ("StreamError", 0, True, ("disconnected", UNKNOWN, "STREAM_ERROR", EXIT_RETRY)),
    ],
)
def test_each_whatsmeow_event_maps_to_its_own_contract_outcome(
    event: str, index: int, paired: bool, expected: tuple[str, Any, str, int | None]
) -> None:
    outcome = map_event(event, _recorded(event, index), paired=paired)
    assert outcome is not None
    report, reason, code, ends = expected
    assert outcome.report == report
    if reason is not None:
        assert outcome.reason == reason
    assert outcome.code == code
    assert outcome.ends == ends
    if outcome.report in ("failed", "pairing_failed", "disconnected"):
        assert outcome.message  # every cause is explained to the operator


def test_the_details_of_an_event_reach_the_message() -> None:
    ban = map_event("TemporaryBan", _recorded("TemporaryBan"), paired=True)
    assert ban is not None
    assert "sent too many same message" in ban.message
    assert "1 day" in ban.message  # Expire: 86400 s
    gone = map_event("LoggedOut", _recorded("LoggedOut", 1), paired=True)
    assert gone is not None
    assert gone.wipe_credentials
    assert "account is gone" in gone.message
    keepalive = map_event("KeepAliveTimeout", _recorded("KeepAliveTimeout"), paired=True)
    assert keepalive is not None
    assert keepalive.reconnects
    assert "3 missed" in keepalive.message
    assert map_event("HistorySync", {}, paired=True) is None


def test_whatsmeow_receipts_move_sent_messages() -> None:
    now = datetime(2026, 12, 4, 12, tzinfo=UTC)
    delivered = map_receipt(_recorded("Receipt", 0), now)
    assert delivered == MessageReceipt(
        ("3EB0A1B2C3D4E5F60718", "3EB0A1B2C3D4E5F60719"),
        DELIVERED,
        datetime.fromtimestamp(1796342400, UTC),
    )
    read = map_receipt(_recorded("Receipt", 1), now)
    assert read is not None
    assert (read.whatsapp_message_ids, read.status) == (("3EB0A1B2C3D4E5F60718",), READ)
    played = map_receipt(_recorded("Receipt", 2), now)
    assert played is not None
    assert played.status == READ  # a voice note heard is read
    refused = map_receipt(_recorded("Receipt", 3), now)
    assert refused is not None
    assert (refused.status, refused.code) == (FAILED, "SERVER_ERROR")
    assert refused.message
    assert map_receipt(_recorded("Receipt", 4), now) is None  # read on this account's own phone


def test_phone_numbers_come_from_the_device_jid() -> None:
    assert phone_from_jid_user("5491122334455") == "+5491122334455"
    assert phone_from_jid_user("5491122334455:12") == "+5491122334455"


# Real neonize workers, offline.


@pytest.fixture
def offline_settings(settings: Settings) -> Settings:
    return replace(settings, engine="whatsmeow", dial_timeout=20.0, qr_timeout=30.0)


@pytest.fixture
async def offline(offline_settings: Settings) -> AsyncIterator[Harness]:
    harness = await start_harness(offline_settings, ManualClock())
    try:
        yield harness
    finally:
        await harness.stop()


async def test_pairing_offline_fails_cleanly_and_says_why(offline: Harness) -> None:
    before = live_children()
    await offline.sessions.CreateSession(pb.CreateSessionRequest(instance_id="offline"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await offline.sessions.RequestQR(pb.RequestQRRequest(instance_id="offline"))
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    info = error_info(failure.value)
    assert info.reason == "QR_GENERATION_FAILED"
    assert info.metadata["engine_code"] == "DIAL_FAILED"

    session = (
        await offline.sessions.GetSession(pb.GetSessionRequest(instance_id="offline"))
    ).session
    assert session.status == s.SESSION_STATUS_INIT
    assert session.last_error_code == "DIAL_FAILED"
    assert "could not reach WhatsApp" in session.last_error_message
    assert "web.whatsapp.com" in session.last_error_message  # whatsmeow's own words

    engine = offline.running.engine
    assert isinstance(engine, WorkerEngine)
    assert engine.worker_pids() == {}
    assert live_children() <= before  # the worker is gone, not orphaned

    with pytest.raises(grpc.aio.AioRpcError) as code:
        await offline.sessions.PairPhone(
            pb.PairPhoneRequest(instance_id="offline", phone_number="+5491122334455")
        )
    assert error_info(code.value).reason == "QR_GENERATION_FAILED"


async def _paired_before_restart(settings: Settings, iid: str) -> SessionRef:
    """A session that was connected when the server stopped."""
    harness = await start_harness(replace(settings, engine="simulated"), ManualClock())
    try:
        await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
        expires_at = Timestamp()
        expires_at.FromDatetime(harness.clock.now() + timedelta(seconds=60))
        await harness.engine.ReportQRCode(
            eng.ReportQRCodeRequest(
                instance_id=iid, code="2@ref,noise,id,adv", expires_at=expires_at
            )
        )
        connected = await harness.engine.ReportConnected(
            eng.ReportConnectedRequest(instance_id=iid, phone_number="+5491122334455")
        )
        return SessionRef(iid, connected.session.id)
    finally:
        await harness.stop()


async def _until_disconnected(h: Harness, iid: str) -> s.WhatsAppSession:
    async def watch() -> s.WhatsAppSession:
        request = pb.WatchSessionRequest(instance_id=iid)
        async for response in h.sessions.WatchSession(request):
            if response.session.status == s.SESSION_STATUS_DISCONNECTED:
                return response.session
        raise AssertionError("the watch ended")

    return await asyncio.wait_for(watch(), 60)


async def test_restoring_offline_retries_and_shows_the_dial_error(
    offline_settings: Settings,
) -> None:
    paired = await _paired_before_restart(offline_settings, "restore")
    device_dir = device_dir_of(offline_settings.devices_path, paired)
    device_dir.mkdir(parents=True)
    (device_dir / "device.db").touch()  # the stored device of the paired session

    before = live_children()
    harness = await start_harness(offline_settings, ManualClock())
    try:
        session = await _until_disconnected(harness, "restore")
        assert session.last_error_code == "DIAL_FAILED"
        assert "retrying in" in session.last_error_message
        assert session.phone_number == "+5491122334455"
        assert (device_dir / "device.db").exists()  # a failed dial keeps the credentials
    finally:
        await harness.stop()
    await eventually(lambda: live_children() <= before)  # shutdown leaves no worker behind


async def test_restoring_without_credentials_asks_for_a_new_qr(
    offline_settings: Settings,
) -> None:
    await _paired_before_restart(offline_settings, "nocreds")
    harness = await start_harness(offline_settings, ManualClock())
    try:
        session = await _until_disconnected(harness, "nocreds")
        assert session.last_error_code == "LOGOUT"
        assert "no stored device" in session.last_error_message
    finally:
        await harness.stop()
