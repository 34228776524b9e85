"""A node cut off by a blackhole serves again once the route is back (issue 22).

One node on PostgreSQL through a proxy (tests/netproxy.py) that stops
forwarding but keeps every socket open, on both sides, and lets new
connections through ``BLACKHOLE`` seconds later. PostgreSQL never learns that
the node's old connections are dead: their backends stay, idle, and the one
of the writer keeps the node's advisory lock. What "ends well" means:

- a change asked for during the blackhole ends before its deadline with a
  clear refusal: SESSION_MOVING (nothing changed), or STORAGE_UNAVAILABLE with
  ``commit`` ``none`` or ``unknown``;
- the node reports itself not serving (gRPC health and ``GET /health`` 503)
  while it cannot commit;
- within ``RECOVERY`` seconds of the route coming back, writes work again
  (the node ends its own old backend and takes its lock again), health says
  serving, its sessions are connected again under its lease, GetSession says
  what is stored, and each session accepts a change;
- no log line calls the node's own old connection another node's
  ("give each node its own --node-id"), and SIGTERM ends it within its bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import grpc
import pytest

from sessionmanager.v1 import session_service_pb2 as pb
from tests.cluster import reason, wait_until
from tests.netproxy import NetProxy
from tests.solo import FOREIGN_NODE, Solo, accepts_a_change, storage_refusal

LEASE_TTL = 4.0
BLACKHOLE = 8.0  # seconds before new connections go through again
RECOVERY = 20.0  # seconds, from then, for writes to work again
#: A call made during the blackhole must be answered well before this.
CALL_DEADLINE = 15.0

pytestmark = pytest.mark.timeout(120)


async def test_a_node_cut_off_by_a_blackhole_serves_again_once_the_route_is_back(
    postgres_url: str,
) -> None:
    db = await asyncpg.connect(postgres_url)

    async def stored(iid: str) -> dict[str, Any] | None:
        row = await db.fetchrow("SELECT * FROM ll_whatsapp_qr_sessions WHERE instance_id = $1", iid)
        return None if row is None else dict(row)

    with NetProxy.for_url(postgres_url) as proxy:
        solo = await Solo.start(
            proxy.url(postgres_url),
            "--node-id=solo",
            f"--lease-ttl={LEASE_TTL:g}",
            "--lease-grace=2",
        )
        try:
            iids = ["cut0", "cut1"]
            for iid in iids:
                await solo.pair(iid)

            proxy.blackhole(reopen_after=BLACKHOLE)
            reopens = time.monotonic() + BLACKHOLE
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refusal:
                await solo.sessions.Disconnect(
                    pb.DisconnectRequest(instance_id=iids[0]), timeout=CALL_DEADLINE
                )
            refused = reason(refusal.value)
            if refused not in ("SESSION_MOVING", "STORAGE_UNAVAILABLE"):
                raise AssertionError(
                    f"a change during the blackhole ended {refusal.value.code().name} "
                    f"{refused} after {time.monotonic() - started:.1f} s: "
                    f"{refusal.value.details()}"
                )
            commit = storage_refusal(refusal.value) if refused == "STORAGE_UNAVAILABLE" else "none"
            print(f"a change during the blackhole: {refused}, commit {commit}")
            if time.monotonic() < reopens:
                await wait_until(
                    lambda: solo.health_is(serving=False), LEASE_TTL + 3, "health while cut off"
                )

            # The route is back for new connections; the old ones are dead for good.
            await asyncio.sleep(max(0.0, reopens - time.monotonic()))  # the fault's own timing
            healed = time.monotonic()
            made = 0

            async def writes_work() -> str | None:
                nonlocal made
                iid = f"after{made}"
                try:
                    await solo.sessions.CreateSession(
                        pb.CreateSessionRequest(instance_id=iid), timeout=5
                    )
                except grpc.aio.AioRpcError as error:
                    made += 1  # a refused create may still be in doubt: never reuse its id
                    return f"{error.code().name} {reason(error)}: {error.details()}"
                return None

            await wait_until(writes_work, RECOVERY, "writes after the blackhole")
            print(f"writes work {time.monotonic() - healed:.1f} s after the route came back")
            await wait_until(lambda: solo.health_is(serving=True), 5, "health after the blackhole")

            async def connected_again() -> str | None:
                for iid in iids:
                    row = await stored(iid)
                    assert row is not None
                    if iid == iids[0] and commit != "none":
                        continue  # its Disconnect may have landed
                    if row["status"] != "connected":
                        return f"{iid} is {row['status']}"
                    wrong = await solo.matches_store(iid, stored)
                    if wrong is not None:
                        return wrong
                return None

            await wait_until(connected_again, RECOVERY, "sessions after the blackhole")
            for iid in iids:
                await wait_until(
                    lambda iid=iid: solo.matches_store(iid, stored),  # type: ignore[misc]
                    RECOVERY,
                    f"GetSession of {iid}",
                )
                await accepts_a_change(solo, iid, stored)
            assert FOREIGN_NODE not in solo.log(), (
                "the node took its own old connection for another node"
            )
            code, took = await asyncio.to_thread(solo.stop_within_bound)
            assert code == 0, solo.log()[-3000:]
            print(f"stopped in {took:.1f} s")
        finally:
            await solo.close()
            await db.close()
