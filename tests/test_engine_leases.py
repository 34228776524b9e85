"""Each session's lease in the engine: its own deadline and epoch, and its revocation.

A node holds each session's lease on its own (``Engine.hold``): a renewal of
one session extends that session's worker only, and one the node lost is
revoked at once (``Engine.revoke``): its worker ends, nothing about it is
reported, and nothing restarts it. Simulated engines run in real worker
processes with credentials in folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.clock import SystemClock, boottime
from service.domain import states
from service.domain.states import EngineEvent, SessionRef
from service.engine.phone import WorkerPhone
from service.engine.port import EngineError
from service.engine.process import WorkerProcess
from service.engine.protocol import EXIT_LEASE_EXPIRED, Command
from service.engine.supervisor import WorkerEngine, WorkerOptions
from tests.flows import PHONE, eventually
from tests.processes import alive, live_children

#: How far ahead a session's Hold reaches.
LEASE = 2.0
#: Longer than any restart's backoff here: a restart that were due would have run.
RESTART_INITIAL = 0.3


@dataclass
class Node:
    engine: WorkerEngine
    phone: WorkerPhone
    reports: list[tuple[SessionRef, EngineEvent]]

    def reported(self, session: SessionRef) -> list[EngineEvent]:
        return [event for ref, event in self.reports if ref == session]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    reports: list[tuple[SessionRef, EngineEvent]] = []

    async def report(session: SessionRef, event: EngineEvent) -> None:
        reports.append((session, event))

    options = WorkerOptions(
        engine="simulated",
        devices_dir=tmp_path / "devices",
        heartbeat_interval=60.0,
        restart_initial=RESTART_INITIAL,
    )
    engine = WorkerEngine(options, report, SystemClock())
    try:
        yield Node(engine, WorkerPhone(engine), reports)
    finally:
        await engine.close()


async def connected(node: Node, session: SessionRef) -> WorkerProcess:
    await node.engine.start_pairing(session)
    await node.phone.scan(session, PHONE, hold_handshake=False)
    await eventually(lambda: states.Connected(PHONE) in node.reported(session))
    worker = node.engine.worker(session)
    assert worker is not None
    return worker


async def test_a_renewal_extends_only_the_sessions_it_renewed(node: Node) -> None:
    kept, lost = SessionRef("kept", 1), SessionRef("lost", 2)
    for session in (kept, lost):
        node.engine.hold(session.instance_id, boottime() + LEASE, 1)
    kept_worker, lost_worker = [await connected(node, s) for s in (kept, lost)]
    lost_deadline = boottime() + LEASE
    node.engine.hold("lost", lost_deadline, 1)
    reported = len(node.reported(lost))

    async def renew_kept() -> None:  # the node's lease loop: "lost" was not renewed
        while True:
            node.engine.hold("kept", boottime() + LEASE, 1)
            await asyncio.sleep(0.2)

    renewing = asyncio.create_task(renew_kept())
    try:
        assert await lost_worker.wait_exit(LEASE + 5) == EXIT_LEASE_EXPIRED
        assert boottime() >= lost_deadline  # not before its time
        assert kept_worker.alive  # its own deadline moved on
        await asyncio.sleep(2 * RESTART_INITIAL)
        assert set(node.engine.worker_pids()) == {"kept"}  # "lost" is not restarted
        assert len(node.reported(lost)) == reported  # nor reported
        with pytest.raises(EngineError) as refused:
            await node.engine.restore(lost, PHONE)
        assert refused.value.code == "LEASE_EXPIRED"
        assert await node.engine.send(kept, PHONE, "hola") != ""
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing


async def test_a_revoked_session_ends_at_once_and_never_restarts(node: Node) -> None:
    session = SessionRef("revoked", 1)
    node.engine.hold("revoked", boottime() + 60, 1)  # a long lease: its end is no deadline
    worker = await connected(node, session)
    os.kill(worker.pid, signal.SIGKILL)  # a crash: a restart is scheduled after a backoff
    await eventually(lambda: states.Disconnected in map(type, node.reported(session)))
    assert node.engine.worker_pids() == {}

    node.engine.revoke("revoked")  # the lease is lost during the backoff
    reported = len(node.reported(session))
    await asyncio.sleep(3 * RESTART_INITIAL)
    assert node.engine.worker_pids() == {}  # the restart that was due does not run
    assert len(node.reported(session)) == reported
    with pytest.raises(EngineError) as refused:
        await node.engine.start_pairing(session)
    assert refused.value.code == "LEASE_EXPIRED"

    # Held again (taken again): it runs again.
    node.engine.hold("revoked", boottime() + 60, 2)
    await node.engine.release(session)
    await node.engine.restore(session, PHONE)
    await eventually(lambda: "revoked" in node.engine.worker_pids())


async def test_revoking_ends_a_live_worker_at_once_and_reports_nothing(node: Node) -> None:
    session = SessionRef("live", 1)
    node.engine.hold("live", boottime() + 60, 1)
    worker = await connected(node, session)
    reported = len(node.reported(session))
    node.engine.revoke("live")
    assert "live" not in node.engine.worker_pids()  # set aside synchronously
    assert await worker.wait_exit(5) == -signal.SIGKILL  # ended at once, not at its deadline
    await node.engine.release(session)  # waits for nothing more
    await asyncio.sleep(3 * RESTART_INITIAL)
    assert node.engine.worker_pids() == {}
    assert len(node.reported(session)) == reported


async def test_a_hold_of_a_newer_epoch_ends_a_worker_of_an_older_one(node: Node) -> None:
    session = SessionRef("older", 1)
    node.engine.hold("older", boottime() + 60, 1)
    worker = await connected(node, session)
    reported = len(node.reported(session))
    node.engine.hold("older", boottime() + 60, 2)  # the lease was lost and taken again
    assert await worker.wait_exit(5) == -signal.SIGKILL
    await asyncio.sleep(3 * RESTART_INITIAL)
    assert node.engine.worker_pids() == {}
    assert len(node.reported(session)) == reported


async def test_a_worker_ends_on_a_hold_of_another_epoch(tmp_path: Path) -> None:
    async def report(worker: WorkerProcess, event: EngineEvent) -> None:
        pass

    worker = await WorkerProcess.start(
        SessionRef("epoch", 1),
        [
            "--engine=simulated",
            "--instance-id=epoch",
            "--session-id=1",
            "--epoch=1",
            f"--parent-pid={os.getpid()}",
            f"--credentials={tmp_path}",
        ],
        report,
        SystemClock().now,
    )
    try:
        await worker.call(Command(ping=Command.Ping()), 10)
        worker.hold(math.inf, 1)  # its own epoch, no deadline: it runs on
        await worker.call(Command(ping=Command.Ping()), 10)
        assert worker.alive
        worker.hold(math.inf, 2)  # a later lease's: not its own
        assert await worker.wait_exit(5) == EXIT_LEASE_EXPIRED
    finally:
        await worker.stop(5)


async def test_a_release_while_a_worker_starts_ends_that_worker_first(node: Node) -> None:
    session = SessionRef("starting", 1)
    node.engine.hold("starting", boottime() + 60, 1)
    before = live_children()
    await node.engine.restore(session, PHONE)  # its worker starts in the background
    await eventually(lambda: bool(live_children() - before), within=10)
    starting = live_children() - before
    assert "starting" not in node.engine.worker_pids()  # not in use yet: still starting
    await node.engine.release(session)  # the node hands the session over now
    assert not any(alive(pid) for pid in starting)  # gone before the lease is
    await asyncio.sleep(3 * RESTART_INITIAL)
    assert live_children() - before == set()


async def test_revoking_while_a_worker_starts_ends_it_at_once(node: Node) -> None:
    session = SessionRef("revoked-early", 1)
    node.engine.hold("revoked-early", boottime() + 60, 1)
    before = live_children()
    await node.engine.restore(session, PHONE)
    await eventually(lambda: bool(live_children() - before), within=10)
    starting = live_children() - before
    for pid in starting:  # it cannot finish starting: only a kill ends it now
        os.kill(pid, signal.SIGSTOP)
    node.engine.revoke("revoked-early")
    await eventually(lambda: not any(alive(pid) for pid in starting), within=2)
    await node.engine.release(session)
    assert node.engine.worker_pids() == {}
    assert node.reported(session) == []  # it never said anything
