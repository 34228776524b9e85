"""The network faults of the chaos tests (tests/netproxy.py), against a real PostgreSQL.

A partition must look to the node as a real one does: its queries hang rather
than fail, its connections stay open (PostgreSQL still has their backends), a
new connection hangs as well; after ``heal()`` the hung connections are closed
and new ones work. A blackhole keeps both ends of its connections open for
good, even when the client gives up on its side, and lets new connections
through once it reopens. A lost COMMIT reply lands the commit and never tells
the client, only for the application (and the transaction) it was armed for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from tests.netproxy import NetProxy

# How long a call must stay unanswered to count as hung: far above a loopback round trip.
HUNG = 1.0


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[NetProxy]:
    with NetProxy.for_url(postgres_url) as running:
        yield running


async def _backends(url: str, application: str) -> int:
    """How many server processes PostgreSQL has for connections named ``application``."""
    admin = await asyncpg.connect(url)
    try:
        count: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application
        )
        return count
    finally:
        await admin.close()


async def _through(proxy: NetProxy, url: str, application: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        proxy.url(url), timeout=5, server_settings={"application_name": application}
    )


async def test_the_proxy_forwards_queries_both_ways(proxy: NetProxy, postgres_url: str) -> None:
    connection = await _through(proxy, postgres_url, "forwarded")
    try:
        assert await connection.fetchval("SELECT repeat('x', 200000)") == "x" * 200_000
        assert await _backends(postgres_url, "forwarded") == 1
        assert proxy.connections == 1
    finally:
        await connection.close()


async def test_a_partition_hangs_open_connections_and_new_ones_without_resetting_them(
    proxy: NetProxy, postgres_url: str
) -> None:
    connection = await _through(proxy, postgres_url, "cut")
    try:
        proxy.partition()
        query = asyncio.ensure_future(connection.fetchval("SELECT 1"))
        opening = asyncio.ensure_future(_through(proxy, postgres_url, "cut-new"))
        done, _ = await asyncio.wait([query, opening], timeout=HUNG)
        assert not done, "a call through the partition was answered"
        assert not connection.is_closed()
        # Not a reset: PostgreSQL still holds the connection, and the new one is held too.
        assert await _backends(postgres_url, "cut") == 1
        assert proxy.connections == 2

        proxy.heal()
        with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
            await asyncio.wait_for(query, 5)
        with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
            await asyncio.wait_for(opening, 5)
    finally:
        connection.terminate()

    healed = await _through(proxy, postgres_url, "healed")
    try:
        assert await healed.fetchval("SELECT 2") == 2
    finally:
        await healed.close()


async def test_a_partition_of_one_proxy_leaves_another_node_connected(
    proxy: NetProxy, postgres_url: str
) -> None:
    with NetProxy.for_url(postgres_url) as other:
        connection = await _through(other, postgres_url, "other")
        try:
            proxy.partition()
            assert await asyncio.wait_for(connection.fetchval("SELECT 3"), 5) == 3
        finally:
            await connection.close()


async def test_resume_delivers_what_the_partition_held_on_the_same_connection(
    proxy: NetProxy, postgres_url: str
) -> None:
    connection = await _through(proxy, postgres_url, "stalled")
    try:
        proxy.partition()
        query = asyncio.ensure_future(connection.fetchval("SELECT 'late'"))
        done, _ = await asyncio.wait([query], timeout=HUNG)
        assert not done, "a query through the partition was answered"
        assert proxy.held_from_clients > 0

        proxy.resume()
        assert await asyncio.wait_for(query, 5) == "late"
        assert proxy.held_from_clients == 0
        assert await connection.fetchval("SELECT 'after'") == "after"
        assert await _backends(postgres_url, "stalled") == 1
    finally:
        await connection.close()


async def test_a_blackhole_keeps_both_sides_of_its_connections_open_and_reopens_to_new_ones(
    proxy: NetProxy, postgres_url: str
) -> None:
    caught = await _through(proxy, postgres_url, "caught")
    try:
        proxy.blackhole(reopen_after=HUNG)
        query = asyncio.ensure_future(caught.fetchval("SELECT 1"))
        opening = asyncio.ensure_future(_through(proxy, postgres_url, "during"))
        done, _ = await asyncio.wait([query, opening], timeout=HUNG / 2)
        assert not done, "a call through the blackhole was answered"

        # Past the window, new connections go through; the old one still hangs, and
        # PostgreSQL still has its backend: nothing told it the client is gone.
        reopened = await asyncio.wait_for(_wait_for_a_connection(proxy, postgres_url), 10)
        try:
            assert await reopened.fetchval("SELECT 4") == 4
        finally:
            await reopened.close()
        done, _ = await asyncio.wait([query, opening], timeout=HUNG)
        assert not done, "a connection the blackhole caught came back"
        assert await _backends(postgres_url, "caught") == 1
        assert proxy.swallowed >= 2  # and any try of the reopening that came too early

        # The client gives up on its side: the server still hears nothing.
        query.cancel()
        opening.cancel()
        await asyncio.gather(query, opening, return_exceptions=True)
        caught.terminate()
        await asyncio.sleep(HUNG / 2)  # a close has had time to travel, if it were forwarded
        assert await _backends(postgres_url, "caught") == 1

        proxy.heal()  # closes what the blackhole kept open: the backend ends
        await _until_no_backend(postgres_url, "caught")
    finally:
        caught.terminate()


async def _wait_for_a_connection(proxy: NetProxy, url: str) -> asyncpg.Connection:
    """A connection through the proxy, tried until one is answered (each try bounded)."""
    while True:
        try:
            return await _through_soon(proxy, url, "reopened")
        except TimeoutError:
            continue


async def _through_soon(proxy: NetProxy, url: str, application: str) -> asyncpg.Connection:
    """A connection through the proxy, or TimeoutError if not answered within ``HUNG / 2``."""
    return await asyncpg.connect(
        proxy.url(url), timeout=HUNG / 2, server_settings={"application_name": application}
    )


async def _until_no_backend(url: str, application: str) -> None:
    for _ in range(100):
        if await _backends(url, application) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"PostgreSQL still has a backend of {application!r}")


async def test_the_reply_to_a_commit_is_lost_after_the_commit_landed(
    proxy: NetProxy, postgres_url: str
) -> None:
    admin = await asyncpg.connect(postgres_url)
    bystander = await _through(proxy, postgres_url, "bystander")
    writer = await _through(proxy, postgres_url, "writer")
    try:
        await admin.execute("CREATE TABLE landed (x text)")
        proxy.lose_next_commit_reply("writer")
        # Another application's commit goes through untouched.
        async with bystander.transaction():
            await bystander.execute("INSERT INTO landed VALUES ('bystander')")
        # The writer's statements before its COMMIT are answered as usual.
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute("INSERT INTO landed VALUES ('in doubt')")
        assert proxy.commits_lost == 0
        with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
            await asyncio.wait_for(transaction.commit(), 5)
        assert proxy.commits_lost == 1
        assert writer.is_closed()
        # It landed all the same.
        rows = await admin.fetch("SELECT x FROM landed ORDER BY x")
        assert [row["x"] for row in rows] == ["bystander", "in doubt"]
        # Armed once: the next commit is answered.
        again = await _through(proxy, postgres_url, "writer")
        try:
            async with again.transaction():
                await again.execute("INSERT INTO landed VALUES ('after')")
        finally:
            await again.close()
        assert proxy.commits_lost == 1
    finally:
        writer.terminate()
        await bystander.close()
        await admin.close()


async def test_the_lost_commit_reply_can_wait_for_a_transaction_that_ran_a_statement(
    proxy: NetProxy, postgres_url: str
) -> None:
    admin = await asyncpg.connect(postgres_url)
    writer = await _through(proxy, postgres_url, "writer")
    try:
        await admin.execute("CREATE TABLE kept (x text); CREATE TABLE doomed (x text)")
        # The statement is prepared (and cached by asyncpg) before the fault is armed: the
        # proxy knows it again by the statement a bind names.
        insert = "INSERT INTO doomed VALUES ($1)"
        async with writer.transaction():
            await writer.execute(insert, "before")
        proxy.lose_next_commit_reply("writer", containing=b"INTO doomed")
        async with writer.transaction():  # another table: committed and answered
            await writer.execute("INSERT INTO kept VALUES ($1)", "kept")
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(insert, "in doubt")
        with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
            await asyncio.wait_for(transaction.commit(), 5)
        assert proxy.commits_lost == 1
        landed = await admin.fetch("SELECT x FROM doomed ORDER BY x")
        assert [row["x"] for row in landed] == ["before", "in doubt"]
        assert await admin.fetchval("SELECT x FROM kept") == "kept"
    finally:
        writer.terminate()
        await admin.close()
