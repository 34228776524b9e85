"""The network partition of the chaos tests (tests/netproxy.py), against a real PostgreSQL.

A partition must look to the node as a real one does: its queries hang rather
than fail, its connections stay open (PostgreSQL still has their backends), a
new connection hangs as well; after ``heal()`` the hung connections are closed
and new ones work.
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
