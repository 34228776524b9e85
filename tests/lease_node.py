"""A node's engine alone in a process, renewing its lease: for tests that freeze it.

``python -m tests.lease_node DEVICES_DIR`` runs a ``WorkerEngine`` with
simulated workers, pairs and connects one session, then extends the session's
Hold every ``RENEW_EVERY`` seconds to ``LEASE`` seconds ahead, as a node's
lease loop does, and, as a node does, gives the session up once a round comes
after the deadline (it was frozen). It prints one JSON line on standard output, ``{"worker":
pid}``, once the session is connected; then, when it reads ``ended`` on
standard input, it waits for that worker to end, gives the supervisor longer
than a restart's backoff to act on it, and prints ``{"exit": code, "workers":
{...}, "reports": n}``: the worker's exit status, the workers that run now and
how many reports the engine made since the session connected. A test freezes
the process with SIGSTOP and resumes it with SIGCONT in between.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from service.clock import SystemClock, boottime
from service.domain.states import EngineEvent, SessionRef
from service.engine.phone import WorkerPhone
from service.engine.supervisor import WorkerEngine, WorkerOptions

LEASE = 2.0
RENEW_EVERY = 0.2
RESTART_INITIAL = 0.2
SESSION = SessionRef("frozen-node", 1)
EPOCH = 1
PHONE = "+5491122334455"


def say(fact: dict[str, object]) -> None:
    print(json.dumps(fact), flush=True)


async def renew(engine: WorkerEngine) -> None:
    """Extend the Hold; once a round comes after the deadline (frozen), the lease is lost:
    the session is released, as ``service.cluster.node`` does, and nothing is renewed."""
    deadline = boottime() + LEASE
    while boottime() < deadline:
        engine.hold(SESSION.instance_id, deadline, EPOCH)
        await asyncio.sleep(RENEW_EVERY)
        deadline = boottime() + LEASE if boottime() < deadline else deadline
    engine.revoke(SESSION.instance_id)
    await engine.release(SESSION)


async def main(devices: Path) -> None:
    reports: list[EngineEvent] = []

    async def report(session: SessionRef, event: EngineEvent) -> None:
        reports.append(event)

    options = WorkerOptions(
        engine="simulated",
        devices_dir=devices,
        heartbeat_interval=60.0,
        restart_initial=RESTART_INITIAL,
    )
    engine = WorkerEngine(options, report, SystemClock())
    engine.hold(SESSION.instance_id, boottime() + LEASE, EPOCH)  # held before it pairs
    renewing = asyncio.create_task(renew(engine))
    try:
        await engine.start_pairing(SESSION)
        await WorkerPhone(engine).scan(SESSION, PHONE, hold_handshake=False)
        worker = engine.worker(SESSION)
        assert worker is not None
        connected = len(reports)
        say({"worker": worker.pid})
        await asyncio.to_thread(sys.stdin.readline)  # "ended": the test froze and resumed us
        code = await worker.exited
        await asyncio.sleep(5 * RESTART_INITIAL)  # a restart, if one were due, would run by now
        say({"exit": code, "workers": engine.worker_pids(), "reports": len(reports) - connected})
    finally:
        renewing.cancel()
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
