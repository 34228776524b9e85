"""smctl end to end: subprocesses against a real server started as a subprocess."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qrcode
import qrcode.constants
import qrcode.util
import zxingcpp

from service.engine.simulated import pairing_payload
from sessionmanager_client import terminal_qr
from tests.servers import ServerProcess

BIN = Path(sys.executable).parent
SMCTL = str(BIN / "smctl")


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ServerProcess.start(tmp_path_factory.mktemp("cli") / "sessions.db") as server:
        yield server.address


def env(address: str) -> dict[str, str]:
    return {**os.environ, "SESSION_MANAGER_ADDRESS": address}


def smctl(address: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [SMCTL, *args], env=env(address), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done


def json_out(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def decode(lines: list[str]) -> str:
    """Read the terminal drawing back like a phone would: rebuild the image, decode it."""
    matrix = terminal_qr.parse(lines)
    quiet, scale = 4, 4
    size = (len(matrix) + 2 * quiet) * scale
    pixels = bytearray(b"\xff" * size * size)
    for r, row in enumerate(matrix):
        for c, dark in enumerate(row):
            if not dark:
                continue
            for dy in range(scale):
                start = ((r + quiet) * scale + dy) * size + (c + quiet) * scale
                pixels[start : start + scale] = b"\x00" * scale
    data = bytes(pixels)  # the view does not keep its buffer alive: hold it here
    image = zxingcpp.ImageView(data, size, size, zxingcpp.ImageFormat.Lum, size, 1)
    (barcode,) = zxingcpp.read_barcodes(image)
    text: str = barcode.text
    return text


def qrcode_matrix(payload: str) -> list[list[bool]]:
    code = qrcode.QRCode(  # as service.domain.qr renders it
        error_correction=qrcode.constants.ERROR_CORRECT_M, border=0, mask_pattern=0
    )
    code.add_data(qrcode.util.QRData(payload.encode(), mode=qrcode.util.MODE_8BIT_BYTE))
    code.make(fit=True)
    return [[bool(v) for v in row] for row in code.get_matrix()]


def test_pair_watch_send_disconnect(address: str) -> None:
    iid = "sender_cli"
    created = json_out(smctl(address, "create", iid, "--json"))
    assert (created["status"], created["qr_status"], created["revision"]) == ("init", "none", 1)

    shown = json_out(smctl(address, "qr", iid, "--once", "--json"))
    assert (shown["status"], shown["qr_status"]) == ("qr_required", "generated")
    payload = decode(shown["qr_terminal"])
    assert payload in {pairing_payload(iid, serial) for serial in range(1, 100)}
    assert terminal_qr.parse(shown["qr_terminal"]) == qrcode_matrix(payload)

    watch = subprocess.Popen(
        [SMCTL, "watch", iid, "--json", "--until", "connected"],
        env=env(address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert (first["status"], first["revision"]) == ("qr_required", 2)
        smctl(address, "sim", "scan", iid, "--phone", "+5491122334455")
        rest = [json.loads(line) for line in watch.stdout]
        assert watch.wait(15) == 0
    finally:
        watch.kill()
        watch.wait()
    assert [(s["status"], s["qr_status"]) for s in rest] == [
        ("connecting", "used"),
        ("connected", "none"),
    ]
    assert [s["revision"] for s in rest] == [3, 4]
    assert rest[-1]["phone_number"] == "+5491122334455"

    human = smctl(address, "get", iid).stdout
    assert human.startswith("sender_cli  connected/none  rev 4  phone +5491122334455")

    sent = json_out(smctl(address, "send", iid, "+5491100000000", "hola", "--key", "o-1", "--json"))
    assert (sent["status"], sent["replayed"]) == ("sent", False)
    again = json_out(
        smctl(address, "send", iid, "+5491100000000", "hola", "--key", "o-1", "--json")
    )
    assert (again["message_id"], again["replayed"]) == (sent["message_id"], True)

    # Already connected: no QR (failed precondition).
    refused = smctl(address, "qr", iid, "--once", code=4)
    assert refused.stderr.strip().startswith("smctl: SESSION_ALREADY_CONNECTED: ")
    assert len(refused.stderr.strip().splitlines()) == 1

    gone = json_out(smctl(address, "disconnect", iid, "--json"))
    assert (gone["status"], gone["last_error_code"]) == ("disconnected", "LOGOUT")
    blocked = smctl(address, "send", iid, "+5491100000000", "hola", code=4)
    assert "SESSION_NOT_CONNECTED" in blocked.stderr

    listed = json_out(smctl(address, "list", "--json", "--status", "disconnected"))
    assert [s["instance_id"] for s in listed] == [iid]
    smctl(address, "delete", iid)
    smctl(address, "get", iid, code=3)


def test_watch_ends_with_one_line_when_the_session_is_deleted(address: str) -> None:
    iid = "sender_gone"
    smctl(address, "create", iid)
    watch = subprocess.Popen(
        [SMCTL, "watch", iid],
        env=env(address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        assert "rev 1  init/none" in watch.stdout.readline()
        smctl(address, "delete", iid)
        assert watch.wait(15) == 3
        assert watch.stderr is not None
        error = watch.stderr.read()
    finally:
        watch.kill()
        watch.wait()
    assert error.startswith("smctl: SESSION_NOT_FOUND: ")
    assert "Traceback" not in error
    assert len(error.splitlines()) == 1


def test_qr_live_redraws_and_exits_when_connected(address: str) -> None:
    iid = "sender_live"
    smctl(address, "create", iid)
    live = subprocess.Popen(
        [SMCTL, "qr", iid, "--json"],
        env=env(address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert live.stdout is not None
        first = json.loads(live.stdout.readline())
        assert first["qr_status"] == "generated"
        assert decode(first["qr_terminal"]).startswith("2@")
        smctl(address, "sim", "scan", iid)
        rest = [json.loads(line) for line in live.stdout]
        assert live.wait(15) == 0
    finally:
        live.kill()
        live.wait()
    assert rest[-1]["status"] == "connected"
    assert rest[-1]["phone_number"] == "+15550000000"


def test_exit_codes_and_one_line_errors(address: str) -> None:
    missing = smctl(address, "get", "sender_nobody", code=3)
    assert missing.stderr == "smctl: SESSION_NOT_FOUND: session 'sender_nobody' does not exist\n"
    assert missing.stdout == ""

    smctl(address, "create", "sender_twice")
    smctl(address, "create", "sender_twice", code=4)
    smctl(address, "send", "sender_twice", "+5491100000000", "hola", code=4)
    smctl(address, "get", "not valid!", code=2)
    smctl(address, "sim", "handshake", "sender_nobody", code=3)

    assert smctl(address, "health").stdout == "SERVING\n"
    assert json_out(smctl(address, "health", "--json"))["status"] == "SERVING"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    down = smctl(closed, "get", "sender_1", "--timeout", "3", code=5)
    assert down.stderr.startswith("smctl: UNAVAILABLE: ")
    # --address wins over the environment.
    smctl(closed, "--address", address, "get", "sender_twice")


def test_qr_redraws_when_the_code_rotates(tmp_path: Path) -> None:
    rotation = ("--qr-first-seconds", "2", "--qr-rotation-seconds", "2", "--qr-codes", "3")
    with ServerProcess.start(tmp_path / "sessions.db", *rotation) as server:
        address = server.address
        smctl(address, "create", "sender_rot")
        live = subprocess.Popen(
            [SMCTL, "qr", "sender_rot", "--json"],
            env=env(address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert live.stdout is not None
            codes = [decode(json.loads(live.stdout.readline())["qr_terminal"]) for _ in range(2)]
            smctl(address, "sim", "scan", "sender_rot")
            rest = [json.loads(line) for line in live.stdout]
            assert live.wait(15) == 0
        finally:
            live.kill()
            live.wait()
    assert codes[0] != codes[1]
    assert codes == [pairing_payload("sender_rot", n) for n in (1, 2)]
    assert rest[-1]["status"] == "connected"


def test_tokens(tmp_path: Path) -> None:
    tokens = {"SESSION_MANAGER_PUBLIC_TOKEN": "pub-token", "SESSION_MANAGER_INTERNAL_TOKEN": "int"}
    with ServerProcess.start(tmp_path / "sessions.db", env=tokens) as server:
        address = server.address
        denied = smctl(address, "create", "sender_t", code=1)
        assert denied.stderr.startswith("smctl: UNAUTHENTICATED: ")
        smctl(address, "--token", "pub-token", "create", "sender_t")
        smctl(address, "get", "sender_t", "--token", "pub-token")
        wrong = smctl(address, "sim", "fail", "sender_t", "--token", "pub-token", code=1)
        assert wrong.stderr.startswith("smctl: PERMISSION_DENIED: ")
        failed = smctl(
            address, "--token", "pub-token", "--internal-token", "int", "sim", "fail", "sender_t"
        )
        assert "TEMPORARY_BAN" in failed.stdout


def test_pair_by_phone_code(address: str) -> None:
    iid = "sender_code"
    smctl(address, "create", iid)
    human = smctl(address, "pair-phone", iid, "+54 9 11 2233-4455").stdout
    assert re.fullmatch(
        rf"{iid}: linking code [1-9A-Z]{{4}}-[1-9A-Z]{{4}}\n  on the phone: .*\n", human
    )
    answer = json_out(smctl(address, "pair-phone", iid, "+5491122334455", "--json"))
    assert len(answer["linking_code"]) == 8
    assert answer["session"]["status"] == "qr_required"
    linked = json_out(smctl(address, "sim", "scan", iid, "--json"))
    assert (linked["status"], linked["phone_number"]) == ("connected", "+5491122334455")
    refused = smctl(address, "pair-phone", iid, "+5491122334455", code=4)
    assert "SESSION_ALREADY_CONNECTED" in refused.stderr
    smctl(address, "pair-phone", iid, "not a phone", code=2)
