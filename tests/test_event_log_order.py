"""On PostgreSQL the event log's sequence numbers follow commit order, whoever writes.

An identity or a sequence gives numbers in the order transactions ask for
them, not the order they commit: a transaction that took 5 may commit after
one that took 6, and a reader that resumed after 6 would never see 5. The
store's append raises a one-row counter locked until COMMIT, so a second
appender waits for the first to commit. These tests interleave two writers by
hand, then run two nodes' writers at once under a reader that tails the log.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from service.domain.events import Change, EventPage
from service.domain.states import SessionRef, new_session
from service.store import postgres, sql

T0 = datetime(2026, 12, 4, 9, tzinfo=UTC)


def a_change(instance_id: str) -> Change:
    return Change(
        type="session.updated",
        occurred_at=T0,
        instance_id=instance_id,
        session_id=1,
        status="init",
        previous_status=None,
        data="{}",
    )


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[postgres.Store]:
    opened = await postgres.Store.open(postgres_url, "reader")  # migrates the schema
    yield opened
    await opened.close()


async def waits_for_a_lock(url: str, pid: int, within: float = 10.0) -> None:
    """Until the backend ``pid`` waits for a lock another transaction holds."""
    db = await asyncpg.connect(url)
    query = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await db.fetchval(query, pid) == "Lock":
                return
            await asyncio.sleep(0.01)
    finally:
        await db.close()
    raise AssertionError(f"backend {pid} never waited for a lock")


async def sequences(store: postgres.Store) -> list[int]:
    return [event.sequence for event in (await store.read_events(0, 100)).events]


async def test_a_second_appender_waits_for_the_first_to_commit(
    store: postgres.Store, postgres_url: str
) -> None:
    first = await asyncpg.connect(postgres_url)
    second = await asyncpg.connect(postgres_url)
    try:
        early = first.transaction()
        await early.start()
        (one,) = await sql.append_events(postgres.Connection(first), [a_change("early")])
        assert one.sequence == 1

        late = second.transaction()
        await late.start()
        taking = asyncio.create_task(
            sql.append_events(postgres.Connection(second), [a_change("late")])
        )
        # The late writer cannot take a number while the early one is not committed ...
        await waits_for_a_lock(postgres_url, second.get_server_pid())
        assert not taking.done()
        assert await sequences(store) == []
        # ... and takes the next one once it is: numbers follow commit order.
        await early.commit()
        (two,) = await asyncio.wait_for(taking, 10)
        assert two.sequence == 2
        assert await sequences(store) == [1]
        await late.commit()
        assert await sequences(store) == [1, 2]
    finally:
        await first.close()
        await second.close()


async def test_a_rolled_back_append_leaves_no_hole(
    store: postgres.Store, postgres_url: str
) -> None:
    db = await asyncpg.connect(postgres_url)
    try:
        transaction = db.transaction()
        await transaction.start()
        await sql.append_events(postgres.Connection(db), [a_change("gone")])
        await transaction.rollback()
        await store.insert_session(new_session("kept", T0))
        assert await sequences(store) == [1]
    finally:
        await db.close()


async def test_a_reader_tailing_two_nodes_writers_never_sees_a_gap(
    store: postgres.Store, postgres_url: str
) -> None:
    """Two writers (two nodes) commit at once; the reader's every page starts right after
    its cursor and has no hole, so no event can appear behind a reader later."""
    writers = [await postgres.Store.open(postgres_url, node) for node in ("n1", "n2")]
    rng = random.Random(4)

    async def write(writer: postgres.Store, name: str) -> None:
        for n in range(60):
            session_id = await writer.insert_session(new_session(f"{name}_{n}", T0))
            if rng.random() < 0.5:
                await writer.delete_session(SessionRef(f"{name}_{n}", session_id), T0)

    writing = asyncio.gather(*(write(w, f"w{i}") for i, w in enumerate(writers)))
    cursor, pages = 0, 0
    try:
        while not writing.done() or cursor < (await store.log_position()).last:
            page: EventPage = await store.read_events(cursor, 7)
            found = [event.sequence for event in page.events]
            assert found == list(range(cursor + 1, cursor + 1 + len(found))), (cursor, found)
            cursor = page.through
            pages += 1
        await writing
    finally:
        for writer in writers:
            await writer.close()
    assert cursor == (await store.log_position()).last >= 120
    print(f"tailed {cursor} events in {pages} pages while two writers committed")
