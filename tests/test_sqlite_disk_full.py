"""The SQLite disk fills up while workers report, then is freed (issue 22).

One server with its SQLite file on a 4 MiB tmpfs of its own (credentials
elsewhere), sessions paired through the simulated engine's workers. The disk
is filled to the last byte, then the phone's network drops: the worker
reports, and that report cannot be stored. What "ends well" means:

- the call that made the worker report (DropNetwork) ends before its deadline
  with STORAGE_UNAVAILABLE (``cause`` ``disk_full``, ``commit`` ``none`` or
  ``unknown``), not a call left hanging;
- once the space is freed, the session comes back by itself: GetSession says
  what is stored, and a session stored as connected has exactly one live
  worker, a child of the server;
- a Send then is sent (nothing was sent before, so nothing is ``unknown``),
  and a Disconnect is answered;
- SIGTERM right after a failed report ends the server within its bound, and
  the file is whole afterwards (``integrity_check``), every session in it.

The tmpfs needs root (CI and these machines run as root); without it the test
fails saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.census import live_workers
from tests.cluster import metadata, wait_until
from tests.solo import CALL_TIMEOUT, PHONE, Solo, storage_refusal

DISK = "4m"
SETTLE = 20.0  # seconds for a session to come back once the space is freed

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``DISK`` mounted for this test alone."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.fail("mounting the small tmpfs needs root (CI runs as root)", pytrace=False)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount_point)], check=True
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to its last byte; the file that holds the space."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb", buffering=0) as out:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    return filler


def read_row(database: Path, iid: str) -> dict[str, Any] | None:
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as db:
        db.execute("PRAGMA query_only = ON")
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT * FROM ll_whatsapp_qr_sessions WHERE instance_id = ?", (iid,)
        ).fetchone()
        return None if row is None else dict(row)


async def drop_network_on_a_full_disk(solo: Solo, iid: str) -> str:
    """DropNetwork with the disk full: refused as STORAGE_UNAVAILABLE, disk_full, in time."""
    with pytest.raises(grpc.aio.AioRpcError) as refusal:
        await solo.simulator.DropNetwork(
            sim.DropNetworkRequest(instance_id=iid), timeout=CALL_TIMEOUT
        )
    commit = storage_refusal(refusal.value)
    assert metadata(refusal.value).get("cause") == "disk_full", metadata(refusal.value)
    return commit


async def test_sqlite_disk_full_while_workers_report_then_freed(
    small_disk: Path, tmp_path: Path
) -> None:
    database = small_disk / "sessions.db"
    prefix = f"full{uuid.uuid4().hex[:6]}_"
    iids = [f"{prefix}0", f"{prefix}1"]

    async def stored(iid: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(read_row, database, iid)

    solo = await Solo.start(database, f"--devices-dir={tmp_path / 'devices'}")
    try:
        for iid in iids:
            await solo.pair(iid)

        filler = fill(small_disk)
        commit = await drop_network_on_a_full_disk(solo, iids[0])
        filler.unlink()  # the space is back

        async def back(iid: str) -> str | None:
            wrong = await solo.matches_store(iid, stored)
            if wrong is not None:
                return wrong
            row = await stored(iid)
            assert row is not None
            workers = live_workers(prefix).get(iid, [])
            if row["status"] == "connected" and [w.parent for w in workers] != [solo.process.pid]:
                return f"{iid} is stored connected, its live workers are {workers}"
            if row["status"] != "connected":
                return f"{iid} is {row['status']}"
            return None

        await wait_until(lambda: back(iids[0]), SETTLE, f"{iids[0]} after the disk was freed")
        key = f"after-{prefix}"
        sent = await solo.sessions.Send(
            pb.SendRequest(instance_id=iids[0], to=PHONE, text=key, idempotency_key=key),
            timeout=CALL_TIMEOUT,
        )
        assert sent.status == pb.MESSAGE_STATUS_SENT, sent
        await solo.sessions.Disconnect(
            pb.DisconnectRequest(instance_id=iids[0]), timeout=CALL_TIMEOUT
        )
        print(f"a report on a full disk: STORAGE_UNAVAILABLE, commit {commit}; came back")

        # Full again: SIGTERM right after a report failed.
        filler = fill(small_disk)
        await drop_network_on_a_full_disk(solo, iids[1])
        code, took = await asyncio.to_thread(solo.stop_within_bound)
        print(f"stopped on a full disk in {took:.1f} s, exit status {code}")
        filler.unlink()
    finally:
        await solo.close()

    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        kept = {row[0] for row in db.execute("SELECT instance_id FROM ll_whatsapp_qr_sessions")}
    assert kept == set(iids)
