"""Every commit settled: a change whose answer was lost is found out, never guessed.

On PostgreSQL a COMMIT's answer can be lost while the commit itself lands
(the connection drops in between). The service then finds out (the
transaction's status after it reconnects) and answers as if nothing had been
lost; when it cannot find out in time it says so (STORAGE_UNAVAILABLE with
``commit: unknown``), reads the session's row again before anything else is
done with it, and runs what follows a change that did land (a logout). A
message whose intent was in doubt never reaches the engine: it ends
``failed`` / ``NOT_SENT``. On either database, a row newer than the server's
memory is read and adopted, and an outcome once recorded is never rewritten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from service.config import PostgresURL, Settings
from service.domain import errors
from service.domain.states import SessionRef
from service.store import sql
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from tests.conftest import Harness
from tests.flows import connected, eventually, session_of
from tests.status_details import error_info

PHONE = "+5491100000000"


async def _stored(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    db = await asyncpg.connect(url)
    try:
        return list(await db.fetch(query, *args))
    finally:
        await db.close()


def _refused_unknown(error: grpc.aio.AioRpcError) -> None:
    info = error_info(error)
    assert (error.code(), info.reason) == (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
    assert info.metadata["commit"] == "unknown", dict(info.metadata)


def _spy(harness: Harness, name: str) -> list[tuple[Any, ...]]:
    """Record every call of the engine's ``name`` (and still make it)."""
    engine = harness.running.manager.engine
    real: Callable[..., Awaitable[Any]] = getattr(engine, name)
    calls: list[tuple[Any, ...]] = []

    async def recorded(*args: Any) -> Any:
        calls.append(args)
        return await real(*args)

    setattr(engine, name, recorded)
    return calls


class TestOnPostgreSQL:
    @pytest.fixture
    def settings(self, settings: Settings, postgres_url: str, tmp_path: Path) -> Settings:
        return dataclasses.replace(
            settings, database=PostgresURL(postgres_url), devices_dir=tmp_path / "devices"
        )

    async def test_a_commit_whose_answer_was_lost_but_landed_is_answered(
        self, harness: Harness, postgres_url: str
    ) -> None:
        before = await connected(harness, "sender_1")
        harness.running.store.faults.fail_next("commit.acknowledged", action="lose")
        after = await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_1"))
        assert after.session.status == s.SESSION_STATUS_DISCONNECTED
        assert after.session.revision == before.revision + 1
        [row] = await _stored(
            postgres_url,
            "SELECT status, revision FROM ll_whatsapp_qr_sessions WHERE instance_id = $1",
            "sender_1",
        )
        assert (row["status"], row["revision"]) == ("disconnected", after.session.revision)
        again = await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_1"))
        assert again.session.revision == after.session.revision + 1  # not wedged

    async def test_a_change_that_cannot_be_settled_is_read_again_and_its_effect_runs(
        self, harness: Harness, postgres_url: str
    ) -> None:
        before = await connected(harness, "sender_2")
        logouts = _spy(harness, "logout")
        faults = harness.running.store.faults
        faults.fail_next("commit.acknowledged", action="lose")
        faults.fail_next("settle", action="lose")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_2"))
        _refused_unknown(refused.value)
        # The disconnection landed: the service finds out, and the device is logged out.
        now = await session_of(harness, "sender_2")
        assert (now.status, now.revision) == (s.SESSION_STATUS_DISCONNECTED, before.revision + 1)
        await eventually(lambda: len(logouts) == 1)
        assert logouts[0][0] == SessionRef("sender_2", before.id)
        qr = await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_2"))
        assert qr.session.revision == before.revision + 2  # it accepts changes

    async def test_a_change_that_did_not_land_is_not_run(
        self, harness: Harness, postgres_url: str
    ) -> None:
        before = await connected(harness, "sender_3")
        logouts = _spy(harness, "logout")
        faults = harness.running.store.faults
        faults.fail_next("commit")  # it fails before COMMIT: nothing is stored
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_3"))
        assert error_info(refused.value).metadata["commit"] == "none"
        now = await session_of(harness, "sender_3")
        assert (now.status, now.revision) == (s.SESSION_STATUS_CONNECTED, before.revision)
        assert logouts == []

    async def test_a_send_whose_intent_is_in_doubt_never_reaches_the_engine(
        self, harness: Harness, postgres_url: str
    ) -> None:
        await connected(harness, "sender_4")
        sends = _spy(harness, "send")
        faults = harness.running.store.faults
        # The key is looked up first (a read: nothing to settle), then the intent committed.
        faults.fail_next("commit.acknowledged", action="lose", after=1)
        faults.fail_next("settle", action="lose")
        request = pb.SendRequest(
            instance_id="sender_4", to=PHONE, text="hola", idempotency_key="k1"
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.sessions.Send(request)
        _refused_unknown(refused.value)

        async def stored() -> list[asyncpg.Record]:
            return await _stored(
                postgres_url, "SELECT status, error_code FROM messages WHERE idempotency_key = 'k1'"
            )

        for _ in range(100):  # recorded as not sent once the database answers again
            rows = await stored()
            if rows and rows[0]["status"] != "pending":
                break
            await asyncio.sleep(0.05)
        assert [(r["status"], r["error_code"]) for r in await stored()] == [("failed", "NOT_SENT")]
        assert sends == []
        with pytest.raises(grpc.aio.AioRpcError) as replayed:
            await harness.sessions.Send(request)
        info = error_info(replayed.value)
        assert (info.reason, info.metadata["engine_code"]) == ("WHATSAPP_ERROR", "NOT_SENT")
        assert "send it again under a new idempotency key" in (replayed.value.details() or "")


async def test_a_stored_row_newer_than_memory_is_adopted(harness: Harness) -> None:
    """The revision check fails: the row is read again and the change is decided on it."""
    before = await connected(harness, "sender_5")
    with sqlite3.connect(harness.settings.database) as db:  # a change behind the server's back
        db.execute(
            "UPDATE ll_whatsapp_qr_sessions SET revision = revision + 1, "
            "last_error_code = 'NETWORK' WHERE instance_id = 'sender_5'"
        )
    after = await harness.sessions.Disconnect(pb.DisconnectRequest(instance_id="sender_5"))
    assert (after.session.status, after.session.revision) == (
        s.SESSION_STATUS_DISCONNECTED,
        before.revision + 2,
    )
    qr = await harness.sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_5"))
    assert qr.session.revision == before.revision + 3


class _LeaseGone:
    """The fence of a node that lost every lease: no session write may happen."""

    async def check(self, db: sql.Db, instance_id: str) -> None:
        raise errors.session_moving(instance_id, "has moved to another node")


async def test_an_acknowledged_sent_is_never_rewritten(harness: Harness) -> None:
    """The outcome's first commit fails, then the session goes to another owner, which marks
    the message unknown: the outcome still lands (it is not fenced), a replay answers sent."""
    await connected(harness, "sender_6")
    store = harness.running.store
    # The key is looked up, the intent lands, the outcome's commit fails.
    store.faults.fail_next("commit", after=2)
    request = pb.SendRequest(instance_id="sender_6", to=PHONE, text="hola", idempotency_key="k6")
    sent = await harness.sessions.Send(request)
    assert sent.status == pb.MESSAGE_STATUS_SENT
    session = await session_of(harness, "sender_6")
    ref = SessionRef("sender_6", session.id)
    harness.sqlite_store.fence = (
        _LeaseGone()
    )  # this server no longer owns the session (several nodes)
    marked = await store.mark_pending_unknown(
        "OUTCOME_UNKNOWN", "taken over", harness.clock.now(), ref
    )
    assert marked == 1

    async def status() -> int:
        found = await store.find_message(ref, "k6")
        assert found is not None
        return found.status

    for _ in range(100):
        if await status() == pb.MESSAGE_STATUS_SENT:
            break
        await asyncio.sleep(0.05)
    assert await status() == pb.MESSAGE_STATUS_SENT
    replay = await harness.sessions.Send(request)
    assert (replay.status, replay.replayed, replay.message_id) == (
        pb.MESSAGE_STATUS_SENT,
        True,
        sent.message_id,
    )
