"""Every contract error over HTTP: seed 003's body, the table's status, nothing changed.

The server has tokens (so 401 and 403 are real) and a send limit of one
message at once (so 429 is real); each reason of the contract is produced the
way a caller would meet it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.domain.states import SessionRef
from service.engine.port import EngineError
from service.store import sql
from sessionmanager.v1 import session_pb2
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness
from tests.test_http_api import API, error_of, ok

PUBLIC = "public-token"
INTERNAL = "internal-token"
AS_ENGINE = (("authorization", f"Bearer {INTERNAL}"),)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(
        settings,
        public_tokens=(PUBLIC.encode(),),
        internal_tokens=(INTERNAL.encode(),),
        send_rate=0.5,
        send_burst=1,
    )


@pytest.fixture
async def http(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=harness.http_url + API, headers={"Authorization": f"Bearer {PUBLIC}"}
    ) as client:
        yield client


@pytest.fixture
async def engine_side(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=harness.http_url + API, headers={"Authorization": f"Bearer {INTERNAL}"}
    ) as client:
        yield client


async def _connected(harness: Harness, http: httpx.AsyncClient, iid: str) -> None:
    ok(await http.post("/sessions", json={"instance_id": iid}), 201)
    ok(await http.post(f"/sessions/{iid}/qr"))
    await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid), metadata=AS_ENGINE)


async def test_every_reason_has_its_status_and_body(
    harness: Harness,
    http: httpx.AsyncClient,
    engine_side: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: set[str] = set()

    def expect(response: httpx.Response, http_status: int, code: str, **details: str) -> None:
        assert error_of(response, http_status, code) == details
        seen.add(code)

    expect(await http.get("/sessions/nobody"), 404, "SESSION_NOT_FOUND", instance_id="nobody")
    expect(await http.get("/sessions/bad!id"), 400, "INVALID_INSTANCE_ID", instance_id="bad!id")
    ok(await http.post("/sessions", json={"instance_id": "sender_1"}), 201)
    expect(
        await http.post("/sessions", json={"instance_id": "sender_1"}),
        409,
        "SESSION_ALREADY_EXISTS",
        instance_id="sender_1",
    )
    expect(
        await http.post("/sessions/sender_1/send", json={"to": "+5491100000000", "text": "hi"}),
        409,
        "SESSION_NOT_CONNECTED",
        instance_id="sender_1",
        status="init",
    )
    expect(
        await engine_side.post(
            "/internal/events/connected",
            json={"instance_id": "sender_1", "phone_number": "+5491122334455"},
        ),
        409,
        "INVALID_TRANSITION",
        instance_id="sender_1",
        status="init",
    )
    expect(
        await http.post("/sessions/sender_1/send", json={"to": "not a phone", "text": "hi"}),
        400,
        "INVALID_ARGUMENT",
        field="to",
        instance_id="sender_1",
    )

    await harness.simulator.InjectFault(
        sim.InjectFaultRequest(instance_id="sender_1", fault=sim.FAULT_PAIRING), metadata=AS_ENGINE
    )
    failed = await http.post("/sessions/sender_1/qr")
    assert error_of(failed, 500, "QR_GENERATION_FAILED")["engine_code"] == "PAIRING_FAILED"
    seen.add("QR_GENERATION_FAILED")

    ok(await http.post("/sessions", json={"instance_id": "sender_2"}), 201)
    ok(await http.post("/sessions/sender_2/qr"))
    await harness.simulator.ScanQR(
        sim.ScanQRRequest(instance_id="sender_2", hold_handshake=True), metadata=AS_ENGINE
    )
    expect(
        await http.post("/sessions/sender_2/qr"),
        409,
        "QR_NOT_AVAILABLE",
        instance_id="sender_2",
        status="connecting",
    )

    await _connected(harness, http, "sender_3")
    expect(
        await http.post("/sessions/sender_3/qr"),
        409,
        "SESSION_ALREADY_CONNECTED",
        instance_id="sender_3",
        status="connected",
    )
    await harness.simulator.InjectFault(
        sim.InjectFaultRequest(instance_id="sender_3", fault=sim.FAULT_SEND), metadata=AS_ENGINE
    )
    whatsapp = await http.post(
        "/sessions/sender_3/send", json={"to": "+5491100000000", "text": "hi"}
    )
    details = error_of(whatsapp, 502, "WHATSAPP_ERROR")
    assert details["instance_id"] == "sender_3"
    assert details["replayed"] == "false"
    seen.add("WHATSAPP_ERROR")

    await _connected(harness, http, "sender_4")
    message = {"to": "+5491100000000", "text": "hi"}
    ok(await http.post("/sessions/sender_4/send", json=message))
    limited = await http.post("/sessions/sender_4/send", json=message)
    expect(limited, 429, "LIMIT_EXCEEDED", limit="send_rate", instance_id="sender_4")
    assert limited.headers["retry-after"] == "2"

    unauthenticated = await http.get("/sessions/sender_1", headers={"Authorization": ""})
    expect(unauthenticated, 401, "UNAUTHENTICATED")
    assert unauthenticated.headers["www-authenticate"] == "Bearer"
    expect(
        await http.get("/sessions/sender_1", headers={"Authorization": "Bearer wrong"}),
        401,
        "UNAUTHENTICATED",
    )
    expect(
        await http.post(
            "/internal/events/disconnected", json={"instance_id": "sender_3", "reason": "NETWORK"}
        ),
        403,
        "PERMISSION_DENIED",
        method="POST",
    )
    expect(await engine_side.get("/sessions/sender_3"), 403, "PERMISSION_DENIED", method="GET")

    async def unanswered(session: SessionRef, to: str, text: str) -> str:
        raise EngineError("ENGINE_TIMEOUT", "the engine did not answer", definite=False)

    await _connected(harness, http, "sender_5")
    monkeypatch.setattr(harness.running.manager.engine, "send", unanswered)
    unknown = await http.post(
        "/sessions/sender_5/send", json={"to": "+5491100000000", "text": "lost"}
    )
    details = error_of(unknown, 500, "MESSAGE_OUTCOME_UNKNOWN")
    assert (details["engine_code"], details["replayed"]) == ("ENGINE_TIMEOUT", "false")
    assert details["message_id"]
    seen.add("MESSAGE_OUTCOME_UNKNOWN")

    async def read_only(db: sql.Db) -> None:
        await db.execute("PRAGMA query_only = ON")  # SQLite refuses every write from now on

    await harness.sqlite_store.run(read_only)
    expect(
        await http.post("/sessions", json={"instance_id": "sender_6"}),
        503,
        "STORAGE_UNAVAILABLE",
        cause="read_only",
        commit="none",
    )

    def broken(instance_id: str) -> Any:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(harness.running.manager, "get", broken)
    expect(await http.get("/sessions/sender_1"), 500, "SESSION_MANAGER_ERROR")

    every_reason = {
        name.removeprefix("ERROR_REASON_")
        for name in session_pb2.ErrorReason.keys()  # noqa: SIM118 - an enum wrapper
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    # Only several nodes give SESSION_MOVING: tests/test_cluster_nodes.py checks it over HTTP.
    assert seen == every_reason - {"SESSION_MOVING"}


async def _revision(http: httpx.AsyncClient, iid: str) -> int:
    return ok(await http.get(f"/sessions/{iid}"))["revision"]  # type: ignore[no-any-return]


async def test_bad_requests_are_refused_and_change_nothing(
    harness: Harness, http: httpx.AsyncClient
) -> None:
    await _connected(harness, http, "sender_5")
    before = await _revision(http, "sender_5")
    send = "/sessions/sender_5/send"
    cases: list[tuple[httpx.Response, int, str]] = [
        (await http.post(send, content=b'{"to": "+549110', headers=_JSON), 400, "body"),
        (await http.post(send, content=b"[1, 2]", headers=_JSON), 400, "body"),
        (await http.post(send, json={"to": "+5491100000000", "text": 5}), 400, "text"),
        (await http.post(send, json={"to": "+5491100000000", "text": "a", "cc": "x"}), 400, "cc"),
        (await http.post(send, json={"to": "+5491100000000"}), 400, "text"),
        (await http.post(send, json={"to": "+5491100000000", "text": "   "}), 400, "text"),
        (await http.post(send, content=b"to=1&text=2", headers=_FORM), 415, "content-type"),
        (await http.post(send, content=b" " * (64 * 1024 + 1), headers=_JSON), 413, "body"),
        (await http.post(send), 400, "body"),
        (
            await http.post(
                send,
                json={"to": "+5491100000000", "text": "a", "idempotency_key": "k1"},
                headers={"Idempotency-Key": "k2"},
            ),
            400,
            "idempotency_key",
        ),
        (await http.post("/sessions/sender_5/disconnect", json={"now": True}), 400, "now"),
        (await http.get("/sessions", params={"page_size": "many"}), 400, "page_size"),
        (await http.get("/sessions", params={"page_size": "5000"}), 400, "page_size"),
        (await http.get("/sessions", params={"page_token": "nope"}), 400, "page_token"),
        (await http.get("/sessions", params={"status": "online"}), 400, "status"),
        (await http.post("/sessions", json={"instance_id": 51}), 400, "instance_id"),
        (await http.get("/no/such/route"), 404, "path"),
        (await http.put("/sessions/sender_5"), 405, "path"),
    ]
    for response, status, field in cases:
        assert error_of(response, status, "INVALID_ARGUMENT")["field"] == field, response.text
    assert await _revision(http, "sender_5") == before
    listed = ok(await http.get("/sessions"))["sessions"]
    assert [s["instance_id"] for s in listed] == ["sender_5"]
    assert (await harness.running.manager.get("sender_5")).revision == before


_JSON = {"Content-Type": "application/json"}
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_a_stopping_server_answers_503(harness: Harness, http: httpx.AsyncClient) -> None:
    options = harness.running.http_options
    assert options is not None
    options.draining = True
    try:
        response = await http.get("/sessions/sender_1")
        details = error_of(response, 503, "SESSION_MANAGER_ERROR")
        assert details == {"shutting_down": "true"}
        assert response.headers["retry-after"] == "1"
    finally:
        options.draining = False
