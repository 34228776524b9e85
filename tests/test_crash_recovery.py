"""Crash safety: SIGKILL at random moments under mixed load loses nothing acknowledged.

Each trial starts the real server as a subprocess on one database file, runs
concurrent clients (create, QR, scan, send, drop, disconnect, delete), kills
the server at a random moment, restarts it on the same file and checks: every
change acknowledged to a client is there, every row satisfies the invariants,
``PRAGMA integrity_check`` is ok, no message is recorded twice, none is left
pending, none WhatsApp took is reported as refused, and no credentials outlive
the session or logout that should have removed them.

Trials take turns among fault modes: a plain SIGKILL from outside; a SIGKILL
from inside at the points between an intent's commit, its effect and its
outcome (``service/faults.py``); commits that fail as on a full disk, then a
SIGKILL. ``CRASH_TRIALS=200`` runs more trials than the default 20.
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
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.domain import states
from service.faults import ENVIRONMENT
from service.store import sql
from service.store import sqlite as store
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.servers import ServerProcess

TRIALS = int(os.environ.get("CRASH_TRIALS", "20"))
WORKERS = 6
PHONE = "+5491122334455"


#: (fault points armed in the server, engine): the trials cycle through them.
MODES: tuple[tuple[str, str], ...] = (
    ("", "simulated"),
    ("send.after_intent=kill:0.05,send.after_effect=kill:0.05", "simulated"),
    ("commit=fail:0.05", "simulated"),
    ("disconnect.after_commit=kill:0.3,delete.after_commit=kill:0.3", "simulated-worker"),
)
#: A storage failure: the commit failed, so nothing changed.
STORAGE_REASONS = {"STORAGE_UNAVAILABLE"}


@dataclass
class Acknowledged:
    """What the server acknowledged, and what may have happened unacknowledged."""

    revisions: dict[str, int] = field(default_factory=dict)
    messages: dict[tuple[str, str], str] = field(default_factory=dict)
    unknown: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    maybe_deleted: set[str] = field(default_factory=set)
    changes: int = 0


def _start(database: Path, faults: str = "", engine: str = "simulated") -> ServerProcess:
    return ServerProcess.start(
        database, f"--engine={engine}", "--send-rate=0", env={ENVIRONMENT: faults}
    )


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
                reason = _reason(error)
                if reason in STORAGE_REASONS:
                    continue  # the commit failed: nothing changed
                if reason == "MESSAGE_OUTCOME_UNKNOWN":
                    acked.unknown.add(_metadata(error)["message_id"])
                    continue
                raise
            acked.revisions[iid] = max(acked.revisions.get(iid, 0), got.revision)
            acked.changes += 1


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The error's ErrorInfo, or None when it has none (the server died)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def _reason(error: grpc.aio.AioRpcError) -> str | None:
    info = _error_info(error)
    return info.reason if info is not None else None


def _metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    info = _error_info(error)
    return dict(info.metadata) if info is not None else {}


async def _load_until_killed(server: ServerProcess, rng: random.Random) -> Acknowledged:
    """Run the clients until the server dies: killed from outside, or by a fault point."""
    acked = Acknowledged()
    tasks = [
        asyncio.create_task(_worker(n, server.address, acked, random.Random(rng.random())))
        for n in range(WORKERS)
    ]
    deadline = asyncio.get_running_loop().time() + rng.uniform(0.2, 1.2)
    while server.process.poll() is None and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - a random moment, or the server's own death
        await asyncio.sleep(0.02)
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
        rows = {row[1]: row for row in db.execute(sql.SELECT_SESSION)}
        for row in rows.values():
            try:
                states.check_invariants(sql.session_from_row(row, store.Connection.decode_time))
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
        pending = db.execute("SELECT count(*) FROM messages WHERE status = 'pending'").fetchone()
        if pending[0]:
            problems.append(f"{pending[0]} messages still pending after the restart")
        refused = db.execute("SELECT count(*) FROM messages WHERE status = 'failed'").fetchone()
        if refused[0]:
            problems.append(f"{refused[0]} messages reported as refused; WhatsApp refused none")
        for message_id in acked.unknown:
            row = db.execute("SELECT status FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is not None and row[0] != "unknown":
                problems.append(f"message {message_id} was answered unknown, stored {row[0]}")
        paired = {
            f"{row[0]}-{row[1]}"
            for row in db.execute(
                "SELECT id, instance_id FROM ll_whatsapp_qr_sessions WHERE status IN "
                "('connected', 'connecting') OR (status = 'disconnected' "
                "AND last_error_code <> 'LOGOUT')"
            )
        }
        devices = database.parent / "devices"
        if devices.is_dir():
            for folder in devices.iterdir():
                if folder.name not in paired:
                    problems.append(f"credentials {folder.name} outlived their session or logout")
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
        faults, engine = MODES[trial % len(MODES)]
        database = tmp_path / f"trial-{trial}" / "sessions.db"
        database.parent.mkdir()
        acked = await _load_until_killed(_start(database, faults, engine), rng)
        # The restart must succeed on the file, and finish what the crash interrupted.
        restarted = _start(database, engine=engine)
        restarted.stop()
        problems = _check(database, acked)
        checked += acked.changes
        failures += len(problems)
        assert not problems, f"trial {trial}: {problems[:5]}"
    print(f"crash safety: {TRIALS} trials, {checked} acknowledged changes, {failures} failures")
    assert checked > TRIALS  # the load really ran
