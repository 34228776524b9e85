"""Crash safety: SIGKILL at random moments under mixed load loses nothing acknowledged.

Each trial starts the real server as a subprocess on one database file, runs
concurrent clients (create, QR, scan, send, drop, disconnect, delete), kills
the server with SIGKILL at a random moment, restarts it on the same file and
checks: every change acknowledged to a client is there, every row satisfies
the invariants, ``PRAGMA integrity_check`` is ok, and no message is recorded
twice. ``CRASH_TRIALS=200`` runs more trials than the default 20.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from service.domain import states
from service.store import sqlite as store
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.servers import ServerProcess

TRIALS = int(os.environ.get("CRASH_TRIALS", "20"))
WORKERS = 6
PHONE = "+5491122334455"


@dataclass
class Acknowledged:
    """What the server acknowledged, and what may have happened unacknowledged."""

    revisions: dict[str, int] = field(default_factory=dict)
    messages: dict[tuple[str, str], str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    maybe_deleted: set[str] = field(default_factory=set)
    changes: int = 0


def _start(database: Path) -> ServerProcess:
    return ServerProcess.start(database, "--send-rate=0", "--log-level=error")


async def _worker(worker: int, address: str, acked: Acknowledged, rng: random.Random) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        phone = simulator_service_pb2_grpc.SimulatorServiceStub(channel)
        mine: list[str] = []
        serial = 0
        while True:
            serial += 1
            op = rng.choice(
                ["create", "create", "qr", "scan", "send", "send", "drop", "disconnect", "delete"]
            )
            if op == "create" or not mine:
                iid = f"w{worker}_{rng.randrange(10**9)}"
                try:
                    answer = await sessions.CreateSession(
                        pb.CreateSessionRequest(instance_id=iid), timeout=5
                    )
                except grpc.aio.AioRpcError:
                    if iid not in acked.revisions:
                        acked.maybe_deleted.add(iid)  # may exist, unacknowledged
                    raise
                mine.append(iid)
                acked.revisions[iid] = answer.session.revision
                acked.changes += 1
                continue
            iid = rng.choice(mine)
            try:
                if op == "qr":
                    got = (
                        await sessions.RequestQR(pb.RequestQRRequest(instance_id=iid), timeout=5)
                    ).session
                elif op == "scan":
                    got = (
                        await phone.ScanQR(
                            sim.ScanQRRequest(instance_id=iid, phone_number=PHONE), timeout=5
                        )
                    ).session
                elif op == "drop":
                    got = (
                        await phone.DropNetwork(sim.DropNetworkRequest(instance_id=iid), timeout=5)
                    ).session
                elif op == "disconnect":
                    got = (
                        await sessions.Disconnect(pb.DisconnectRequest(instance_id=iid), timeout=5)
                    ).session
                elif op == "send":
                    key = f"k{serial}"
                    sent = await sessions.Send(
                        pb.SendRequest(instance_id=iid, to=PHONE, text="hola", idempotency_key=key),
                        timeout=5,
                    )
                    acked.messages[(iid, key)] = sent.message_id
                    acked.changes += 1
                    continue
                else:
                    mine.remove(iid)
                    acked.maybe_deleted.add(iid)
                    await sessions.DeleteSession(
                        pb.DeleteSessionRequest(instance_id=iid), timeout=5
                    )
                    acked.deleted.add(iid)
                    acked.changes += 1
                    continue
            except grpc.aio.AioRpcError as error:
                if error.code() in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    continue  # refused by the contract in this state: nothing changed
                raise
            acked.revisions[iid] = max(acked.revisions.get(iid, 0), got.revision)
            acked.changes += 1


async def _load_until_killed(server: ServerProcess, rng: random.Random) -> Acknowledged:
    acked = Acknowledged()
    tasks = [
        asyncio.create_task(_worker(n, server.address, acked, random.Random(rng.random())))
        for n in range(WORKERS)
    ]
    await asyncio.sleep(rng.uniform(0.2, 1.2))
    server.kill()
    for task in tasks:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await task
    return acked


def _check(database: Path, acked: Acknowledged) -> list[str]:
    problems = []
    with contextlib.closing(sqlite3.connect(database)) as db:
        if (verdict := db.execute("PRAGMA integrity_check").fetchone()[0]) != "ok":
            problems.append(f"integrity_check: {verdict}")
        columns = store._SESSION_COLUMNS
        rows = {row[1]: row for row in db.execute(f"SELECT {columns} FROM ll_whatsapp_qr_sessions")}
        for row in rows.values():
            try:
                states.check_invariants(store._session_row(row))
            except states.InvariantViolation as violation:
                problems.append(str(violation))
        for iid, revision in acked.revisions.items():
            if iid in acked.maybe_deleted:
                continue
            if iid not in rows:
                problems.append(f"{iid}: acknowledged at revision {revision}, now missing")
            elif rows[iid][14] < revision:
                problems.append(f"{iid}: acknowledged revision {revision}, stored {rows[iid][14]}")
        for iid in acked.deleted:
            if iid in rows:
                problems.append(f"{iid}: deletion acknowledged, still stored")
        stored = {
            (iid, key): message_id
            for iid, key, message_id in db.execute(
                "SELECT s.instance_id, m.idempotency_key, m.id FROM messages m "
                "JOIN ll_whatsapp_qr_sessions s ON s.id = m.session_id"
            )
        }
        for (iid, key), message_id in acked.messages.items():
            if iid not in acked.maybe_deleted and stored.get((iid, key)) != message_id:
                problems.append(f"{iid}: acknowledged message {key} ({message_id}) is missing")
        twice = db.execute(
            "SELECT count(*) FROM (SELECT session_id, idempotency_key FROM messages "
            "GROUP BY session_id, idempotency_key HAVING count(*) > 1)"
        ).fetchone()[0]
        if twice:
            problems.append(f"{twice} idempotency keys recorded twice")
    return problems


async def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("CRASH_SEED", "session-manager"))
    checked = failures = 0
    for trial in range(TRIALS):
        database = tmp_path / f"trial-{trial}.db"
        with _start(database) as server:
            acked = await _load_until_killed(server, rng)
        with _start(database) as restarted:  # the restart itself must succeed on the file
            assert restarted.stop() == 0
        problems = _check(database, acked)
        checked += acked.changes
        failures += len(problems)
        assert not problems, f"trial {trial}: {problems[:5]}"
    print(f"crash safety: {TRIALS} trials, {checked} acknowledged changes, {failures} failures")
    assert checked > TRIALS  # the load really ran
