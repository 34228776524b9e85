"""Who may call the HTTP API: bearer tokens, the browser cookie and its CSRF rules, CORS, TLS.

The server has a public and an internal token and allows one CORS origin,
``https://hub.example``; a browser is a client holding only the ``sm_auth`` cookie.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.api.auth import Tokens
from service.api.http.auth import Authenticator
from service.clock import ManualClock
from service.config import Settings
from service.server import InsecureAddress, start
from service.startup import ExitCode
from tests.conftest import Harness, start_harness
from tests.test_auth import pki  # noqa: F401 - the certificates fixture
from tests.test_http_api import API, error_of, ok

PUBLIC = "public-token"
INTERNAL = "internal-token"
HUB = "https://hub.example"
WRITE = {"X-Session-Manager-CSRF": "1"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        public_tokens=(PUBLIC.encode(),),
        internal_tokens=(INTERNAL.encode(),),
        cors_origins=HUB,
    )


async def _cookie(harness: Harness, token: str = PUBLIC) -> str:
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        response = await http.post(
            f"{API}/auth/cookie", headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 204, response.text
    return response.cookies["sm_auth"]


def _cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"sm_auth={value}"}


@pytest.fixture
async def browser(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """A client that holds the cookie and no token, as a page of the console does."""
    async with httpx.AsyncClient(
        base_url=harness.http_url + API, cookies={"sm_auth": await _cookie(harness)}
    ) as client:
        yield client


async def test_the_cookie_is_traded_for_a_bearer_token(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        error_of(await http.post("/auth/cookie"), 401, "UNAUTHENTICATED")
        error_of(
            await http.post("/auth/cookie", headers={"Authorization": "Bearer nope"}),
            401,
            "UNAUTHENTICATED",
        )
        issued = await http.post("/auth/cookie", headers={"Authorization": f"Bearer {PUBLIC}"})
    assert issued.status_code == 204
    header = issued.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part for part in header.split(";")}
    assert set(attributes) == {"sm_auth", "httponly", "max-age", "path", "samesite"}
    assert attributes["max-age"].strip() == "Max-Age=43200"
    assert attributes["path"].strip() == "Path=/"
    assert attributes["samesite"].strip().lower() == "samesite=strict"
    role, expiry, signature = issued.cookies["sm_auth"].split(".")
    assert role == "public"
    assert abs(int(expiry) - (time.time() + 43200)) < 60
    assert PUBLIC not in header
    assert len(signature) == 64


async def test_the_cookie_reads_and_follows_events(browser: httpx.AsyncClient) -> None:
    error_of(await browser.get("/sessions/sender_51"), 404, "SESSION_NOT_FOUND")
    ok(await browser.post("/sessions", json={"instance_id": "sender_51"}, headers=WRITE), 201)
    ok(await browser.get("/sessions/sender_51"))
    async with browser.stream("GET", "/sessions/sender_51/events") as events:
        assert events.status_code == 200
        lines = events.aiter_lines()
        assert [await anext(lines) for _ in range(3)] == ["retry: 2000", "", "id: 1"]


async def test_writes_with_the_cookie_need_the_csrf_header_and_a_trusted_origin(
    harness: Harness, browser: httpx.AsyncClient
) -> None:
    create = {"instance_id": "sender_1"}
    refused = await browser.post("/sessions", json=create)
    assert error_of(refused, 403, "PERMISSION_DENIED") == {"header": "X-Session-Manager-CSRF"}
    refused = await browser.post("/sessions", json=create, headers={"X-Session-Manager-CSRF": "0"})
    error_of(refused, 403, "PERMISSION_DENIED")
    evil = await browser.post("/sessions", json=create, headers={**WRITE, "Origin": "https://x.io"})
    assert error_of(evil, 403, "PERMISSION_DENIED") == {"origin": "https://x.io"}
    assert ok(await browser.get("/sessions"))["sessions"] == []  # nothing was created

    own = {**WRITE, "Origin": harness.http_url}
    ok(await browser.post("/sessions", json=create, headers=own), 201)
    hub = {**WRITE, "Origin": HUB}
    ok(await browser.post("/sessions", json={"instance_id": "sender_2"}, headers=hub), 201)
    deleted = await browser.delete("/sessions/sender_2", headers=WRITE)
    assert deleted.status_code == 204

    # Bearer tokens need no CSRF header: no browser sends them by itself.
    async with httpx.AsyncClient(
        base_url=harness.http_url + API, headers={"Authorization": f"Bearer {PUBLIC}"}
    ) as server_side:
        ok(await server_side.post("/sessions", json={"instance_id": "sender_3"}), 201)


async def test_a_cookie_keeps_its_role(harness: Harness, browser: httpx.AsyncClient) -> None:
    reported = await browser.post(
        "/internal/events/disconnected",
        json={"instance_id": "sender_1", "reason": "NETWORK"},
        headers=WRITE,
    )
    assert error_of(reported, 403, "PERMISSION_DENIED") == {"method": "POST"}
    async with httpx.AsyncClient(
        base_url=harness.http_url + API, cookies={"sm_auth": await _cookie(harness, INTERNAL)}
    ) as engine_page:
        error_of(await engine_page.get("/sessions/sender_1"), 403, "PERMISSION_DENIED")


async def test_forged_expired_and_url_credentials_are_refused(harness: Harness) -> None:
    genuine = await _cookie(harness)
    role, expiry, signature = genuine.split(".")
    authority = Authenticator(Tokens(public=(PUBLIC.encode(),)))
    forged = [
        f"internal.{expiry}.{signature}",
        f"{role}.{int(expiry) + 3600}.{signature}",
        f"{role}.{expiry}.{'0' * 64}",
        authority.issue_cookie("public", now=time.time() - 43201),  # expired
        Authenticator(Tokens(public=(b"another",))).issue_cookie("public"),
        "public-token",
    ]
    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        for value in forged:
            response = await http.get("/sessions", headers=_cookie_header(value))
            error_of(response, 401, "UNAUTHENTICATED")
        ok(await http.get("/sessions", headers=_cookie_header(authority.issue_cookie("public"))))
        error_of(
            await http.get("/sessions", params={"access_token": PUBLIC}), 401, "UNAUTHENTICATED"
        )


async def test_a_cookie_survives_a_restart_and_dies_with_its_token(settings: Settings) -> None:
    first = await start_harness(settings, ManualClock())
    try:
        cookie = await _cookie(first)
    finally:
        await first.stop()
    for tokens, status in (((PUBLIC.encode(),), 200), ((b"rotated",), 401)):
        restarted = await start_harness(
            dataclasses.replace(settings, public_tokens=tokens), ManualClock()
        )
        try:
            async with httpx.AsyncClient(base_url=restarted.http_url + API) as http:
                response = await http.get("/sessions", headers=_cookie_header(cookie))
                assert response.status_code == status, response.text
        finally:
            await restarted.stop()


async def test_the_cookie_is_cleared(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        cleared = await http.delete("/auth/cookie")
    assert cleared.status_code == 204
    assert cleared.headers["set-cookie"].startswith('sm_auth=""; ')
    assert "Max-Age=0" in cleared.headers["set-cookie"]


async def test_cors_allows_only_the_configured_origins(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        preflight = await http.options(
            "/sessions",
            headers={
                "Origin": HUB,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-session-manager-csrf",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == HUB
        assert preflight.headers["access-control-allow-credentials"] == "true"
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "x-session-manager-csrf" in allowed
        bearer = {"Authorization": f"Bearer {PUBLIC}"}
        read = await http.get("/sessions", headers={**bearer, "Origin": HUB})
        assert read.headers["access-control-allow-origin"] == HUB
        other = await http.get("/sessions", headers={**bearer, "Origin": "https://x.io"})
        assert "access-control-allow-origin" not in other.headers


async def test_without_tokens_everything_is_open_and_no_cookie_is_set(
    settings: Settings,
) -> None:
    open_settings = dataclasses.replace(
        settings, public_tokens=(), internal_tokens=(), cors_origins=""
    )
    running = await start_harness(open_settings, ManualClock())
    try:
        async with httpx.AsyncClient(base_url=running.http_url + API) as http:
            issued = await http.post("/auth/cookie")
            assert issued.status_code == 204
            assert "set-cookie" not in issued.headers
            ok(await http.post("/sessions", json={"instance_id": "open"}), 201)
            read = await http.get("/sessions/open", headers={"Origin": HUB})
            assert "access-control-allow-origin" not in read.headers  # CORS is off by default
    finally:
        await running.stop()


async def test_https_with_the_grpc_certificates(settings: Settings, pki: Path) -> None:  # noqa: F811
    tls = dataclasses.replace(
        settings,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    running = await start_harness(tls, ManualClock())
    url = f"https://127.0.0.1:{running.running.http_port}{API}"
    try:
        context = ssl.create_default_context(cafile=pki / "ca.pem")
        context.load_cert_chain(pki / "client.pem", pki / "client.key")
        async with httpx.AsyncClient(base_url=url, verify=context) as http:
            issued = await http.post("/auth/cookie", headers={"Authorization": f"Bearer {PUBLIC}"})
            assert issued.status_code == 204
            assert "Secure" in issued.headers["set-cookie"]
        anonymous = ssl.create_default_context(cafile=pki / "ca.pem")
        async with httpx.AsyncClient(base_url=url, verify=anonymous) as http:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await http.get("/health")
    finally:
        await running.stop()


async def test_a_remote_http_address_needs_tokens(settings: Settings) -> None:
    remote = dataclasses.replace(
        settings, public_tokens=(), internal_tokens=(), http_address="0.0.0.0:0"
    )
    with pytest.raises(InsecureAddress, match=r"0\.0\.0\.0:0"):
        await start(remote, ManualClock())
    assert isinstance(settings.database, Path)
    assert not settings.database.exists()  # nothing was opened


def test_a_busy_http_port_is_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [
                str(Path(sys.executable).parent / "session-manager"),
                "serve",
                "--address=127.0.0.1:0",
                f"--http-address=127.0.0.1:{port}",
                f"--database={tmp_path / 'db.sqlite'}",
                "--engine=simulated",
                "--log-level=error",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert run.returncode == ExitCode.ADDRESS_IN_USE
    assert run.stderr.startswith(
        f"session-manager: cannot listen on 127.0.0.1:{port} (--http-address)"
    )
    assert len(run.stderr.splitlines()) == 1, run.stderr
