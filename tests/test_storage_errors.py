"""Storage failures reach callers as STORAGE_UNAVAILABLE naming the cause, and change nothing.

Each failure is a real one of SQLite: a full database (``max_page_count``), a
file locked by another connection (``BEGIN EXCLUSIVE``), a connection that may
not write (``query_only``, a ``mode=ro`` file), a file that is not a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.store import failures, sql
from sessionmanager.v1 import session_service_pb2 as pb
from tests.conftest import Harness
from tests.status_details import error_info


async def _pragma(harness: Harness, pragma: str) -> None:
    async def operation(db: sql.Db) -> None:
        await db.execute(f"PRAGMA {pragma}")

    await harness.sqlite_store.run(operation)


async def _listed(harness: Harness) -> list[str]:
    answer = await harness.sessions.ListSessions(pb.ListSessionsRequest(page_size=1000))
    return [s.instance_id for s in answer.sessions]


async def _refused_create(harness: Harness, instance_id: str) -> dict[str, str]:
    """Create a session that must be refused as STORAGE_UNAVAILABLE; returns the metadata."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    info = error_info(refused.value)
    assert info.reason == "STORAGE_UNAVAILABLE"
    assert (refused.value.details() or "").startswith("the database is unavailable: ")
    return dict(info.metadata)


async def test_a_full_disk_is_named_and_changes_nothing(harness: Harness) -> None:
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="before"))

    # The database may not grow past its current size: the next pages cannot be allocated.
    async def size(db: sql.Db) -> int:
        rows = await db.fetch("PRAGMA page_count")
        return int(rows[0][0])

    pages = await harness.sqlite_store.run(size)
    await _pragma(harness, f"max_page_count = {pages}")
    metadata: dict[str, str] = {}
    for n in range(2000):  # fill the last free page, then fail
        try:
            await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=f"s{n}"))
        except grpc.aio.AioRpcError:
            metadata = await _refused_create(harness, f"s{n}")
            failed = f"s{n}"
            break
    assert metadata == {"cause": "disk_full", "commit": "none"}
    listed = await _listed(harness)
    assert failed not in listed
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await harness.sessions.GetSession(pb.GetSessionRequest(instance_id=failed))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    await _pragma(harness, "max_page_count = 1073741823")  # room again: the service goes on
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=failed))
    assert await _listed(harness) == sorted([*listed, failed])


async def _health(harness: Harness) -> int:
    probe = health_pb2_grpc.HealthStub(harness.channel)
    answer = await probe.Check(health_pb2.HealthCheckRequest(service=""))
    return int(answer.status)


async def test_health_says_not_serving_while_commits_fail_and_comes_back_by_itself(
    harness: Harness,
) -> None:
    async def size(db: sql.Db) -> int:
        rows = await db.fetch("PRAGMA page_count")
        return int(rows[0][0])

    await _pragma(harness, f"max_page_count = {await harness.sqlite_store.run(size)}")
    for n in range(2000):  # until the disk is full
        try:
            await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=f"s{n}"))
        except grpc.aio.AioRpcError:
            break
    async with httpx.AsyncClient(base_url=harness.http_url) as http:
        assert (await http.get("/health")).json() == {"status": "not_serving"}
        await wait_for(lambda: _health(harness), health_pb2.HealthCheckResponse.NOT_SERVING)
        await _pragma(harness, "max_page_count = 1073741823")  # room again; nobody writes
        await wait_for(lambda: _health(harness), health_pb2.HealthCheckResponse.SERVING)
        assert (await http.get("/health")).json() == {"status": "serving"}


async def wait_for(read: Callable[[], Awaitable[int]], expected: int, within: float = 5.0) -> None:
    """Poll ``read`` until it gives ``expected``; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while (value := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"still {value}, not {expected}"
        await asyncio.sleep(0.05)


async def test_a_locked_database_is_named_and_changes_nothing(harness: Harness) -> None:
    await _pragma(harness, "busy_timeout = 50")  # fail fast instead of after 5 s
    intruder = sqlite3.connect(harness.settings.database, isolation_level=None)
    try:
        intruder.execute("BEGIN EXCLUSIVE")
        assert await _refused_create(harness, "blocked") == {"cause": "locked", "commit": "none"}
        intruder.execute("ROLLBACK")
    finally:
        intruder.close()
    assert await _listed(harness) == []
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="blocked"))
    assert await _listed(harness) == ["blocked"]


async def test_a_database_that_may_not_be_written_is_named(harness: Harness) -> None:
    await _pragma(harness, "query_only = ON")
    assert await _refused_create(harness, "readonly") == {"cause": "read_only", "commit": "none"}
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await harness.sessions.GetSession(pb.GetSessionRequest(instance_id="readonly"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "plain.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x TEXT)")
        db.commit()
    return path


def _error_of(action: str, path: Path) -> sqlite3.Error:
    """The real error SQLite raises for ``action`` on ``path``."""
    uri = f"file:{path}?mode=ro" if action == "write read-only" else str(path)
    with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
        try:
            if action == "grow past the limit":
                db.execute("PRAGMA max_page_count = 2")
                for _ in range(100):
                    db.execute("INSERT INTO t VALUES (?)", ("x" * 2000,))
            else:
                db.execute("INSERT INTO t VALUES ('x')")
        except sqlite3.Error as error:
            return error
    raise AssertionError(f"{action} did not fail")


@pytest.mark.parametrize(
    ("action", "cause"),
    [
        ("grow past the limit", failures.Cause.DISK_FULL),
        ("write read-only", failures.Cause.READ_ONLY),
        ("read a file that is not a database", failures.Cause.CORRUPT),
    ],
)
def test_real_sqlite_errors_are_classified(
    database: Path, tmp_path: Path, action: str, cause: failures.Cause
) -> None:
    if action == "read a file that is not a database":
        database = tmp_path / "garbage.db"
        database.write_bytes(b"not a database at all\n" * 300)
    error = _error_of(action, database)
    assert failures.cause_of(error) == cause
    contract = failures.storage_unavailable(error)
    assert contract is not None
    assert contract.code == "STORAGE_UNAVAILABLE"
    assert contract.metadata == {"cause": cause.value, "commit": "none"}


def test_errors_that_are_not_storage_failures_pass_unchanged(database: Path) -> None:
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("CREATE UNIQUE INDEX one_x ON t (x)")
        db.execute("INSERT INTO t VALUES ('same')")
        with pytest.raises(sqlite3.IntegrityError) as duplicate:
            db.execute("INSERT INTO t VALUES ('same')")
    assert failures.storage_unavailable(duplicate.value) is None
    assert failures.storage_unavailable(RuntimeError("database or disk is full")) is None
    # Raised by Python code, without a result code: known by SQLite's message.
    raised = sqlite3.OperationalError("database or disk is full")
    assert failures.cause_of(raised) == failures.Cause.DISK_FULL
