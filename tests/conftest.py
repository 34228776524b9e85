"""Fixtures: real servers on port 0 with a temporary database.

``harness`` runs the server in the test's own event loop with a manual clock,
so QR lifetimes and expiries are driven by ``await harness.clock.advance(s)``
and no test sleeps. ``start_harness`` starts another one on the same database
(a restart).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from service.clock import ManualClock
from service.config import Settings
from service.server import RunningServer, start
from service.store import sqlite
from sessionmanager.v1 import (
    engine_service_pb2_grpc,
    session_service_pb2_grpc,
    simulator_service_pb2_grpc,
)
from tests.postgres import postgres_cluster, postgres_url  # noqa: F401 - fixtures


@dataclass
class Harness:
    running: RunningServer
    channel: grpc.aio.Channel
    clock: ManualClock
    settings: Settings
    sessions: session_service_pb2_grpc.SessionServiceAsyncStub
    engine: engine_service_pb2_grpc.EngineServiceAsyncStub
    simulator: simulator_service_pb2_grpc.SimulatorServiceAsyncStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def sqlite_store(self) -> sqlite.Store:
        """The store, for a test of the SQLite file itself."""
        assert isinstance(self.running.store, sqlite.Store)
        return self.running.store

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (the server's own origin)."""
        return f"http://127.0.0.1:{self.running.http_port}"

    async def stop(self) -> None:
        await self.channel.close(None)
        await self.running.stop(grace=1.0)


async def start_harness(settings: Settings, clock: ManualClock) -> Harness:
    running = await start(settings, clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Harness(
        running=running,
        channel=channel,
        clock=clock,
        settings=settings,
        sessions=session_service_pb2_grpc.SessionServiceStub(channel),
        engine=engine_service_pb2_grpc.EngineServiceStub(channel),
        simulator=simulator_service_pb2_grpc.SimulatorServiceStub(channel),
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(
        Settings(),
        address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        database=tmp_path / "sessions.db",
        engine="simulated",
    )


@pytest.fixture(autouse=True, scope="session")
def simulated_by_default() -> Iterator[None]:
    """Servers started as subprocesses run the simulated engine unless a test says otherwise,
    and serve HTTP on a port of their own choosing (never the shared default 8080).

    This machine cannot reach WhatsApp; tests of the real engine pass ``--engine whatsmeow``.
    """
    defaults = {
        "SESSION_MANAGER_ENGINE": "simulated",
        "SESSION_MANAGER_HTTP_ADDRESS": "127.0.0.1:0",
    }
    previous = {name: os.environ.get(name) for name in defaults}
    os.environ.update(defaults)
    yield
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    running = await start_harness(settings, ManualClock())
    try:
        yield running
    finally:
        await running.stop()
