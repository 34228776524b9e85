"""Metrics on /metrics and structured logs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from service.clock import ManualClock
from service.config import Settings
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import start_harness
from tests.servers import ServerProcess


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_metrics_endpoint(settings: Settings) -> None:
    harness = await start_harness(
        dataclasses.replace(settings, metrics_address="127.0.0.1:0"), ManualClock()
    )
    try:
        for iid in ("m1", "m2"):
            await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
        await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="m1"))
        await harness.simulator.ScanQR(sim.ScanQRRequest(instance_id="m1"))
        await harness.sessions.Send(pb.SendRequest(instance_id="m1", to="+5491100000000", text="x"))
        stream = harness.sessions.WatchSession(pb.WatchSessionRequest(instance_id="m2"))
        await stream.read()

        assert harness.running.metrics is not None
        port = harness.running.metrics.port
        assert port is not None
        samples = await asyncio.to_thread(_scrape, port)
        assert samples['sessionmanager_sessions{status="connected"}'] == 1
        assert samples['sessionmanager_sessions{status="init"}'] == 1
        assert samples['sessionmanager_sessions{status="error"}'] == 0
        assert samples["sessionmanager_watchers"] == 1
        assert samples["sessionmanager_qr_codes_total"] == 1
        assert samples['sessionmanager_messages_total{status="sent"}'] == 1
        assert samples['sessionmanager_rpcs_total{code="OK",method="CreateSession"}'] == 2
        assert samples['sessionmanager_rpc_duration_seconds_count{method="Send"}'] == 1
        stream.cancel()
    finally:
        await harness.stop()


def test_json_logs_name_the_session(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite"
    with ServerProcess.start(database, "--log-format=json", "--log-level=info") as server:
        client = subprocess.run(
            [
                str(Path(sys.executable).parent / "grpcurl"),
                "-plaintext",
                "-d",
                '{"instance_id": "sender_9"}',
                server.address,
                "sessionmanager.v1.SessionService/CreateSession",
            ],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert client.returncode == 0
        assert server.stop() == 0
        errors = server.stderr()
    lines = [json.loads(line) for line in errors.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    created = [line for line in lines if line["message"] == "created"]
    assert created
    assert created[0]["instance_id"] == "sender_9"
