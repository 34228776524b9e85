"""The real grpcurl binary against a running server: no .proto files needed."""

from __future__ import annotations

import json
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess

BIN = Path(sys.executable).parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    database = tmp_path / "sessions.db"
    with ServerProcess.start(database) as process:
        yield process, database


def grpcurl(address: str, *args: str, data: str | None = None, timeout: float = 30) -> str:
    command = [str(BIN / "grpcurl"), "-plaintext"]
    if data is not None:
        command += ["-d", data]
    result = subprocess.run(
        [*command, address, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_describe_call_and_stream(server: tuple[ServerProcess, Path]) -> None:
    process, database = server
    address = process.address
    services = grpcurl(address, "list").split()
    assert {
        "sessionmanager.v1.SessionService",
        "sessionmanager.v1.EngineService",
        "sessionmanager.v1.SimulatorService",
        "grpc.health.v1.Health",
    } <= set(services)

    described = grpcurl(address, "describe", "sessionmanager.v1.SessionService")
    for rpc in ("GetSession", "RequestQR", "Send", "Disconnect", "CreateSession", "ListSessions"):
        assert f"rpc {rpc} (" in described
    assert "returns ( stream .sessionmanager.v1.WatchSessionResponse )" in described

    session = '{"instance_id": "sender_51"}'
    created = json.loads(
        grpcurl(address, "sessionmanager.v1.SessionService/CreateSession", data=session)
    )
    assert created["session"]["instance_id"] == "sender_51"
    got = json.loads(grpcurl(address, "sessionmanager.v1.SessionService/GetSession", data=session))
    assert got["session"]["revision"] == "1"
    qr = json.loads(grpcurl(address, "sessionmanager.v1.SessionService/RequestQR", data=session))
    assert qr["qr_string"].startswith("data:image/png;base64,")

    watch = subprocess.Popen(
        [str(BIN / "grpcurl"), "-plaintext", "-d", session, address,
         "sessionmanager.v1.SessionService/WatchSession"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = _first_object(watch)  # the watch is open: it sends the current state first
    grpcurl(address, "sessionmanager.v1.SimulatorService/ScanQR", data=session)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.process.poll() is None:
        health = json.loads(grpcurl(address, "grpc.health.v1.Health/Check", data='{"service": ""}'))
        assert health["status"] == "SERVING"
        current = json.loads(
            grpcurl(address, "sessionmanager.v1.SessionService/GetSession", data=session)
        )
        if current["session"]["status"] == "SESSION_STATUS_CONNECTED":
            break
    process.signal(signal.SIGTERM)  # the stream ends with the server
    output, _ = watch.communicate(timeout=30)
    statuses = [json.loads(part)["session"]["status"] for part in _json_objects(first + output)]
    assert statuses[0] == "SESSION_STATUS_QR_REQUIRED"
    assert statuses[-2:] == ["SESSION_STATUS_CONNECTING", "SESSION_STATUS_CONNECTED"]

    assert process.wait() == 0  # graceful shutdown
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute(
            "SELECT status, revision FROM ll_whatsapp_qr_sessions WHERE instance_id = 'sender_51'"
        ).fetchone() == ("connected", 4)


def _first_object(stream: subprocess.Popen[str], timeout: float = 20) -> str:
    """What a grpcurl stream printed up to its first whole JSON object, within ``timeout`` s.

    Read from the descriptor itself: a text wrapper would buffer ahead of the selector.
    """
    assert stream.stdout is not None
    descriptor = stream.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(descriptor, selectors.EVENT_READ)
        while b"\n}" not in data:
            left = deadline - time.monotonic()
            assert left > 0, f"no first message: {data!r}"
            assert selector.select(left), f"no first message: {data!r}"
            chunk = os.read(descriptor, 65536)
            assert chunk, f"the stream ended: {data!r}"
            data += chunk
    return data.decode()


def _json_objects(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for index, char in enumerate(text):
        if char == "{":
            depth, start = depth + 1, index if depth == 0 else start
        elif char == "}":
            depth -= 1
            if depth == 0:
                yield text[start : index + 1]
