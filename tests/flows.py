"""Steps many tests share: wait for a condition, follow a session, connect one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.conftest import Harness

PHONE = "+5491122334455"


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until ``check()`` holds, polling; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.05)


async def session_of(h: Harness, iid: str) -> s.WhatsAppSession:
    return (await h.sessions.GetSession(pb.GetSessionRequest(instance_id=iid))).session


async def states_until(
    h: Harness, iid: str, check: Callable[[s.WhatsAppSession], bool], within: float = 15.0
) -> list[s.WhatsAppSession]:
    """The states a watcher sees, up to the first one that passes ``check``."""
    seen: list[s.WhatsAppSession] = []

    async def watch() -> None:
        async for response in h.sessions.WatchSession(pb.WatchSessionRequest(instance_id=iid)):
            seen.append(response.session)
            if check(response.session):
                return

    await asyncio.wait_for(watch(), within)
    return seen


async def connected(h: Harness, iid: str) -> s.WhatsAppSession:
    """Create ``iid``, pair it and let the simulated phone scan: a connected session."""
    await h.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
    await h.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid))
    scanned = await h.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid, phone_number=PHONE))
    assert scanned.session.status == s.SESSION_STATUS_CONNECTED
    return scanned.session
