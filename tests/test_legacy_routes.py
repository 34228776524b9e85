"""The old single-session service's routes (seed 003, sections 0 and 4), for the transition.

Off by default; with ``--legacy-instance`` they serve that one session with the
old status words (``AUTHENTICATED``, ``READY``), ``cliente_id`` accepted and
ignored, and every answer carries ``Deprecation``, ``Sunset`` and a ``Link`` to
the route that replaces it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness, start_harness

LEGACY = "sender_51"
SESSIONS = f"/api/session-manager/sessions/{LEGACY}"
PNG = "data:image/png;base64,"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, legacy_instance=LEGACY)


@pytest.fixture
async def http(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.http_url, timeout=10) as client:
        yield client


def deprecated(response: httpx.Response, successor: str) -> Any:
    """The body of an answer of an old route, once its deprecation headers are checked."""
    assert response.headers["deprecation"] == "@1796342400"  # 2026-12-04T00:00:00Z
    assert response.headers["sunset"] == "Wed, 30 Jun 2027 23:59:59 GMT"
    assert response.headers["link"] == f'<{successor}>; rel="successor-version"'
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def test_the_old_routes_serve_the_one_session_with_the_old_words(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    missing = await http.get("/status")
    assert missing.status_code == 404
    assert deprecated(missing, SESSIONS)["code"] == "SESSION_NOT_FOUND"

    connect = await http.post("/connect")
    assert connect.status_code == 200
    shown = deprecated(connect, f"{SESSIONS}/qr")
    assert shown["status"] == "QR_REQUIRED"
    assert shown["qr_string"].startswith(PNG)
    assert shown["session"]["status"] == "qr_required"  # the contract's form beside it
    qr = deprecated(await http.get("/qr"), f"{SESSIONS}/qr")
    assert (qr["status"], qr["qr_string"]) == ("QR_REQUIRED", shown["qr_string"])

    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id=LEGACY, hold_handshake=True))
    assert deprecated(await http.get("/status"), SESSIONS)["status"] == "AUTHENTICATED"
    await harness.simulator.CompleteHandshake(sim.CompleteHandshakeRequest(instance_id=LEGACY))
    ready = deprecated(await http.get("/status"), SESSIONS)
    assert (ready["status"], ready["session"]["status"]) == ("READY", "connected")
    again = deprecated(await http.post("/connect"), f"{SESSIONS}/qr")
    assert again["status"] == "READY"  # connected: nothing to pair
    no_qr = await http.get("/qr")
    assert no_qr.status_code == 409
    assert deprecated(no_qr, f"{SESSIONS}/qr")["code"] == "SESSION_ALREADY_CONNECTED"

    body = {"to": "+5491100000000", "message": "hola", "cliente_id": 51}
    sent = await http.post("/send", json=body, headers={"Idempotency-Key": "order-1"})
    first = deprecated(sent, f"{SESSIONS}/send")
    assert (first["status"], first["replayed"]) == ("sent", False)
    repeated = await http.post("/send", json=body, headers={"Idempotency-Key": "order-1"})
    assert deprecated(repeated, f"{SESSIONS}/send")["message_id"] == first["message_id"]
    both = await http.post("/send", json={**body, "text": "hola"})
    assert both.status_code == 400
    assert deprecated(both, f"{SESSIONS}/send")["code"] == "INVALID_ARGUMENT"

    gone = deprecated(await http.post("/disconnect"), f"{SESSIONS}/disconnect")
    assert gone["status"] == "DISCONNECTED"
    await harness.simulator.FailSession(sim.FailSessionRequest(instance_id=LEGACY))
    failed = deprecated(await http.get("/status"), SESSIONS)
    assert (failed["status"], failed["session"]["last_error_code"]) == ("ERROR", "TEMPORARY_BAN")


async def test_the_old_routes_are_off_by_default(settings: Settings) -> None:
    running = await start_harness(replace(settings, legacy_instance=""), ManualClock())
    try:
        async with httpx.AsyncClient(base_url=running.http_url) as http:
            message = {"to": "+5491100000000", "message": "hola"}
            for method, path, body in (
                ("GET", "/status", None),
                ("POST", "/connect", None),
                ("POST", "/send", message),
            ):
                answer = await http.request(method, path, json=body)
                assert answer.status_code == 404, (method, path)
                assert answer.json()["code"] == "INVALID_ARGUMENT"
                assert "--legacy-instance" in answer.json()["message"]
                assert "deprecation" not in answer.headers
    finally:
        await running.stop()


async def test_the_document_marks_the_old_routes_deprecated(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()
    for method, path in (
        ("get", "/status"),
        ("get", "/qr"),
        ("post", "/connect"),
        ("post", "/disconnect"),
        ("post", "/send"),
    ):
        operation = document["paths"][path][method]
        assert operation["deprecated"] is True
        assert "--legacy-instance" in operation["description"]
    assert "deprecated" not in document["paths"][SESSIONS.replace(LEGACY, "{instance_id}")]["get"]
