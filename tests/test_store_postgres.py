"""What only the PostgreSQL store has: a URL, a lock per database, a connection that can drop."""

from __future__ import annotations

import asyncpg
import pytest

from service.domain.states import new_session
from service.store import postgres
from tests.postgres import Cluster
from tests.test_store_contract import T0


async def _admin(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    db = await asyncpg.connect(url)
    try:
        return await db.fetch(query, *args)
    finally:
        await db.close()


async def _cut_connections(url: str) -> int:
    """End the store's connection from the server's side, as a failover or a restart would."""
    rows = await _admin(
        url,
        # Waits (up to 5 s) until each one has ended, and its advisory lock with it.
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        "WHERE application_name = 'session-manager' AND datname = current_database()",
    )
    assert all(row[0] for row in rows)
    return len(rows)


def test_a_url_selects_postgresql_and_its_password_is_never_shown() -> None:
    assert postgres.is_url("postgresql://sm@db.internal/sessions")
    assert postgres.is_url("postgres://sm@db.internal:5433/sessions")
    assert not postgres.is_url("data/sessions.db")
    assert not postgres.is_url("/var/lib/session-manager/sessions.db")
    assert (
        postgres.display("postgresql://sm:s3cret@db.internal:5433/sessions?sslmode=require")
        == "postgresql://sm:***@db.internal:5433/sessions?sslmode=require"
    )
    assert postgres.display("postgresql://sm@db/sessions") == "postgresql://sm@db/sessions"


async def test_one_server_per_node_and_database(postgres_cluster: Cluster) -> None:
    url = await postgres_cluster.create_database()
    first = await postgres.Store.open(url, "n1")
    try:
        with pytest.raises(postgres.DatabaseInUse, match=f"the database {url} is in use .* 'n1'"):
            await postgres.Store.open(url, "n1")
        beside = await postgres.Store.open(url, "n2")  # another node of the same database
        await beside.close()
        other = await postgres.Store.open(await postgres_cluster.create_database(), "n1")
        await other.close()  # another database of the same cluster is another owner's
    finally:
        await first.close()
    second = await postgres.Store.open(url, "n1")  # closing gave the database up
    await second.close()


async def test_commits_are_synchronous_whatever_the_database_default(postgres_url: str) -> None:
    database = postgres_url.rpartition("/")[2]
    await _admin(postgres_url, f"ALTER DATABASE {database} SET synchronous_commit = off")
    store = await postgres.Store.open(postgres_url, "n1")
    try:
        rows = await store.run(lambda db: db.fetch("SHOW synchronous_commit"))
        setting = rows[0][0]
        assert setting == "on"
    finally:
        await store.close()


async def test_a_lost_connection_is_taken_up_again(postgres_url: str) -> None:
    store = await postgres.Store.open(postgres_url, "n1")
    try:
        session_id = await store.insert_session(new_session("sender_1", T0))
        assert await _cut_connections(postgres_url) == 1
        outcomes: list[object] = []
        for _ in range(2):
            try:
                outcomes.append([s.id for s in await store.load_sessions()])
            except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError) as error:
                outcomes.append(error)
        # The operation under way when the connection dropped may fail; the next one reconnects.
        assert outcomes[-1] == [session_id]
        await store.insert_session(new_session("sender_2", T0))
        assert len(await store.load_sessions()) == 2
    finally:
        await store.close()


async def test_a_store_whose_database_was_taken_over_writes_nothing(postgres_url: str) -> None:
    store = await postgres.Store.open(postgres_url, "n1")
    try:
        await store.insert_session(new_session("sender_1", T0))
        await _cut_connections(postgres_url)
        usurper = await postgres.Store.open(postgres_url, "n1")  # the lock was free for a moment
        try:
            refusals = []
            for instance_id in ("sender_2", "sender_3"):
                with pytest.raises(Exception) as refused:  # noqa: PT011 - checked below
                    await store.insert_session(new_session(instance_id, T0))
                refusals.append(refused.value)
            # The first may meet the dropped connection; then the lock is what refuses.
            assert isinstance(refusals[-1], postgres.DatabaseInUse)
            assert [s.instance_id for s in await usurper.load_sessions()] == ["sender_1"]
        finally:
            await usurper.close()
        await store.insert_session(new_session("sender_4", T0))  # given up: taken again
        assert len(await store.load_sessions()) == 2
    finally:
        await store.close()
