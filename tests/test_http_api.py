"""The HTTP/JSON API against a real server: seed 004's JSON, exactly, on every route.

The server runs in-process on port 0 with the manual clock and the simulated
phone (the ``harness`` fixture); a plain HTTP client calls it as Central Hub does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from service.clock import ManualClock
from service.config import Settings
from service.domain.contract import QR_EXPIRED
from service.domain.states import Session
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness

API = "/api/session-manager"
SEED_004_FIELDS = [
    "id",
    "instance_id",
    "phone_number",
    "status",
    "qr_status",
    "qr_string",
    "qr_generated_at",
    "qr_expires_at",
    "connected_at",
    "disconnected_at",
    "last_error_code",
    "last_error_message",
    "created_at",
    "updated_at",
]
RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?Z")
PNG_DATA_URL = re.compile(r"data:image/png;base64,[A-Za-z0-9+/]+=*")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """One QR code per pairing, so that a code expires after 60 s of the manual clock."""
    return replace(settings, qr_codes=1)


async def committed(harness: Harness, iid: str, done: Callable[[Session], bool]) -> None:
    """Wait until the session's committed state satisfies ``done`` (bounded)."""
    manager = harness.running.manager
    watcher = await manager.watch(iid)
    try:
        async with asyncio.timeout(5):
            while not done(await watcher.next()):
                pass
    finally:
        manager.unwatch(iid, watcher)


@pytest.fixture
async def http(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.http_url + API) as client:
        yield client


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    """The error body's ``details``, once the status and seed 003's shape are checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error", "code", "message", "details"]
    assert body["error"] is True
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert all(isinstance(value, str) for value in body["details"].values())
    return dict(body["details"])


async def test_a_created_session_is_seed_004s_entity_exactly(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    created = ok(await http.post("/sessions", json={"instance_id": "sender_51"}), 201)
    assert list(created) == [*SEED_004_FIELDS, "revision"]
    assert created == {
        "id": 1,
        "instance_id": "sender_51",
        "phone_number": None,
        "status": "init",
        "qr_status": "none",
        "qr_string": None,
        "qr_generated_at": None,
        "qr_expires_at": None,
        "connected_at": None,
        "disconnected_at": None,
        "last_error_code": None,
        "last_error_message": None,
        "created_at": "2026-01-04T12:00:00Z",
        "updated_at": "2026-01-04T12:00:00Z",
        "revision": 1,
    }
    assert ok(await http.get("/sessions/sender_51")) == created


async def test_request_qr_is_idempotent_and_renews_an_expired_code(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    ok(await http.post("/sessions", json={"instance_id": "sender_51"}), 201)
    first = ok(await http.post("/sessions/sender_51/qr"))
    assert list(first) == ["qr_string", "qr_expires_at", "session"]
    assert PNG_DATA_URL.fullmatch(first["qr_string"])
    assert first["qr_expires_at"] == "2026-01-04T12:01:00Z"
    session = first["session"]
    assert (session["status"], session["qr_status"]) == ("qr_required", "generated")
    assert session["qr_string"] == first["qr_string"]
    assert session["qr_generated_at"] == "2026-01-04T12:00:00Z"
    assert session["qr_expires_at"] == first["qr_expires_at"]
    assert session["revision"] == 2

    again = ok(await http.post("/sessions/sender_51/qr", json={}))
    assert again == first  # the same valid code, nothing committed

    await harness.clock.advance(61)
    await committed(harness, "sender_51", lambda s: s.qr_status == QR_EXPIRED)
    expired = ok(await http.get("/sessions/sender_51"))
    assert (expired["status"], expired["qr_status"]) == ("qr_required", "expired")
    assert expired["qr_string"] == first["qr_string"]
    assert expired["qr_expires_at"] == "2026-01-04T12:01:00Z"

    renewed = ok(await http.post("/sessions/sender_51/qr"))
    assert renewed["qr_string"] != first["qr_string"]
    assert renewed["session"]["qr_status"] == "generated"
    assert renewed["qr_expires_at"] == "2026-01-04T12:02:01Z"


async def _connected(harness: Harness, http: httpx.AsyncClient, iid: str) -> dict[str, Any]:
    ok(await http.post("/sessions", json={"instance_id": iid}), 201)
    ok(await http.post(f"/sessions/{iid}/qr"))
    await harness.simulator.ScanQR(
        sim.ScanQRRequest(instance_id=iid, phone_number="+5491122334455")
    )
    return ok(await http.get(f"/sessions/{iid}"))  # type: ignore[no-any-return]


async def test_a_connected_session_then_disconnect(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    connected = await _connected(harness, http, "sender_51")
    assert connected["status"] == "connected"
    assert connected["qr_status"] == "none"
    assert connected["phone_number"] == "+5491122334455"
    assert connected["connected_at"] == "2026-01-04T12:00:00Z"
    assert connected["qr_string"] is None
    assert connected["qr_expires_at"] is None

    disconnected = ok(await http.post("/sessions/sender_51/disconnect"))
    assert disconnected["status"] == "disconnected"
    assert disconnected["qr_status"] == "none"
    assert disconnected["last_error_code"] == "LOGOUT"
    assert RFC3339_Z.fullmatch(disconnected["disconnected_at"])
    assert disconnected["revision"] == connected["revision"] + 1
    assert ok(await http.get("/sessions/sender_51")) == disconnected


async def test_send_with_an_idempotency_key_in_the_header_or_the_body(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    await _connected(harness, http, "sender_51")
    message = {"to": "+54 9 11 0000-0000", "text": "hola"}
    first = ok(
        await http.post(
            "/sessions/sender_51/send", json=message, headers={"Idempotency-Key": "o-1"}
        )
    )
    assert list(first) == [
        "message_id",
        "whatsapp_message_id",
        "status",
        "accepted_at",
        "replayed",
    ]
    assert first["status"] == "sent"
    assert first["replayed"] is False
    assert first["accepted_at"] == "2026-01-04T12:00:00Z"
    assert isinstance(first["whatsapp_message_id"], str)

    replay = ok(
        await http.post("/sessions/sender_51/send", json={**message, "idempotency_key": "o-1"})
    )
    assert replay == {**first, "replayed": True}

    other = ok(await http.post("/sessions/sender_51/send", json=message))
    assert other["message_id"] != first["message_id"]
    assert other["replayed"] is False


async def test_the_engine_side_reports_connections_over_http(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    ok(await http.post("/sessions", json={"instance_id": "sender_7"}), 201)
    ok(await http.post("/sessions/sender_7/qr"))
    connected = ok(
        await http.post(
            "/internal/events/connected",
            json={"instance_id": "sender_7", "phone_number": "+5491122334455"},
        )
    )
    assert (connected["status"], connected["phone_number"]) == ("connected", "+5491122334455")
    dropped = ok(
        await http.post(
            "/internal/events/disconnected", json={"instance_id": "sender_7", "reason": "NETWORK"}
        )
    )
    assert (dropped["status"], dropped["last_error_code"]) == ("disconnected", "NETWORK")
    assert dropped["revision"] == connected["revision"] + 1


async def test_list_pages_filters_and_delete(harness: Harness, http: httpx.AsyncClient) -> None:
    for iid in ("acme-01", "acme-02", "acme-03"):
        ok(await http.post("/sessions", json={"instance_id": iid}), 201)
    ok(await http.post("/sessions/acme-02/qr"))

    first = ok(await http.get("/sessions", params={"page_size": "2"}))
    assert list(first) == ["sessions", "next_page_token"]
    assert [s["instance_id"] for s in first["sessions"]] == ["acme-01", "acme-02"]
    rest = ok(
        await http.get("/sessions", params={"page_size": 2, "page_token": first["next_page_token"]})
    )
    assert [s["instance_id"] for s in rest["sessions"]] == ["acme-03"]
    assert rest["next_page_token"] is None
    pending = ok(await http.get("/sessions", params={"status": "qr_required"}))
    assert [s["instance_id"] for s in pending["sessions"]] == ["acme-02"]
    assert pending["sessions"][0] == ok(await http.get("/sessions/acme-02"))

    deleted = await http.delete("/sessions/acme-02")
    assert deleted.status_code == 204
    assert deleted.content == b""
    error_of(await http.get("/sessions/acme-02"), 404, "SESSION_NOT_FOUND")
    names = ok(await http.get("/sessions"))["sessions"]
    assert [s["instance_id"] for s in names] == ["acme-01", "acme-03"]


async def test_pair_by_phone_code(harness: Harness, http: httpx.AsyncClient) -> None:
    ok(await http.post("/sessions", json={"instance_id": "sender_51"}), 201)
    paired = ok(
        await http.post("/sessions/sender_51/pair-phone", json={"phone_number": "+5491122334455"})
    )
    assert list(paired) == ["linking_code", "session"]
    assert re.fullmatch(r"[A-Z0-9]{8}", paired["linking_code"])
    assert paired["session"]["status"] == "qr_required"


async def test_health_and_the_documents_are_open(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url) as client:
        for path in ("/health", f"{API}/health"):
            assert ok(await client.get(path)) == {"status": "serving"}
        assert ok(await client.get("/openapi.json")) == ok(await client.get(f"{API}/openapi.json"))


async def test_requests_are_counted_by_route_and_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_harness(replace(settings, metrics_address="127.0.0.1:0"), ManualClock())
    try:
        caplog.set_level(logging.DEBUG, logger="service.api.http")
        async with httpx.AsyncClient(base_url=running.http_url + API) as http:
            ok(await http.post("/sessions", json={"instance_id": "sender_9"}), 201)
            for _ in range(2):
                ok(await http.get("/sessions/sender_9"))
            error_of(await http.get("/sessions/ghost"), 404, "SESSION_NOT_FOUND")
            await http.get("/no/such/route")
        metrics = running.running.metrics
        assert metrics is not None
        async with httpx.AsyncClient() as scraper:
            text = (await scraper.get(f"http://127.0.0.1:{metrics.port}/metrics")).text
    finally:
        await running.stop()
    route = f"{API}/sessions/{{instance_id}}"
    for labels, count in (
        (f'method="POST",route="{API}/sessions",status="201"', 1),
        (f'method="GET",route="{route}",status="200"', 2),
        (f'method="GET",route="{route}",status="404"', 1),
        ('method="GET",route="unmatched",status="404"', 1),
    ):
        assert f"sessionmanager_http_requests_total{{{labels}}} {count}.0" in text
    assert (
        f'sessionmanager_http_request_duration_seconds_count{{method="GET",route="{route}"}} 3.0'
        in text
    )

    lines = [r for r in caplog.records if r.name == "service.api.http"]
    requests = [r for r in lines if r.levelno == logging.DEBUG]
    assert [r.getMessage().split(" in ")[0] for r in requests] == [
        f"POST {API}/sessions 201",
        f"GET {API}/sessions/sender_9 200",
        f"GET {API}/sessions/sender_9 200",
        f"GET {API}/sessions/ghost 404",
        "GET /api/session-manager/no/such/route 404",
    ]
    failures = [r for r in lines if r.levelno == logging.INFO]
    assert [getattr(r, "instance_id", None) for r in failures] == ["ghost"]
    assert "SESSION_NOT_FOUND" in failures[0].getMessage()
