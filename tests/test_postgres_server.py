"""The Session Manager on PostgreSQL: the main lifecycle tests, a server process, its failures.

The lifecycle tests imported below run here a second time, on a server whose
``--database`` is a ``postgresql://`` URL (the module's ``settings`` fixture):
create, QR, scan, send with a key and its replay, disconnect, delete, watch,
restart on the same database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path

import asyncpg
import grpc
import pytest

from service.config import PostgresURL, Settings
from service.startup import ExitCode
from service.store import failures, postgres
from sessionmanager.v1 import session_pb2, session_service_pb2_grpc
from sessionmanager.v1 import session_service_pb2 as pb
from tests.conftest import Harness
from tests.postgres import Cluster
from tests.servers import ServerProcess, failed_start
from tests.status_details import error_info

# Collected here too, so that they run on PostgreSQL.
from tests.test_contract_lifecycle import (  # noqa: F401
    test_create_is_init_none,
    test_delete_session,
    test_disconnect_from_any_status_but_init,
    test_expiry_rotation_and_a_new_code_after_expiry,
    test_invalid_engine_reports_change_nothing,
    test_list_sessions_pages_and_filters,
    test_scan_then_handshake,
    test_send_only_when_connected,
    test_send_refused_by_whatsapp_is_recorded_and_replayed,
)
from tests.test_watch_and_restart import (  # noqa: F401
    test_fifty_concurrent_request_qr_make_one_code,
    test_restart_brings_back_every_session,
    test_snapshot_first_then_every_change_in_order,
)


@pytest.fixture
def settings(settings: Settings, postgres_url: str, tmp_path: Path) -> Settings:
    """The usual test server, on a PostgreSQL database of its own."""
    return dataclasses.replace(
        settings, database=PostgresURL(postgres_url), devices_dir=tmp_path / "devices"
    )


# Storage failures over the API.


async def _admin(url: str, *statements: str) -> None:
    db = await asyncpg.connect(url)
    try:
        for statement in statements:
            await db.execute(statement)
    finally:
        await db.close()


async def _cut(cluster: Cluster, database: str) -> None:
    """End the server's connection from PostgreSQL's side (a failover, a restart)."""
    await _admin(
        cluster.url(),
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        f"WHERE application_name = 'session-manager' AND datname = '{database}'",
    )


async def _refused_cause(harness: Harness, instance_id: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    info = error_info(refused.value)
    assert info.reason == "STORAGE_UNAVAILABLE"
    assert "secret" not in (refused.value.details() or "")
    cause: str = info.metadata["cause"]
    return cause


async def _eventually_created(harness: Harness, instance_id: str) -> None:
    """Create ``instance_id`` once the database takes writes again (a read-only default
    lifted applies to the server's next connection)."""
    for _ in range(100):
        try:
            await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
            return
        except grpc.aio.AioRpcError as error:
            if error_info(error).reason != "STORAGE_UNAVAILABLE":
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"{instance_id} could not be created in 10 s")


async def test_database_failures_are_named_and_change_nothing(
    harness: Harness, postgres_cluster: Cluster, postgres_url: str
) -> None:
    database = postgres_url.rpartition("/")[2]
    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="before"))

    await _admin(postgres_cluster.url(), f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    await _cut(postgres_cluster, database)
    assert await _refused_cause(harness, "while_unreachable") == "unreachable"

    await _admin(
        postgres_cluster.url(),
        f"ALTER DATABASE {database} ALLOW_CONNECTIONS true",
        f"ALTER DATABASE {database} SET default_transaction_read_only = on",  # as a standby
    )
    assert await _refused_cause(harness, "while_read_only") == "read_only"

    await _admin(postgres_cluster.url(), f"ALTER DATABASE {database} RESET ALL")
    # Writable again: the server's writer reconnects (and stops probing) before it is cut off.
    await _eventually_created(harness, "between")
    usurper = await asyncpg.connect(postgres_url)
    try:  # another server takes the database the moment the connection is down
        taken = await usurper.fetchval(
            "WITH cut AS (SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE application_name = 'session-manager' AND datname = $2) "
            "SELECT pg_try_advisory_lock($1) FROM cut",
            postgres.lock_key(harness.settings.node_id),
            database,
        )
        assert taken, "the server took its lock again before the other one could"
        assert await _refused_cause(harness, "while_taken") == "locked"
    finally:
        await usurper.close()

    await harness.sessions.CreateSession(pb.CreateSessionRequest(instance_id="after"))
    listed = await harness.sessions.ListSessions(pb.ListSessionsRequest())
    assert [s.instance_id for s in listed.sessions] == ["after", "before", "between"]


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (asyncpg.DiskFullError("could not extend file"), failures.Cause.DISK_FULL),
        (asyncpg.ReadOnlySQLTransactionError("read-only"), failures.Cause.READ_ONLY),
        (asyncpg.InsufficientPrivilegeError("permission denied"), failures.Cause.READ_ONLY),
        (asyncpg.LockNotAvailableError("could not obtain lock"), failures.Cause.LOCKED),
        (asyncpg.DeadlockDetectedError("deadlock"), failures.Cause.LOCKED),
        (asyncpg.DataCorruptedError("invalid page"), failures.Cause.CORRUPT),
        (asyncpg.PostgresIOError("could not read block"), failures.Cause.IO_ERROR),
        (asyncpg.AdminShutdownError("terminating connection"), failures.Cause.UNREACHABLE),
        (
            asyncpg.CannotConnectNowError("the database system is starting up"),
            failures.Cause.UNREACHABLE,
        ),
        (asyncpg.ConnectionFailureError("connection failure"), failures.Cause.UNREACHABLE),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), failures.Cause.UNREACHABLE),
        (postgres.DatabaseUnreachable("lost the connection"), failures.Cause.UNREACHABLE),
        (postgres.DatabaseInUse("postgresql://sm@db/s", "n1"), failures.Cause.LOCKED),
    ],
)
def test_postgresql_failures_have_the_causes_of_sqlite_ones(
    error: Exception, cause: failures.Cause
) -> None:
    assert failures.cause_of(error) == cause
    contract = failures.storage_unavailable(error)
    assert contract is not None
    assert contract.metadata["cause"] == cause.value


def test_what_is_not_a_storage_failure_is_not_named() -> None:
    for error in (
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.CheckViolationError("violates check constraint"),
        asyncpg.UndefinedTableError("no such table"),  # a bug, not the operator's to fix
        OSError("not the database's"),
    ):
        assert failures.cause_of(error) is None, error


# A server process.


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get(address: str, instance_id: str) -> session_pb2.WhatsAppSession:
    with grpc.insecure_channel(address) as channel:
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        answer = sessions.GetSession(pb.GetSessionRequest(instance_id=instance_id), timeout=10)
        return answer.session


def test_one_server_process_per_postgresql_database(postgres_url: str, tmp_path: Path) -> None:
    devices = f"--devices-dir={tmp_path / 'devices'}"
    with ServerProcess.start(postgres_url, devices) as first:
        with grpc.insecure_channel(first.address) as channel:
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            sessions.CreateSession(pb.CreateSessionRequest(instance_id="kept"), timeout=10)
        refusal = failed_start(postgres_url, devices)
        assert refusal.code == ExitCode.DATABASE_IN_USE, refusal.lines
        assert refusal.lines == [
            f"session-manager: the database {postgres_url} is in use by another server "
            f"as node {socket.gethostname()!r}; give each node its own --node-id"
        ]
        assert _get(first.address, "kept").revision == 1  # the first one goes on serving
        assert first.stop() == 0
    with ServerProcess.start(postgres_url, devices) as second:
        assert _get(second.address, "kept").instance_id == "kept"


def test_a_database_that_cannot_be_opened_refuses_to_start(
    postgres_cluster: Cluster, tmp_path: Path
) -> None:
    devices = f"--devices-dir={tmp_path / 'devices'}"
    nobody = f"postgresql://sm:secret@127.0.0.1:{_closed_port()}/sessions"
    missing = postgres_cluster.url("no_such_database")
    for url, code, words in [
        (nobody, ExitCode.DATABASE_UNAVAILABLE, "cannot reach the database postgresql://sm:***@"),
        (missing, ExitCode.DATABASE_UNAVAILABLE, '"no_such_database" does not exist'),
        ("postgresql://sm@db:port/s", ExitCode.BAD_SETTING, "--database: is not a usable"),
    ]:
        refusal = failed_start(url, devices)
        assert refusal.code == code, refusal.lines
        assert len(refusal.lines) == 1, refusal.lines
        assert words in refusal.lines[0]
        assert "secret" not in refusal.lines[0]
