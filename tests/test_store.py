"""The database itself refuses what the contract forbids, and knows its schema version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.domain.states import SessionRef
from service.store import sqlite as store

INSERT = (
    "INSERT INTO ll_whatsapp_qr_sessions (instance_id, status, qr_status, qr_string, "
    "created_at, updated_at, revision) VALUES (?, ?, ?, ?, '2026-01-01', '2026-01-01', 1)"
)


@pytest.fixture
async def database(tmp_path: Path) -> Path:
    opened = await store.Store.open(tmp_path / "s.db")
    await opened.close()
    return tmp_path / "s.db"


@pytest.mark.parametrize(
    "row",
    [
        ("ok_1", "READY", "none", None),  # a legacy status
        ("ok_2", "authenticated", "none", None),
        ("ok_3", "init", "pending", None),  # not a QRStatus
        ("ok_4", "init", "none", "data:image/png;base64,x"),  # qr_string without a code
        ("bad id", "init", "none", None),  # not an instance_id
        ("ok_5", "connected", "none", None),  # connected without a phone
        ("ok_6", "error", "none", None),  # error without its code and message
    ],
)
def test_the_database_refuses_forbidden_rows(database: Path, row: tuple[object, ...]) -> None:
    with sqlite3.connect(database) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute(INSERT, row)


def test_the_database_accepts_a_valid_row_and_refuses_a_bad_update(database: Path) -> None:
    with sqlite3.connect(database) as db:
        db.execute(INSERT, ("sender_1", "init", "none", None))
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE ll_whatsapp_qr_sessions SET status = 'CONNECTED'")
        assert db.execute("SELECT status FROM ll_whatsapp_qr_sessions").fetchone() == ("init",)


def test_schema_version(database: Path) -> None:
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (store.SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_newer_schema_is_refused(database: Path) -> None:
    with sqlite3.connect(database) as db:
        db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    with pytest.raises(store.SchemaTooNew):
        await store.Store.open(database)


async def test_a_version_1_file_migrates_and_keeps_its_messages(tmp_path: Path) -> None:
    database = tmp_path / "v1.db"
    with sqlite3.connect(database) as db:
        # As the release before message outcomes wrote it: no 'unknown' status.
        version_1 = store.MIGRATIONS[0].replace(", 'unknown'", "")
        db.executescript(version_1 + "; PRAGMA user_version = 1;")
        db.execute(INSERT, ("sender_1", "init", "none", None))
        db.execute(
            "INSERT INTO messages (id, session_id, idempotency_key, recipient, text, status, "
            "accepted_at) VALUES ('m1', 1, 'k1', '+5491100000000', 'hola', 'pending', "
            "'2026-01-01')"
        )
    opened = await store.Store.open(database)
    try:
        found = await opened.find_message(SessionRef("sender_1", 1), "k1")
        assert found is not None
        assert (found.id, found.text, found.request_digest) == ("m1", "hola", "")
        assert await opened.mark_pending_unknown("OUTCOME_UNKNOWN", "unknown", found.accepted_at)
    finally:
        await opened.close()
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (store.SCHEMA_VERSION,)
        assert db.execute("SELECT status FROM messages").fetchone() == ("unknown",)
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("UPDATE messages SET status = 'lost'")
