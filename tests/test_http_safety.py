"""The HTTP surface is safe by default (issue 23), probed as an attacker would.

Each test names the attack it refuses: a page on another origin or behind a
rebound DNS name (in Chromium), idle and trickling sockets under a low limit
of open files, malformed credentials, and the smaller leaks of sections 4 and 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import http.server
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from playwright.async_api import Browser, Route, async_playwright

from service.clock import ManualClock
from service.config import Settings
from service.server import InsecureAddress, start
from service.startup import ExitCode, loopback_only
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc
from tests.conftest import Harness, start_harness
from tests.flows import connected, eventually
from tests.servers import ServerProcess, failed_start
from tests.test_auth import pki  # noqa: F401 - the certificates fixture
from tests.test_console import CHROMIUM, CHROMIUM_ARGS
from tests.test_http_api import API, error_of, ok

PUBLIC = "public-token"
INTERNAL = "internal-token"
#: Tokens strong enough to listen beyond loopback (32 URL-safe characters: 192 bits).
STRONG_PUBLIC = "Pq3v8Zk1Lw0Xy7Rt5Nb2Mc4Hd6Jf9Ga_"
STRONG_INTERNAL = "In7Te3Rn4Al0To5Ke9N_2x8Yw1Vu6Qs-"
WRITE = {"X-Session-Manager-CSRF": "1"}


def _with_tokens(settings: Settings, public: str = PUBLIC, internal: str = INTERNAL) -> Settings:
    return dataclasses.replace(
        settings, public_tokens=(public.encode(),), internal_tokens=(internal.encode(),)
    )


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Harness]:
    harness = await start_harness(settings, ManualClock())
    try:
        yield harness
    finally:
        await harness.stop()


@contextlib.asynccontextmanager
async def _chromium(*args: str) -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-needs.sh as root")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *args]
        )
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.contextmanager
def _another_site(page: str) -> Iterator[str]:
    """A web server of another origin (another port) that serves ``page``; its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


async def _status(harness: Harness, iid: str) -> int:
    answer = await harness.sessions.GetSession(pb.GetSessionRequest(instance_id=iid))
    return answer.session.status


# 1. Cross-site control without tokens.


async def test_a_page_on_another_origin_cannot_post_a_form_to_the_service(
    harness: Harness,
) -> None:
    await connected(harness, "victim")
    action = f"{harness.http_url}{API}/sessions/victim/disconnect"
    attack = (
        f'<form method="POST" action="{action}"></form><script>document.forms[0].submit()</script>'
    )
    async with _chromium() as browser:
        page = await browser.new_page()
        with _another_site(attack) as site:
            await page.goto(site)
            await page.wait_for_url(action)
        # The service answered the post, and refused it.
        assert "PERMISSION_DENIED" in await page.inner_text("body")
    assert await _status(harness, "victim") == s.SESSION_STATUS_CONNECTED


async def test_a_page_behind_a_rebound_dns_name_reads_and_deletes_nothing(
    harness: Harness,
) -> None:
    await connected(harness, "victim")
    origin = f"http://rebind.example:{harness.running.http_port}"
    attack = f"""<script>
    window.results = (async () => {{
      const list = await fetch("{API}/sessions");
      const gone = await fetch("{API}/sessions/victim",
                               {{method: "DELETE", headers: {{"X-Session-Manager-CSRF": "1"}}}});
      return {{list: list.status, body: await list.text(), delete: gone.status}};
    }})();
    </script>"""

    async def attacker_page(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=attack)

    # The attacker's name now resolves to loopback: its page's requests reach the service.
    # Chromium's own Local Network Access check, which would also block them, is off: not
    # every browser has it, and the service must refuse them by itself.
    rebinding = ("--host-resolver-rules=MAP rebind.example 127.0.0.1",
                 "--disable-features=LocalNetworkAccessChecks")  # fmt: skip
    async with _chromium(*rebinding) as browser:
        context = await browser.new_context()
        await context.route(f"{origin}/attack", attacker_page)
        page = await context.new_page()
        await page.goto(f"{origin}/attack")
        results = await page.evaluate("window.results")
    assert results["list"] == 400, results
    assert '"field":"host"' in results["body"]
    assert "victim" not in results["body"]
    assert results["delete"] == 400
    assert await _status(harness, "victim") == s.SESSION_STATUS_CONNECTED


async def test_without_tokens_a_browser_writes_only_from_its_own_origin_with_the_header(
    harness: Harness,
) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
        create = {"instance_id": "x"}
        evil = {**WRITE, "Origin": "https://evil.example"}
        refused = await http.post("/sessions", json=create, headers=evil)
        assert error_of(refused, 403, "PERMISSION_DENIED") == {"origin": "https://evil.example"}
        refused = await http.post(
            "/sessions", json=create, headers={"Sec-Fetch-Site": "cross-site"}
        )
        assert error_of(refused, 403, "PERMISSION_DENIED") == {"header": "X-Session-Manager-CSRF"}
        null = await http.post("/sessions", json=create, headers={**WRITE, "Origin": "null"})
        error_of(null, 403, "PERMISSION_DENIED")
        # A form, even an empty one, is not JSON.
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        error_of(await http.post("/sessions/x/disconnect", headers=form), 415, "INVALID_ARGUMENT")
        # The rebinding curl of the issue.
        rebound = {"Host": "rebind.example:8080"}
        rebinding = await http.get("/sessions", headers=rebound)
        assert error_of(rebinding, 400, "INVALID_ARGUMENT") == {"field": "host"}
        error_of(await http.delete("/sessions/x", headers=rebound), 400, "INVALID_ARGUMENT")
        assert ok(await http.get("/sessions"))["sessions"] == []  # nothing was created

        # The console, from its own origin (by either loopback name), and Central Hub's code.
        for n, own in enumerate(
            (harness.http_url, f"http://localhost:{harness.running.http_port}")
        ):
            headers = {**WRITE, "Origin": own, "Host": own.removeprefix("http://")}
            ok(await http.post("/sessions", json={"instance_id": f"c{n}"}, headers=headers), 201)
        ok(await http.post("/sessions", json={"instance_id": "hub"}), 201)
        ok(await http.post("/sessions/hub/qr"))


# 2. Idle and trickling sockets.


def _open_sockets(port: int, count: int, head: bytes) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if head:
            sock.sendall(head)
        opened.append(sock)
    return opened


def test_idle_and_trickling_sockets_leave_grpc_and_health_answering(tmp_path: Path) -> None:
    limit = (1024, 1024)
    with ServerProcess.start(
        tmp_path / "s.db",
        "--http-read-timeout=3",
        "--log-level=warning",
        file_limit=limit,
    ) as server:
        http_port = _http_port(server)
        # 1,100 sockets: half say nothing, half start a request head and stop.
        sockets = _open_sockets(http_port, 550, b"") + _open_sockets(
            http_port, 550, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        )
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = session_service_pb2_grpc.SessionServiceStub(channel)
                request = pb.CreateSessionRequest(instance_id="alive")
                created = stub.CreateSession(request, timeout=10)
                assert created.session.instance_id == "alive"
            health = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
            assert health.json() == {"status": "serving"}
            # The newest trickling socket, never made to give way, is closed at its deadline.
            sockets[-1].settimeout(10)
            assert sockets[-1].recv(1024) == b""
        finally:
            for sock in sockets:
                sock.close()
        said = server.stderr()
    assert "Traceback" not in said, said[-3000:]
    assert "Too many open files" not in said, said[-3000:]


def _http_port(server: ServerProcess) -> int:
    """The HTTP port the server printed on its second line."""
    assert server.process.stdout is not None
    line = server.process.stdout.readline()
    assert line.startswith("session-manager http listening on port "), line
    return int(line.rsplit(" ", 1)[1])


async def test_past_the_cap_a_serving_server_answers_503_and_an_idle_socket_makes_room(
    settings: Settings,
) -> None:
    async with _running(dataclasses.replace(settings, http_max_connections=2)) as harness:
        await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="a"))
        events = f"{harness.http_url}{API}/sessions/a/events"
        async with (
            httpx.AsyncClient() as first,
            httpx.AsyncClient() as second,
            first.stream("GET", events) as one,
            second.stream("GET", events) as two,
        ):
            assert [one.status_code, two.status_code] == [200, 200]
            # Both connections are serving a stream: a third cannot take a place.
            refused = await asyncio.to_thread(_answer_to_silence, harness)
            assert refused.startswith(b"HTTP/1.1 503 "), refused
            head, _, body = refused.partition(b"\r\n\r\n")
            assert b"retry-after: 1" in head
            assert httpx.Response(503, content=body).json() == {
                "error": True,
                "code": "LIMIT_EXCEEDED",
                "message": "the server is serving its limit of 2 HTTP connections; retry shortly",
                "details": {"limit": "http_connections"},
            }
        assert harness.running.http is not None
        budget = harness.running.http.budget
        await eventually(lambda: budget.open_count == 0)
        # Two idle sockets fill the cap; a request still gets in, in the place of the older.
        idle = await asyncio.to_thread(_open_sockets, _port(harness), 2, b"")
        await eventually(lambda: budget.open_count == 2)
        try:
            async with httpx.AsyncClient() as client:
                assert ok(await client.get(harness.http_url + "/health"))["status"] == "serving"
            idle[0].settimeout(5)
            assert idle[0].recv(1024) == b""
        finally:
            for sock in idle:
                sock.close()


def _port(harness: Harness) -> int:
    assert harness.running.http_port is not None
    return harness.running.http_port


def _answer_to_silence(harness: Harness) -> bytes:
    """What the server says to a connection that says nothing, until it closes it."""
    with socket.create_connection(("127.0.0.1", harness.running.http_port), timeout=5) as sock:
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


async def test_request_heads_and_bodies_have_a_deadline(settings: Settings) -> None:
    async with _running(dataclasses.replace(settings, http_read_timeout=0.5)) as harness:
        port = harness.running.http_port
        assert port is not None
        trickled = await asyncio.to_thread(_trickle_a_head, port)
        assert trickled < 5.0, "the trickling head was not cut at its deadline"

        answer = await asyncio.to_thread(
            _unfinished_body, port, f"POST {API}/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert httpx.Response(408, content=body).json()["details"] == {"field": "body"}
        assert not (await harness.sessions.ListSessions(pb.ListSessionsRequest())).sessions


def _trickle_a_head(port: int) -> float:
    """Send a request head a byte every 0.1 s until the server hangs up; the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(0.1)
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X" * 200:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        return time.monotonic() - started


def _unfinished_body(port: int, head: str) -> bytes:
    """A request that promises 100 bytes of JSON and sends 10; all the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        request = head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(request.encode() + b'{"instanc')
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer


async def test_running_out_of_file_descriptors_is_logged_once_per_interval(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()  # the loop the HTTP server accepts in
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):  # what asyncio reports for each accept that failed
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                }
            )
    lines = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(lines) == 1, [record.getMessage() for record in lines]
    assert "out of file descriptors" in lines[0].getMessage()
    assert lines[0].exc_info is None


def test_the_soft_limit_of_open_files_is_raised_and_caps_follow_it(tmp_path: Path) -> None:
    with ServerProcess.start(tmp_path / "s.db", file_limit=(256, 4096)) as server:
        limits = Path(f"/proc/{server.pid}/limits").read_text()
    (row,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert row.split()[3:5] == ["4096", "4096"], row
    refusal = failed_start(tmp_path / "t.db", "--http-max-connections=1000000")
    assert refusal.code == ExitCode.BAD_SETTING
    assert len(refusal.lines) == 1
    assert "--http-max-connections 1000000" in refusal.lines[0]


# 3. Malformed credentials.


async def test_every_malformed_credential_is_a_401_with_nothing_logged_as_an_error(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    malformed: list[dict[bytes, bytes]] = [
        {b"Cookie": b"sm_auth=public.9999999999.\xe9"},
        {b"Cookie": b"sm_auth=public.\xb2.a"},
        {b"Cookie": b"sm_auth=public." + b"9" * 5000 + b"." + b"0" * 64},
        {b"Cookie": b"sm_auth=public.\xd9\xa1\xd9\xa2." + b"0" * 64},
        {b"Cookie": b'sm_auth="public.1\\351.x"'},
        {b"Cookie": b"sm_auth=public.99999999999." + b"0" * 63 + b"\xe9"},
        {b"Authorization": b"Bearer \xe9\xff"},
    ]
    async with _running(_with_tokens(settings)) as harness:
        with caplog.at_level(logging.INFO):
            async with httpx.AsyncClient(base_url=harness.http_url + API) as http:
                for headers in malformed:
                    error_of(await http.get("/sessions", headers=headers), 401, "UNAUTHENTICATED")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_client_that_leaves_mid_body_is_one_4xx_line(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", harness.running.http_port), timeout=5) as sock:
        sock.sendall(
            f"POST {API}/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            "\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"instanc'
        )

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "service.api.http"]

    await eventually(lambda: bool(logged()))
    assert logged() == [
        f"POST {API}/sessions: 400 INVALID_ARGUMENT: "
        "the client closed the connection before sending the whole body"
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# 4. Tokens, loopback and /metrics.


async def test_a_short_token_refuses_to_listen_beyond_loopback(
    settings: Settings, tmp_path: Path
) -> None:
    refusal = failed_start(
        tmp_path / "s.db",
        "--address=0.0.0.0:0",
        env={
            "SESSION_MANAGER_PUBLIC_TOKEN": "Zq",
            "SESSION_MANAGER_INTERNAL_TOKEN": STRONG_INTERNAL,
        },
    )
    assert refusal.code == ExitCode.INSECURE_ADDRESS
    assert len(refusal.lines) == 1
    assert "public token of at most 12 bits" in refusal.lines[0]
    assert "128" in refusal.lines[0]
    assert "Zq" not in refusal.lines[0]
    strong = _with_tokens(settings, STRONG_PUBLIC, STRONG_INTERNAL)
    running = await start(dataclasses.replace(strong, address="0.0.0.0:0"), ManualClock())
    await running.stop(grace=0)


async def test_loopback_is_what_an_address_resolves_to(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert loopback_only("127.0.0.1:1")
    assert loopback_only("[::1]:1")
    assert loopback_only("localhost:1")
    assert not loopback_only("0.0.0.0:1")
    assert not loopback_only("[::]:1")
    assert not loopback_only("127.0.0.1.invalid:1")  # does not resolve: not loopback

    # A name that looks like loopback and points to every address of this host.
    resolve = socket.getaddrinfo

    def rebound(host: Any, *args: Any, **kwargs: Any) -> Any:
        return resolve("0.0.0.0" if host == "127.0.0.1.nip.io" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebound)
    disguised = dataclasses.replace(settings, http_address="127.0.0.1.nip.io:0")
    with pytest.raises(InsecureAddress, match=r"127\.0\.0\.1\.nip\.io:0 without tokens"):
        await start(disguised, ManualClock())


async def test_metrics_beyond_loopback_need_a_token(settings: Settings) -> None:
    remote = dataclasses.replace(settings, metrics_address="0.0.0.0:0")
    with pytest.raises(InsecureAddress, match=r"0\.0\.0\.0:0 without tokens"):
        await start(remote, ManualClock())
    async with _running(_with_tokens(remote, STRONG_PUBLIC, STRONG_INTERNAL)) as harness:
        assert harness.running.metrics is not None
        url = f"http://127.0.0.1:{harness.running.metrics.port}/metrics"
        async with httpx.AsyncClient() as scraper:
            refused = await scraper.get(url)
            assert refused.status_code == 401
            assert "sessionmanager" not in refused.text
            for token in (STRONG_PUBLIC, STRONG_INTERNAL):
                scraped = await scraper.get(url, headers={"Authorization": f"Bearer {token}"})
                assert "sessionmanager_sessions" in scraped.text


# 5. The smaller leaks.


async def test_signing_out_revokes_the_cookie_on_the_server(settings: Settings) -> None:
    async with (
        _running(_with_tokens(settings)) as harness,
        httpx.AsyncClient(base_url=harness.http_url + API) as http,
    ):
        bearer = {"Authorization": f"Bearer {PUBLIC}"}
        first = (await http.post("/auth/cookie", headers=bearer)).cookies["sm_auth"]
        second = (await http.post("/auth/cookie", headers=bearer)).cookies["sm_auth"]
        cookie = {"Cookie": f"sm_auth={first}"}
        ok(await http.get("/sessions", headers=cookie))
        signed_out = await http.delete("/auth/cookie", headers={**cookie, **WRITE})
        assert signed_out.status_code == 204
        for old in (first, second):  # every cookie of that token issued until then
            refused = await http.get("/sessions", headers={"Cookie": f"sm_auth={old}"})
            error_of(refused, 401, "UNAUTHENTICATED")
        again = (await http.post("/auth/cookie", headers=bearer)).cookies["sm_auth"]
        ok(await http.get("/sessions", headers={"Cookie": f"sm_auth={again}"}))


async def test_a_trailing_slash_redirect_names_only_an_allowed_host(settings: Settings) -> None:
    allowing = dataclasses.replace(settings, http_allowed_hosts="sm.example")
    async with _running(allowing) as harness, httpx.AsyncClient(base_url=harness.http_url) as http:
        evil = await http.get(f"{API}/sessions/", headers={"Host": "evil.example"})
        assert "location" not in evil.headers
        error_of(evil, 400, "INVALID_ARGUMENT")
        moved = await http.get(f"{API}/sessions/", headers={"Host": "sm.example:8080"})
        assert moved.status_code == 307
        assert moved.headers["location"] == f"http://sm.example:8080{API}/sessions"


async def test_forwarded_headers_count_only_from_allowed_proxies(
    settings: Settings,
    pki: Path,  # noqa: F811
) -> None:
    forwarded = {"Authorization": f"Bearer {PUBLIC}", "X-Forwarded-Proto": "https"}
    for proxies, secure in (("", False), ("127.0.0.1", True)):
        behind = dataclasses.replace(_with_tokens(settings), forwarded_allow_ips=proxies)
        async with _running(behind) as harness, httpx.AsyncClient() as http:
            issued = await http.post(f"{harness.http_url}{API}/auth/cookie", headers=forwarded)
            assert ("Secure" in issued.headers["set-cookie"]) is secure, proxies
    tls = dataclasses.replace(
        _with_tokens(settings), tls_cert=pki / "server.pem", tls_key=pki / "server.key"
    )
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    async with _running(tls) as harness, httpx.AsyncClient(verify=context) as http:
        url = f"https://127.0.0.1:{harness.running.http_port}{API}/auth/cookie"
        downgraded = {"Authorization": f"Bearer {PUBLIC}", "X-Forwarded-Proto": "http"}
        issued = await http.post(url, headers=downgraded)
        assert "Secure" in issued.headers["set-cookie"]


async def test_https_answers_carry_hsts(settings: Settings, pki: Path) -> None:  # noqa: F811
    tls = dataclasses.replace(settings, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    async with _running(tls) as harness, httpx.AsyncClient(verify=context) as http:
        answer = await http.get(f"https://127.0.0.1:{harness.running.http_port}/health")
        assert answer.headers["strict-transport-security"] == "max-age=31536000"
    async with _running(settings) as harness, httpx.AsyncClient() as http:
        plain = await http.get(f"{harness.http_url}/health")
        assert "strict-transport-security" not in plain.headers


async def test_api_answers_are_nosniff_and_never_stored(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        answers = [
            await http.get("/health"),
            await http.post(f"{API}/sessions", json={"instance_id": "a"}),
            await http.get(f"{API}/sessions/a"),
            await http.get(f"{API}/sessions/ghost"),
            await http.get("/openapi.json"),
        ]
        page = await http.get("/")
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["cache-control"] == "no-store", answer.url
    assert page.headers["cache-control"] == "no-cache"  # the console's files revalidate


async def test_the_sign_in_form_posts_even_without_its_script(settings: Settings) -> None:
    async with _running(_with_tokens(settings)) as harness, _chromium() as browser:
        page = await browser.new_page()
        await page.goto(harness.http_url + "/")
        await page.get_by_label("Access token").wait_for()
        # As if the script had failed: the form without its handler.
        await page.evaluate(
            "const form = document.getElementById('token-form');"
            "form.replaceWith(form.cloneNode(true));"
        )
        await page.get_by_label("Access token").fill(PUBLIC)
        async with page.expect_request(lambda request: request.is_navigation_request()) as sent:
            await page.get_by_role("button", name="Sign in").click()
        request = await sent.value
    assert request.method == "POST"
    assert PUBLIC not in request.url


async def test_one_client_holds_only_its_share_of_a_sessions_streams(settings: Settings) -> None:
    shared = dataclasses.replace(
        settings,
        public_tokens=(PUBLIC.encode(), b"another-public-token"),
        internal_tokens=(INTERNAL.encode(),),
        max_watchers_per_session=4,
        http_streams_per_client=2,
    )
    async with _running(shared) as harness, contextlib.AsyncExitStack() as streams:
        public = [("authorization", f"Bearer {PUBLIC}")]
        request = pb.CreateSessionRequest(instance_id="a")
        await harness.sessions.CreateSession(request, metadata=public)

        async def stream(token: str) -> httpx.Response:
            http = await streams.enter_async_context(
                httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"})
            )
            url = f"{harness.http_url}{API}/sessions/a/events"
            return await streams.enter_async_context(http.stream("GET", url))

        assert [(await stream(PUBLIC)).status_code for _ in range(2)] == [200, 200]
        third = await stream(PUBLIC)
        assert third.status_code == 429  # an error, not a stream: it has an end
        await third.aread()
        assert error_of(third, 429, "LIMIT_EXCEEDED") == {
            "limit": "streams_per_client",
            "instance_id": "a",
        }
        assert (await stream("another-public-token")).status_code == 200
        # The session keeps room for gRPC watchers.
        watch = harness.sessions.WatchSession(
            pb.WatchSessionRequest(instance_id="a"), metadata=public
        )
        first = await watch.read()
        assert isinstance(first, pb.WatchSessionResponse)
        assert first.session.instance_id == "a"
        watch.cancel()
