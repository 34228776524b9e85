"""One store suite, both backends: SQLite and PostgreSQL keep the same promises.

Every method of ``service.store.port.Store`` is exercised against each
backend: revisions, cascades, pages, idempotency keys, the CHECK constraints
that refuse what the contract forbids, many operations at once, a commit that
fails, and the schema's migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from service.domain import contract
from service.domain.states import Session, SessionRef, new_session
from service.store import postgres, sqlite
from service.store.messages import Message
from service.store.port import SchemaTooNew, StaleRevision, Store
from tests.postgres import Cluster

T0 = datetime(2026, 11, 23, 9, 30, 15, 123456, tzinfo=UTC)


@dataclass
class Backend:
    """One store backend on one database, with a way around the store for the checks."""

    name: str
    open: Callable[[], Awaitable[Store]]
    #: Runs SQL (``$1``-style parameters) outside the store, committed; returns the rows.
    sql: Callable[..., Awaitable[list[tuple[object, ...]]]]
    #: What the backend raises when a constraint refuses a row.
    integrity_error: type[Exception]
    #: Marks the schema as written by a newer release.
    schema_from_the_future: Callable[[], Awaitable[None]]


def _sqlite_backend(path: Path) -> Backend:
    async def sql(query: str, *args: object) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("PRAGMA foreign_keys = ON")
            return db.execute(re.sub(r"\$\d+", "?", query), args).fetchall()

    async def schema_from_the_future() -> None:
        await sql(f"PRAGMA user_version = {sqlite.SCHEMA_VERSION + 1}")

    return Backend(
        "sqlite",
        lambda: sqlite.Store.open(path),
        sql,
        sqlite3.IntegrityError,
        schema_from_the_future,
    )


def _postgres_backend(url: str) -> Backend:
    async def sql(query: str, *args: object) -> list[tuple[object, ...]]:
        db = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await db.fetch(query, *args)]
        finally:
            await db.close()

    async def schema_from_the_future() -> None:
        await sql("INSERT INTO schema_version (version) VALUES ($1)", postgres.SCHEMA_VERSION + 1)

    return Backend(
        "postgresql",
        lambda: postgres.Store.open(url, "n1"),
        sql,
        asyncpg.IntegrityConstraintViolationError,
        schema_from_the_future,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite_backend(tmp_path / "sessions.db")
    cluster: Cluster = request.getfixturevalue("postgres_cluster")
    return _postgres_backend(await cluster.create_database())


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    yield opened
    await opened.close()


def a_session(instance_id: str, at: datetime = T0) -> Session:
    return new_session(instance_id, at)


#: The instance_id the messages of these tests carry (the stores key messages by session id).
SENDER = "sender"


def ref(session_id: int) -> SessionRef:
    return SessionRef(SENDER, session_id)


def a_message(session_id: int, key: str | None, number: int = 0) -> Message:
    return Message(
        id=f"m-{session_id}-{key}-{number}",
        session_id=session_id,
        instance_id=SENDER,
        idempotency_key=key,
        recipient="+5491100000000",
        text=f"hola {number}",
        status=contract.PENDING,
        accepted_at=T0 + timedelta(seconds=number),
        request_digest="d" * 64,
    )


async def stored(store: Store, session_id: int) -> Session:
    return next(s for s in await store.load_sessions() if s.id == session_id)


def connected(session: Session, revision: int) -> Session:
    """The next revision: connected, with every optional column set."""
    return dataclasses.replace(
        session,
        status=contract.CONNECTED,
        qr_status=contract.QR_NONE,
        phone_number="+5491100000000",
        qr_generated_at=T0 + timedelta(seconds=1),
        qr_expires_at=T0 + timedelta(seconds=61),
        connected_at=T0 + timedelta(seconds=5, microseconds=7),
        disconnected_at=T0 + timedelta(seconds=3),
        last_error_code="LOGOUT",
        last_error_message="the phone unlinked the device",
        updated_at=T0 + timedelta(seconds=5, microseconds=7),
        revision=revision,
    )


# Sessions.


async def test_a_session_reads_back_as_stored(store: Store) -> None:
    session_id = await store.insert_session(a_session("sender_1"))
    first = await stored(store, session_id)
    assert first == dataclasses.replace(a_session("sender_1"), id=session_id)
    changed = connected(first, 2)
    await store.update_session(changed)
    back = await stored(store, session_id)
    assert back == changed
    assert back.connected_at is not None
    assert back.connected_at.tzinfo is not None


async def test_an_update_needs_the_revision_before_it(store: Store) -> None:
    session_id = await store.insert_session(a_session("sender_1"))
    current = await stored(store, session_id)
    await store.update_session(connected(current, 2))
    with pytest.raises(StaleRevision):
        await store.update_session(connected(current, 2))  # a second writer of revision 2
    with pytest.raises(StaleRevision):
        await store.update_session(connected(current, 4))  # a revision skipped
    assert (await stored(store, session_id)).revision == 2


async def test_an_instance_id_is_stored_once(backend: Backend, store: Store) -> None:
    await store.insert_session(a_session("sender_1"))
    with pytest.raises(backend.integrity_error):
        await store.insert_session(a_session("sender_1", T0 + timedelta(hours=1)))
    assert [s.instance_id for s in await store.load_sessions()] == ["sender_1"]


async def test_delete_removes_the_session_and_its_messages(backend: Backend, store: Store) -> None:
    kept = await store.insert_session(a_session("sender_1"))
    gone = await store.insert_session(a_session("sender_2"))
    await store.insert_message(a_message(kept, "k1"))
    await store.insert_message(a_message(gone, "k1"))
    await store.insert_message(a_message(gone, None, 1))
    await store.delete_session(ref(gone))
    assert [s.id for s in await store.load_sessions()] == [kept]
    assert await store.find_message(ref(gone), "k1") is None
    assert await store.find_message(ref(kept), "k1") is not None
    assert await backend.sql("SELECT session_id FROM messages") == [(kept,)]


async def test_pages_follow_byte_order_and_filter_by_status(store: Store) -> None:
    ids = ["b_2", "B_1", "a.3", "a-3", "A9", "z", "0x"]
    for instance_id in ids:
        session_id = await store.insert_session(a_session(instance_id))
        if instance_id.startswith(("a", "A")):
            await store.update_session(connected(await stored(store, session_id), 2))
    expected = sorted(ids, key=str.encode)
    pages, after = [], ""
    while page := await store.list_sessions(after, 3, None):
        pages.append([s.instance_id for s in page])
        after = page[-1].instance_id
    assert pages == [expected[0:3], expected[3:6], expected[6:]]
    only_connected = await store.list_sessions("", 10, contract.CONNECTED)
    assert [s.instance_id for s in only_connected] == ["A9", "a-3", "a.3"]
    assert await store.list_sessions("A9", 10, contract.CONNECTED) == only_connected[1:]
    assert await store.list_sessions("", 10, contract.ERROR) == []


# Messages.


async def test_a_message_is_found_by_its_key_and_keeps_its_outcome(store: Store) -> None:
    session_id = await store.insert_session(a_session("sender_1"))
    message = a_message(session_id, "k1")
    await store.insert_message(message)
    assert await store.find_message(ref(session_id), "k1") == message
    sent = dataclasses.replace(message, status=contract.SENT, whatsapp_message_id="3EB0")
    assert await store.finish_message(sent, T0 + timedelta(seconds=2))
    assert await store.find_message(ref(session_id), "k1") == sent
    failed = dataclasses.replace(
        message, status=contract.FAILED, error_code="WHATSAPP_ERROR", error_message="no"
    )
    # Forward only: an outcome is never replaced, whoever writes the second one.
    assert not await store.finish_message(failed, T0 + timedelta(seconds=3))
    assert await store.find_message(ref(session_id), "k1") == sent
    assert await store.find_message(ref(session_id), "k2") is None


async def test_an_idempotency_key_is_unique_within_its_session(
    backend: Backend, store: Store
) -> None:
    first = await store.insert_session(a_session("sender_1"))
    second = await store.insert_session(a_session("sender_2"))
    await store.insert_message(a_message(first, "k1"))
    await store.insert_message(a_message(second, "k1"))  # another session: its own keys
    await store.insert_message(a_message(first, None, 1))  # messages without a key: any number
    await store.insert_message(a_message(first, None, 2))
    with pytest.raises(backend.integrity_error):
        await store.insert_message(a_message(first, "k1", 3))
    found = await store.find_message(ref(first), "k1")
    assert found is not None
    assert found.text == "hola 0"
    assert await backend.sql("SELECT count(*) FROM messages") == [(4,)]


async def test_pending_messages_are_marked_unknown_once(store: Store) -> None:
    session_id = await store.insert_session(a_session("sender_1"))
    for number, key in enumerate(["k1", "k2", "k3"]):
        await store.insert_message(a_message(session_id, key, number))
    sent = dataclasses.replace(
        a_message(session_id, "k2", 1), status=contract.SENT, whatsapp_message_id="3EB0"
    )
    await store.finish_message(sent, T0)
    assert await store.mark_pending_unknown("OUTCOME_UNKNOWN", "restarted", T0) == 2
    assert await store.mark_pending_unknown("OUTCOME_UNKNOWN", "restarted", T0) == 0
    statuses = {}
    for key in ["k1", "k2", "k3"]:
        found = await store.find_message(ref(session_id), key)
        assert found is not None
        statuses[key] = (found.status, found.error_code)
    assert statuses == {
        "k1": (contract.UNKNOWN_MESSAGE, "OUTCOME_UNKNOWN"),
        "k2": (contract.SENT, None),
        "k3": (contract.UNKNOWN_MESSAGE, "OUTCOME_UNKNOWN"),
    }


async def test_a_late_outcome_lands_on_a_message_marked_unknown(store: Store) -> None:
    """A node that took the session over marks the message unknown; the old owner, which
    knows its outcome, still records it (outcomes are written forward only, by message id)."""
    session_id = await store.insert_session(a_session("sender_1"))
    message = a_message(session_id, "k1")
    await store.insert_message(message)
    session = ref(session_id)
    assert await store.mark_pending_unknown("OUTCOME_UNKNOWN", "taken over", T0, session) == 1
    sent = dataclasses.replace(message, status=contract.SENT, whatsapp_message_id="3EB0")
    assert await store.finish_message(sent, T0 + timedelta(seconds=1))
    assert await store.mark_pending_unknown("OUTCOME_UNKNOWN", "taken over", T0, session) == 0
    assert await store.find_message(session, "k1") == sent


# The database itself refuses what the contract forbids.

FORBIDDEN_ROWS = [
    ("ok_1", "READY", "none", None),  # a legacy status
    ("ok_2", "authenticated", "none", None),
    ("ok_3", "init", "pending", None),  # not a QRStatus
    ("ok_4", "init", "none", "data:image/png;base64,x"),  # qr_string without a code
    ("bad id", "init", "none", None),  # not an instance_id
    ("-leading", "init", "none", None),
    ("x" * 65, "init", "none", None),  # too long
    ("", "init", "none", None),
    ("ok_5", "connected", "none", None),  # connected without a phone
    ("ok_6", "error", "none", None),  # error without its code and message
]
INSERT = (
    "INSERT INTO ll_whatsapp_qr_sessions (instance_id, status, qr_status, qr_string, "
    "created_at, updated_at, revision) "
    "VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
)


async def test_the_database_refuses_forbidden_rows(backend: Backend, store: Store) -> None:
    for row in FORBIDDEN_ROWS:
        with pytest.raises(backend.integrity_error):
            await backend.sql(INSERT, *row)
    await backend.sql(INSERT, "x" * 64, "init", "none", None)
    await backend.sql(INSERT, "sender_1", "qr_required", "generated", "data:image/png;base64,x")
    with pytest.raises(backend.integrity_error):
        await backend.sql("UPDATE ll_whatsapp_qr_sessions SET status = 'CONNECTED'")
    with pytest.raises(backend.integrity_error):
        await backend.sql("UPDATE ll_whatsapp_qr_sessions SET revision = 0")
    rows = await backend.sql("SELECT instance_id, status FROM ll_whatsapp_qr_sessions")
    assert sorted(rows) == [("sender_1", "qr_required"), ("x" * 64, "init")]


async def test_the_store_refuses_a_session_that_breaks_an_invariant(
    backend: Backend, store: Store
) -> None:
    session_id = await store.insert_session(a_session("sender_1"))
    current = await stored(store, session_id)
    no_phone = dataclasses.replace(connected(current, 2), phone_number=None)
    with pytest.raises(backend.integrity_error):
        await store.update_session(no_phone)
    stray_code = dataclasses.replace(current, qr_string="data:image/png;base64,x", revision=2)
    with pytest.raises(backend.integrity_error):
        await store.update_session(stray_code)
    assert await stored(store, session_id) == current


async def test_a_message_needs_its_session_and_a_known_status(
    backend: Backend, store: Store
) -> None:
    with pytest.raises(backend.integrity_error):
        await store.insert_message(a_message(12345, "k1"))
    session_id = await store.insert_session(a_session("sender_1"))
    await store.insert_message(a_message(session_id, "k1"))
    with pytest.raises(backend.integrity_error):
        await backend.sql("UPDATE messages SET status = 'delivered'")


# Many at once, and failures.


async def test_many_operations_at_once_commit_in_call_order(backend: Backend) -> None:
    store = await backend.open()
    session_id = await store.insert_session(a_session("sender_1"))
    first = await stored(store, session_id)
    # Each update needs the one before it: only call order makes all 200 succeed.
    updates = [
        store.update_session(dataclasses.replace(first, revision=revision))
        for revision in range(2, 202)
    ]
    inserts = [store.insert_message(a_message(session_id, f"k{n}", n)) for n in range(200)]
    creations = [store.insert_session(a_session(f"many_{n}")) for n in range(50)]
    _, new_ids = await asyncio.gather(
        asyncio.gather(*updates, *inserts), asyncio.gather(*creations)
    )
    assert new_ids == sorted(new_ids)
    assert len(set(new_ids)) == 50
    await store.close()
    reopened = await backend.open()
    try:
        assert (await stored(reopened, session_id)).revision == 201
        assert len(await reopened.load_sessions()) == 51
        assert await backend.sql("SELECT count(*) FROM messages") == [(200,)]
    finally:
        await reopened.close()


async def test_a_failed_operation_in_a_group_fails_alone(backend: Backend, store: Store) -> None:
    await store.insert_session(a_session("sender_1"))
    together = await asyncio.gather(
        store.insert_session(a_session("sender_2")),
        store.insert_session(a_session("sender_1")),  # already there
        store.insert_session(a_session("sender_3")),
        return_exceptions=True,
    )
    assert isinstance(together[1], backend.integrity_error)
    assert isinstance(together[0], int)
    assert isinstance(together[2], int)
    stored_ids = sorted(s.instance_id for s in await store.load_sessions())
    assert stored_ids == ["sender_1", "sender_2", "sender_3"]


async def test_a_failing_commit_leaves_nothing_behind(backend: Backend, store: Store) -> None:
    session_id = await store.insert_session(a_session("sender_1"))
    before = await stored(store, session_id)
    store.faults.fail_next("commit")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        await store.update_session(connected(before, 2))
    store.faults.fail_next("commit")
    with pytest.raises(sqlite3.OperationalError):
        await store.insert_message(a_message(session_id, "k1"))
    store.faults.fail_next("commit")
    with pytest.raises(sqlite3.OperationalError):
        await store.insert_session(a_session("sender_2"))
    assert await store.load_sessions() == [before]
    assert await backend.sql("SELECT count(*) FROM messages") == [(0,)]
    # The failure is over: the same operations now commit.
    await store.update_session(connected(before, 2))
    await store.insert_message(a_message(session_id, "k1"))
    assert (await stored(store, session_id)).revision == 2


# The schema.


async def test_a_new_database_migrates_and_reopens_with_its_data(backend: Backend) -> None:
    store = await backend.open()
    session_id = await store.insert_session(a_session("sender_1"))
    await store.insert_message(a_message(session_id, "k1"))
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.load_sessions()
    reopened = await backend.open()
    try:
        assert [s.instance_id for s in await reopened.load_sessions()] == ["sender_1"]
        assert await reopened.find_message(ref(session_id), "k1") is not None
    finally:
        await reopened.close()


async def test_a_schema_from_a_newer_release_is_refused(backend: Backend) -> None:
    await (await backend.open()).close()
    await backend.schema_from_the_future()
    with pytest.raises(SchemaTooNew):
        await backend.open()
