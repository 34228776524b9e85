"""The web console in real Chromium: Debian's ``/usr/bin/chromium`` driven by Playwright.

Each test starts a real server (gRPC and HTTP on port 0, a temporary database,
the simulated phone with QR codes that live a few seconds) and a fresh browser
page. The simulated phone is driven over gRPC, as a real phone would act on
its own; the page must follow every change live, from its event stream.

Set ``SESSION_MANAGER_SCREENSHOTS=<dir>`` to keep the screenshots the tests take
(``docs/console.png`` is made that way).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
import zxingcpp
from PIL import Image
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from service.api.console import CONTENT_SECURITY_POLICY, STATIC
from service.config import Settings
from service.domain.validation import INSTANCE_ID
from service.engine.simulated import pairing_payload
from service.server import RunningServer, start
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = "+5491122334455"
TOKEN = "console-public-token"
#: Long enough to decode the first code and watch it count down, short enough to see it rotate.
QR_FIRST_SECONDS = 7.0
QR_ROTATION_SECONDS = 4.0
#: How long a page condition may take: a rotation, a restart, on a busy machine.
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)


@dataclass
class Console:
    """A running server, its gRPC stubs and the console's URL."""

    running: RunningServer
    settings: Settings
    channel: grpc.aio.Channel
    sessions: session_service_pb2_grpc.SessionServiceAsyncStub
    simulator: simulator_service_pb2_grpc.SimulatorServiceAsyncStub

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.running.http_port}/"

    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.channel.close(None)
            await self.running.stop(grace=1.0)

    async def start_again(self) -> Console:
        """A new server on the same database and the same ports, once this one has stopped."""
        pinned = replace(
            self.settings,
            address=f"127.0.0.1:{self.running.port}",
            http_address=f"127.0.0.1:{self.running.http_port}",
        )
        return await start_console(pinned)

    async def connected_session(self, instance_id: str, phone_number: str = PHONE) -> None:
        await self.sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
        await self.sessions.RequestQR(pb.RequestQRRequest(instance_id=instance_id))
        await self.simulator.ScanQR(
            sim.ScanQRRequest(instance_id=instance_id, phone_number=phone_number)
        )


async def start_console(settings: Settings) -> Console:
    running = await start(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Console(
        running=running,
        settings=settings,
        channel=channel,
        sessions=session_service_pb2_grpc.SessionServiceStub(channel),
        simulator=simulator_service_pb2_grpc.SimulatorServiceStub(channel),
    )


@pytest.fixture
def console_settings(tmp_path: Path) -> Settings:
    return replace(
        Settings(),
        address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        database=tmp_path / "sessions.db",
        engine="simulated",
        qr_first_seconds=QR_FIRST_SECONDS,
        qr_rotation_seconds=QR_ROTATION_SECONDS,
        qr_codes=3,
    )


@pytest_asyncio.fixture(loop_scope="module")
async def console(console_settings: Settings) -> AsyncIterator[Console]:
    server = await start_console(console_settings)
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    return CHROMIUM


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


async def abort_elsewhere(route: Route) -> None:
    await route.abort("internetdisconnected")


@dataclass
class Visit:
    """A browser page on the console, every request it made and every script error it met."""

    page: Page
    requests: list[str]
    loads: list[str]
    errors: list[str]


@contextlib.asynccontextmanager
async def visit(
    browser: Browser, url: str, clock_ahead: float = 0.0, **context_options: object
) -> AsyncIterator[Visit]:
    """A new browser context on ``url``; its clock is ``clock_ahead`` seconds fast."""
    context = await browser.new_context(**context_options)  # type: ignore[arg-type]
    page = await context.new_page()
    if clock_ahead:
        await page.clock.set_system_time(time.time() + clock_ahead)
    page.set_default_timeout(WAIT_MS)
    seen = Visit(page=page, requests=[], loads=[], errors=[])
    # The network is cut off from everything but the service.
    origin = url.split("#")[0]
    await context.route(lambda target: not target.startswith(origin), abort_elsewhere)
    page.on("request", lambda request: seen.requests.append(request.url))
    page.on("load", lambda loaded: seen.loads.append(loaded.url))
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    await page.add_init_script(STATUS_RECORDER)
    response = await page.goto(url)
    assert response is not None
    assert "default-src 'none'" in (await response.all_headers())["content-security-policy"]
    try:
        yield seen
        # No script failed, and nothing the page did was blocked by its own policy.
        assert seen.errors == []
        assert await page.evaluate("window.policyViolations") == []
    finally:
        await context.close()


# Records every status the page shows, so a test sees short-lived states too, and any
# request the Content-Security-Policy blocked.
STATUS_RECORDER = """
window.shownStates = [];
window.policyViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.policyViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
document.addEventListener("DOMContentLoaded", () => {
  const badge = document.getElementById("detail-status");
  new MutationObserver(() => {
    const last = window.shownStates.at(-1);
    if (last && last.status === badge.textContent) return;
    const panel = [...document.querySelectorAll(".panel")].find((p) => !p.hidden);
    window.shownStates.push({status: badge.textContent, text: panel ? panel.innerText : ""});
  }).observe(badge, {childList: true, characterData: true, subtree: true});
});
"""


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser, console: Console) -> AsyncIterator[Visit]:
    async with visit(browser, console.url) as seen:
        yield seen


def save_screenshot(name: str, data: bytes) -> None:
    folder = os.environ.get("SESSION_MANAGER_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(data)


def decode_qr(png: bytes) -> str:
    (barcode,) = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    return str(barcode.text)


async def shown_qr(page: Page) -> str:
    return decode_qr(await page.locator("#qr-image").screenshot())


def countdown_seconds(text: str) -> int:
    match = re.fullmatch(r"Expires in (\d+):(\d\d)", text)
    assert match, text
    return int(match[1]) * 60 + int(match[2])


async def status_history(page: Page) -> list[str]:
    return [state["status"] for state in await page.evaluate("window.shownStates")]


# ---------------------------------------------------------------------------


async def test_the_list_follows_other_clients_live_on_one_connection(
    page: Visit, console: Console
) -> None:
    """Another client creates, pairs and deletes sessions: the list shows each change as
    it is committed, from the one event stream of the page, without reading the list."""
    ui = page.page
    rows = ui.locator("#sessions-body tr")
    await expect(ui.locator("#list-caption")).to_have_text("No sessions yet.")
    reads_before = [url for url in page.requests if "/api/session-manager/sessions" in url]

    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="live_2"))
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="live_1"))
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_contain_text("live_1")  # in instance_id order
    await expect(rows.first.locator(".badge")).to_have_text("init")
    await console.sessions.RequestQR(pb.RequestQRRequest(instance_id="live_1"))
    await expect(rows.first.locator(".badge")).to_have_text("qr_required")
    await console.simulator.ScanQR(sim.ScanQRRequest(instance_id="live_1", phone_number=PHONE))
    await expect(rows.first.locator(".badge")).to_have_text("connected")
    await expect(rows.first).to_contain_text(PHONE)
    await ui.get_by_label("Status").select_option("connected")
    await expect(rows).to_have_count(1)
    await console.simulator.UnlinkDevice(sim.UnlinkDeviceRequest(instance_id="live_1"))
    await expect(rows).to_have_count(0)  # it left the status shown
    await ui.get_by_label("Status").select_option("")
    await console.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="live_2"))
    await expect(rows).to_have_count(1)
    await expect(ui.get_by_role("link", name="live_2")).to_have_count(0)

    # One stream for the whole page, the open session included; the list was never read again.
    await ui.goto(console.url + "#/sessions/live_1")
    await expect(ui.locator("#connection")).to_have_text("Live")
    await console.sessions.RequestQR(pb.RequestQRRequest(instance_id="live_1"))
    await expect(ui.locator("#detail-status")).to_have_text("qr_required")
    streams = [url for url in page.requests if "/events" in url]
    assert streams == [
        console.url + "api/session-manager/events?types=session.updated,session.deleted"
    ]
    reads = [url for url in page.requests if "/api/session-manager/sessions" in url]
    assert reads == [*reads_before, console.url + "api/session-manager/sessions/live_1"]
    assert len(page.loads) == 1


async def test_create_pair_by_qr_and_connect_live(page: Visit, console: Console) -> None:
    ui = page.page
    await ui.get_by_label("New session").fill("sender_51")
    await ui.get_by_role("button", name="Create").click()
    await expect(ui.get_by_role("heading", name="sender_51")).to_be_visible()
    await expect(ui.locator("#detail-status")).to_have_text("init")
    await expect(ui.get_by_role("link", name="sender_51")).to_be_visible()

    await ui.get_by_role("button", name="Show QR code").click()
    await expect(ui.locator("#detail-status")).to_have_text("qr_required")
    await expect(ui.locator("#detail-qr-status")).to_have_text("QR: generated")
    assert await shown_qr(ui) == pairing_payload("sender_51", 1)
    save_screenshot("qr.png", await ui.screenshot(full_page=True))

    countdown = ui.locator("#qr-countdown")
    first = countdown_seconds(await countdown.inner_text())
    assert 0 < first <= QR_FIRST_SECONDS
    await expect(countdown).not_to_have_text(await countdown.inner_text())
    assert countdown_seconds(await countdown.inner_text()) < first

    # The engine rotates the code: the page redraws it, without being asked.
    first_src = await ui.locator("#qr-image").get_attribute("src")
    await ui.wait_for_function(
        "src => document.getElementById('qr-image').getAttribute('src') !== src", arg=first_src
    )
    assert await shown_qr(ui) == pairing_payload("sender_51", 2)
    assert countdown_seconds(await countdown.inner_text()) <= QR_ROTATION_SECONDS

    await console.simulator.ScanQR(
        sim.ScanQRRequest(instance_id="sender_51", phone_number=PHONE, hold_handshake=True)
    )
    await expect(ui.locator("#detail-status")).to_have_text("connecting")
    await expect(ui.get_by_text("Connecting: the phone is linked")).to_be_visible()
    await console.simulator.CompleteHandshake(sim.CompleteHandshakeRequest(instance_id="sender_51"))
    await expect(ui.locator("#detail-status")).to_have_text("connected")
    await expect(ui.locator("#connected-phone")).to_have_text(PHONE)
    await expect(ui.locator("#connected-since")).not_to_have_text("—")
    await expect(ui.locator("#sessions-body tr", has_text="sender_51")).to_contain_text(PHONE)
    await expect(ui.locator("#announce")).to_have_text("sender_51 is connected.")

    assert await status_history(ui) == ["init", "qr_required", "connecting", "connected"]
    assert len(page.loads) == 1  # never reloaded
    # Nothing but the service: every request went to the origin that served the page.
    assert page.requests, "the page made no request"
    assert all(url.startswith(console.url) or url.startswith("data:") for url in page.requests), (
        page.requests
    )


async def test_a_code_left_unscanned_is_marked_expired(
    browser: Browser, console_settings: Settings
) -> None:
    # Two short-lived codes, then the pairing ends with the last code expired.
    quick = replace(console_settings, qr_first_seconds=2.0, qr_rotation_seconds=1.5, qr_codes=2)
    server = await start_console(quick)
    try:
        await server.sessions.CreateSession(pb.CreateSessionRequest(instance_id="late"))
        async with visit(browser, server.url + "#/sessions/late") as seen:
            ui = seen.page
            await ui.get_by_role("button", name="Show QR code").click()
            await expect(ui.locator("#detail-qr-status")).to_have_text("QR: generated")
            await expect(ui.locator("#qr-expired")).to_be_hidden()
            await expect(ui.locator("#detail-qr-status")).to_have_text("QR: expired")
            await expect(ui.locator("#qr-expired")).to_be_visible()
            await expect(ui.locator("#qr-countdown")).to_have_text(
                "This code expired: ask for a new one."
            )
            await expect(ui.locator("#announce")).to_have_text("The QR code expired.")
            await ui.get_by_role("button", name="New QR code").click()
            await expect(ui.locator("#detail-qr-status")).to_have_text("QR: generated")
            await expect(ui.locator("#qr-expired")).to_be_hidden()
            assert await shown_qr(ui) == pairing_payload("late", 3)
    finally:
        await server.stop()


async def test_drops_unlinks_and_faults_appear_live(page: Visit, console: Console) -> None:
    ui = page.page
    await console.connected_session("sender_7")
    await ui.goto(console.url + "#/sessions/sender_7")
    await expect(ui.locator("#detail-status")).to_have_text("connected")
    await expect(ui.locator("#connection")).to_have_text("Live")

    await console.simulator.DropNetwork(
        sim.DropNetworkRequest(instance_id="sender_7", hold_reconnect=True)
    )
    await expect(ui.locator("#detail-status")).to_have_text("connecting")
    shown = await ui.evaluate("window.shownStates")
    dropped = [state for state in shown if state["status"] == "disconnected"]
    assert dropped, shown
    assert "The network connection to WhatsApp dropped" in dropped[-1]["text"]
    await console.simulator.CompleteHandshake(sim.CompleteHandshakeRequest(instance_id="sender_7"))
    await expect(ui.locator("#detail-status")).to_have_text("connected")

    await console.simulator.UnlinkDevice(sim.UnlinkDeviceRequest(instance_id="sender_7"))
    await expect(ui.locator("#detail-status")).to_have_text("disconnected")
    await expect(ui.locator("#panel-disconnected")).to_contain_text("The device was unlinked")
    await expect(ui.locator("#disconnected-code")).to_have_text("LOGOUT")
    await expect(ui.get_by_role("button", name="Reconnect with a QR code")).to_be_visible()
    await expect(ui.get_by_role("button", name="Disconnect…")).to_be_hidden()

    await console.simulator.FailSession(
        sim.FailSessionRequest(
            instance_id="sender_7", code="TEMPORARY_BAN", message="Banned until 2026-11-24T10:00Z"
        )
    )
    await expect(ui.locator("#detail-status")).to_have_text("error")
    alert = ui.get_by_role("alert").filter(has_text="TEMPORARY_BAN")
    await expect(alert).to_contain_text("Banned until 2026-11-24T10:00Z")
    save_screenshot("error.png", await ui.screenshot(full_page=True))
    assert await ui.evaluate(LOW_CONTRAST) == []

    # From error, a new QR code starts over.
    await ui.get_by_role("button", name="Show QR code").click()
    await expect(ui.locator("#detail-status")).to_have_text("qr_required")
    await expect(ui.locator("#qr-image")).to_be_visible()
    assert await status_history(ui) == [
        "connected",
        "disconnected",
        "connecting",
        "connected",
        "disconnected",
        "error",
        "qr_required",
    ]
    assert len(page.loads) == 1  # going to the session's address did not reload the page

    # Back to the list alone, then forward to the session, live again.
    await ui.go_back()
    await expect(ui.get_by_role("heading", name="No session selected")).to_be_visible()
    await expect(ui.locator("#connection")).to_be_hidden()
    await ui.go_forward()
    await expect(ui.locator("#detail-status")).to_have_text("qr_required")
    await expect(ui.locator("#connection")).to_have_text("Live")


async def test_a_restart_under_the_page_is_shown_then_followed(
    browser: Browser, console_settings: Settings
) -> None:
    server = await start_console(console_settings)
    try:
        await server.connected_session("sender_9")
        before = await server.sessions.GetSession(pb.GetSessionRequest(instance_id="sender_9"))
        async with visit(browser, server.url + "#/sessions/sender_9") as seen:
            ui = seen.page
            await expect(ui.locator("#connection")).to_have_text("Live")
            await expect(ui.locator("#revision")).to_have_text(str(before.session.revision))

            await server.stop()
            await expect(ui.locator("#connection")).to_contain_text("reconnecting")
            await expect(ui.locator("#detail-status")).to_have_text("connected")  # the last known
            assert await ui.evaluate(LOW_CONTRAST) == []

            server = await server.start_again()
            # The service restores the session by itself: connecting, then connected.
            await expect(ui.locator("#connection")).to_have_text("Live")
            now = await server.sessions.GetSession(pb.GetSessionRequest(instance_id="sender_9"))
            assert now.session.revision > before.session.revision
            await expect(ui.locator("#revision")).to_have_text(str(now.session.revision))
            await expect(ui.locator("#detail-status")).to_have_text("connected")
            assert len(seen.loads) == 1
    finally:
        await server.stop()


async def test_a_missing_or_wrong_token_shows_only_the_sign_in(
    browser: Browser, console_settings: Settings
) -> None:
    tokens = replace(
        console_settings, public_tokens=(TOKEN.encode(),), internal_tokens=(b"internal-token",)
    )
    server = await start_console(tokens)
    try:
        await server.sessions.CreateSession(
            pb.CreateSessionRequest(instance_id="secret_session"),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
        async with visit(browser, server.url) as seen:
            ui = seen.page
            await expect(ui.get_by_role("heading", name="Sign in")).to_be_visible()
            await expect(ui.locator("#gate-reason")).to_have_text(
                "This service needs an access token."
            )
            await expect(ui.locator("#main")).to_be_hidden()
            await expect(ui.get_by_text("secret_session")).to_have_count(0)

            await ui.get_by_label("Access token").fill("not-the-token")
            await ui.get_by_role("button", name="Sign in").click()
            await expect(ui.locator("#gate-reason")).to_contain_text("The token was refused")
            await expect(ui.locator("#main")).to_be_hidden()
            await expect(ui.get_by_text("secret_session")).to_have_count(0)
            save_screenshot("sign-in.png", await ui.screenshot(full_page=True))
            assert await ui.evaluate(LOW_CONTRAST) == []

            # The engine side's token is a valid one, of a role that may not read sessions.
            await ui.get_by_label("Access token").fill("internal-token")
            await ui.get_by_role("button", name="Sign in").click()
            await expect(ui.locator("#gate-reason")).to_contain_text(
                "This token may not use the console"
            )
            await expect(ui.locator("#main")).to_be_hidden()
            await expect(ui.get_by_text("secret_session")).to_have_count(0)

            await ui.get_by_label("Access token").fill(TOKEN)
            await ui.get_by_role("button", name="Sign in").click()
            await expect(ui.get_by_role("link", name="secret_session")).to_be_visible()
            await expect(ui.locator("#gate")).to_be_hidden()

            # The cookie keeps the page signed in across a reload; signing out forgets it.
            await ui.reload()
            await expect(ui.get_by_role("link", name="secret_session")).to_be_visible()
            await ui.get_by_role("button", name="Forget token").click()
            await expect(ui.get_by_role("heading", name="Sign in")).to_be_visible()
            await expect(ui.locator("#main")).to_be_hidden()
            cookies = await ui.context.cookies()
            assert not [cookie for cookie in cookies if cookie["name"] == "sm_auth"]
    finally:
        await server.stop()


async def test_thousands_of_sessions_are_paged_and_filtered(page: Visit, console: Console) -> None:
    ui = page.page
    for n in range(120):
        await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id=f"s{n:04d}"))
    await console.connected_session("t_connected")
    await ui.reload()
    rows = ui.locator("#sessions-body tr")
    await expect(rows).to_have_count(50)
    await expect(rows.first).to_contain_text("s0000")
    await ui.get_by_role("button", name="Next page").click()
    await expect(rows.first).to_contain_text("s0050")
    await ui.get_by_role("button", name="Next page").click()
    await expect(rows).to_have_count(21)
    await expect(rows.last).to_contain_text("t_connected")
    await expect(ui.get_by_role("button", name="Next page")).to_be_disabled()
    await ui.get_by_role("button", name="Previous page").click()
    await expect(rows.first).to_contain_text("s0050")

    await ui.get_by_label("Status").select_option("connected")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("t_connected")
    await expect(rows.first.locator(".badge")).to_have_text("connected")
    await expect(rows.first).to_contain_text(PHONE)
    await expect(ui.get_by_role("button", name="Previous page")).to_be_disabled()


async def test_bad_input_and_refusals_are_readable_and_change_nothing(
    page: Visit, console: Console
) -> None:
    ui = page.page
    field = ui.get_by_label("New session")
    for bad in ("bad id!", "-leading", "x" * 65):
        await field.fill(bad)
        await ui.get_by_role("button", name="Create").click()
        await expect(ui.locator("#new-instance-error")).to_contain_text("Invalid instance id")
        await expect(field).to_have_attribute("aria-invalid", "true")
    listed = await console.sessions.ListSessions(pb.ListSessionsRequest())
    assert list(listed.sessions) == []

    await console.connected_session("taken")
    await field.fill("taken")
    await ui.get_by_role("button", name="Create").click()
    await expect(ui.locator("#new-instance-error")).to_contain_text("SESSION_ALREADY_EXISTS")

    # A refusal from the service is shown in words, with its code.
    await ui.goto(console.url + "#/sessions/nobody")
    await expect(ui.locator("#detail-empty")).to_contain_text("SESSION_NOT_FOUND")


async def test_pairing_by_phone_shows_the_linking_code(page: Visit, console: Console) -> None:
    ui = page.page
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="by_phone"))
    await ui.goto(console.url + "#/sessions/by_phone")
    await ui.get_by_label("Phone number").fill("12")
    await ui.get_by_role("button", name="Pair by phone").click()
    await expect(ui.locator("#action-error")).to_contain_text("INVALID_ARGUMENT")
    await expect(ui.locator("#detail-status")).to_have_text("init")

    await ui.get_by_label("Phone number").fill(PHONE)
    await ui.get_by_role("button", name="Pair by phone").click()
    await expect(ui.locator("#detail-status")).to_have_text("qr_required")
    await expect(ui.locator("#linking-code")).to_have_text(re.compile(r"^[1-9A-Z]{4}-[1-9A-Z]{4}$"))
    await expect(ui.locator("#action-error")).to_be_hidden()
    await console.simulator.ScanQR(sim.ScanQRRequest(instance_id="by_phone"))
    await expect(ui.locator("#detail-status")).to_have_text("connected")
    await expect(ui.locator("#connected-phone")).to_have_text(PHONE)
    await expect(ui.locator("#linking-code")).to_be_hidden()


async def test_disconnect_and_delete_ask_first(page: Visit, console: Console) -> None:
    ui = page.page
    await console.connected_session("to_remove")
    await ui.goto(console.url + "#/sessions/to_remove")
    await expect(ui.locator("#detail-status")).to_have_text("connected")

    await ui.get_by_role("button", name="Disconnect…").click()
    dialog = ui.get_by_role("dialog", name="Disconnect to_remove?")
    await expect(dialog).to_be_visible()
    await dialog.get_by_role("button", name="Cancel").click()
    await expect(dialog).to_be_hidden()
    await expect(ui.locator("#detail-status")).to_have_text("connected")

    await ui.get_by_role("button", name="Disconnect…").click()
    await dialog.get_by_role("button", name="Disconnect").click()
    await expect(ui.locator("#detail-status")).to_have_text("disconnected")
    await expect(ui.locator("#disconnected-code")).to_have_text("LOGOUT")

    await ui.get_by_role("button", name="Delete…").click()
    await ui.keyboard.press("Escape")  # closes the dialog: nothing is deleted
    await expect(ui.get_by_role("dialog")).to_be_hidden()
    await console.sessions.GetSession(pb.GetSessionRequest(instance_id="to_remove"))
    await ui.get_by_role("button", name="Delete…").click()
    await (
        ui.get_by_role("dialog", name="Delete to_remove?")
        .get_by_role("button", name="Delete")
        .click()
    )
    await expect(ui.locator("#detail-empty")).to_have_text("to_remove was deleted.")
    await expect(ui.get_by_role("link", name="to_remove")).to_have_count(0)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await console.sessions.GetSession(pb.GetSessionRequest(instance_id="to_remove"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_deleted_elsewhere_the_page_says_so(page: Visit, console: Console) -> None:
    ui = page.page
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="elsewhere"))
    await ui.goto(console.url + "#/sessions/elsewhere")
    await expect(ui.locator("#detail-status")).to_have_text("init")
    await expect(ui.locator("#connection")).to_have_text("Live")  # the stream tells
    await console.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id="elsewhere"))
    await expect(ui.locator("#detail-empty")).to_have_text("elsewhere was deleted.")


async def test_keyboard_only_on_a_phone_sized_screen(browser: Browser, console: Console) -> None:
    async with visit(browser, console.url, viewport={"width": 390, "height": 844}) as seen:
        ui = seen.page
        await expect(ui.get_by_role("heading", name="Sessions")).to_be_visible()
        await ui.keyboard.press("Tab")  # the skip link
        await ui.keyboard.press("Tab")
        await expect(ui.get_by_label("New session")).to_be_focused()
        await ui.keyboard.type("sender_phone")
        await ui.keyboard.press("Enter")
        await expect(ui.locator("#detail-title")).to_be_focused()
        await expect(ui.locator("#detail-status")).to_have_text("init")
        await ui.keyboard.press("Tab")
        await expect(ui.get_by_role("button", name="Show QR code")).to_be_focused()
        await ui.keyboard.press("Enter")
        await expect(ui.locator("#detail-status")).to_have_text("qr_required")
        await expect(ui.locator("#announce")).to_have_text("sender_phone is qr_required.")
        # The button is gone while the code is valid; the keyboard stays in the session.
        await expect(ui.locator("#detail-title")).to_be_focused()
        await ui.keyboard.press("Tab")
        await expect(ui.get_by_label("Phone number")).to_be_focused()
        image = await ui.locator("#qr-image").bounding_box()
        assert image is not None
        assert image["width"] >= 280  # large enough to scan
        assert decode_qr(await ui.locator("#qr-image").screenshot()).startswith("2@")
        overflow = await ui.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0  # nothing wider than the screen
        table = await ui.evaluate(
            "(w => w.scrollWidth - w.clientWidth)(document.querySelector('.table-wrap'))"
        )
        assert table <= 0  # the list needs no sideways scrolling either
        await expect(ui.locator("#sessions-body tr").first).to_contain_text("qr_required")
        save_screenshot("phone.png", await ui.screenshot(full_page=True))


async def test_the_page_checks_instance_ids_as_the_service_does() -> None:
    script = (STATIC / "console.js").read_text()
    match = re.search(r"const INSTANCE_ID = /\^(.+)\$/;", script)
    assert match, "console.js has no INSTANCE_ID"
    assert match[1] == INSTANCE_ID.pattern


async def test_the_countdown_follows_the_services_clock(browser: Browser, console: Console) -> None:
    """A computer whose clock is ten minutes fast still counts the code down right."""
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="skewed"))
    async with visit(browser, console.url + "#/sessions/skewed", clock_ahead=600) as seen:
        ui = seen.page
        assert await ui.evaluate("Date.now() / 1000") > time.time() + 590
        await ui.get_by_role("button", name="Show QR code").click()
        countdown = ui.locator("#qr-countdown")
        await expect(countdown).to_contain_text("Expires in")
        assert 0 < countdown_seconds(await countdown.inner_text()) <= QR_FIRST_SECONDS
        await expect(ui.locator("#qr-expired")).to_be_hidden()


async def test_the_console_ships_no_external_address() -> None:
    for path in STATIC.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", path.read_text()), path.name


async def test_every_status_in_the_list(page: Visit, console: Console) -> None:
    """The list shows each session's status as its badge, its phone and its last change."""
    ui = page.page
    await console.connected_session("sender_12", "+5491122334455")
    await console.connected_session("sender_15", "+5215512345678")
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_21"))
    await console.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_21"))
    await console.simulator.ScanQR(
        sim.ScanQRRequest(instance_id="sender_21", phone_number=PHONE, hold_handshake=True)
    )
    await console.connected_session("sender_24", "+34612345678")
    await console.simulator.UnlinkDevice(sim.UnlinkDeviceRequest(instance_id="sender_24"))
    await console.connected_session("sender_27", "+5511987654321")
    await console.simulator.FailSession(sim.FailSessionRequest(instance_id="sender_27"))
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_30"))
    await console.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_18"))
    await console.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_18"))

    await ui.goto(console.url + "#/sessions/sender_18")
    await expect(ui.locator("#qr-countdown")).to_contain_text("Expires in")
    expected = {
        "sender_12": ("connected", "+5491122334455"),
        "sender_15": ("connected", "+5215512345678"),
        "sender_18": ("qr_required", "—"),
        "sender_21": ("connecting", "—"),
        "sender_24": ("disconnected", "+34612345678"),
        "sender_27": ("error", "+5511987654321"),
        "sender_30": ("init", "—"),
    }
    rows = ui.locator("#sessions-body tr")
    await expect(rows).to_have_count(len(expected))
    for row in await rows.all():
        cells = await row.locator("th, td").all_inner_texts()
        assert (cells[1], cells[2]) == expected[cells[0]], cells
        assert re.fullmatch(r"(now|\d+ seconds? ago)", cells[3]), cells
    await ui.set_viewport_size({"width": 1280, "height": 880})
    save_screenshot("console.png", await ui.screenshot())
    assert await ui.evaluate(LOW_CONTRAST) == []


# Every visible text that is not disabled, with a contrast against its background below
# WCAG AA's 4.5:1 (3:1 for large text).
LOW_CONTRAST = """
(() => {
  const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
  const luminance = ([r, g, b]) => {
    const linear = [r, g, b].map((c) => {
      c /= 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2];
  };
  const background = (element) => {
    for (let node = element; node; node = node.parentElement) {
      const color = rgb(getComputedStyle(node).backgroundColor);
      if (color.length < 4 || color[3] > 0) return color.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const failures = [];
  for (const element of document.querySelectorAll("body *")) {
    const text = [...element.childNodes]
      .filter((node) => node.nodeType === Node.TEXT_NODE)
      .map((node) => node.textContent.trim())
      .join("");
    if (!text || !element.checkVisibility() || element.closest(":disabled")) continue;
    const style = getComputedStyle(element);
    const [a, b] = [luminance(rgb(style.color)), luminance(background(element))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const large = parseFloat(style.fontSize) >= 24 || (parseFloat(style.fontSize) >= 18.66
      && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5)) failures.push(`${text}: ${ratio.toFixed(2)}`);
  }
  return failures;
})()
"""


async def test_the_console_is_served_beside_the_api_and_shadows_none_of_it(
    console: Console,
) -> None:
    async with httpx.AsyncClient(base_url=console.url) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        script = await http.head("/console.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]

        unknown = await http.get("/console.map")
        assert unknown.status_code == 404
        assert unknown.json()["error"] is True
        for method, path in (("POST", "/"), ("OPTIONS", "/api/session-manager/sessions")):
            refused = await http.request(method, path)
            assert refused.status_code == 405, (method, path)
            assert refused.json()["code"] == "INVALID_ARGUMENT"
        assert set(refused.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}
