"""A commit whose acknowledgement was lost is settled, and wedges nothing (issue 22).

One node on PostgreSQL through a proxy (tests/netproxy.py) that forwards the
writer's next COMMIT, drops the server's reply and closes the connection: the
commit lands, the node never hears so. What "ends well" means:

- the call is answered as if the commit had been acknowledged (it succeeds),
  or fails with STORAGE_UNAVAILABLE whose ErrorInfo says ``commit``: ``none``
  (nothing was stored) or ``unknown`` (it may have landed; the service settles
  it in the background);
- what is stored then agrees with the answer: a success is stored, ``none``
  left the row as it was; GetSession soon says exactly what is stored
  (revision and status);
- every session accepts changes afterwards (no INTERNAL StaleRevision until a
  restart), and is paired again, its network dropped and restored;
- a Send whose intent commit was in doubt is never ``sent`` nor ``unknown``
  unless acknowledged: absent, or ``failed`` with ``NOT_SENT``;
- health tells the truth (serving once writes work), no log line calls the
  node's own old connection another node, and SIGTERM ends the server within
  its bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest

from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.cluster import wait_until
from tests.netproxy import NetProxy
from tests.solo import (
    CALL_TIMEOUT,
    FOREIGN_NODE,
    PHONE,
    Solo,
    accepts_a_change,
    storage_refusal,
)

#: The ``application_name`` of the store's writer connection (service/store/postgres.py).
WRITER = "session-manager"
SESSIONS = 3
SETTLE = 15.0  # seconds for GetSession to agree with the store after a commit in doubt

pytestmark = pytest.mark.timeout(120)


@dataclass
class Rig:
    proxy: NetProxy
    solo: Solo
    db: asyncpg.Connection

    async def stored(self, iid: str) -> dict[str, Any] | None:
        row = await self.db.fetchrow(
            "SELECT * FROM ll_whatsapp_qr_sessions WHERE instance_id = $1", iid
        )
        return None if row is None else dict(row)

    async def message(self, iid: str, key: str) -> dict[str, Any] | None:
        row = await self.db.fetchrow(
            "SELECT m.* FROM messages m JOIN ll_whatsapp_qr_sessions s ON s.id = m.session_id "
            "WHERE s.instance_id = $1 AND m.idempotency_key = $2",
            iid,
            key,
        )
        return None if row is None else dict(row)

    async def lose_next_commit(self, containing: bytes, call: Any) -> tuple[Any, str]:
        """Run ``call`` with the reply lost to the writer's next COMMIT of a transaction that
        ran a statement ``containing`` this; (its answer or None, and ``acknowledged``, or
        the refusal's ``commit``)."""
        lost = self.proxy.commits_lost
        self.proxy.lose_next_commit_reply(WRITER, containing)
        try:
            answer, outcome = await call, "acknowledged"
        except grpc.aio.AioRpcError as error:
            answer, outcome = None, storage_refusal(error)
        assert self.proxy.commits_lost == lost + 1, "the call's commit did not pass the proxy"
        return answer, outcome


@pytest.fixture
async def rig(postgres_url: str) -> AsyncIterator[Rig]:
    with NetProxy.for_url(postgres_url) as proxy:
        solo = await Solo.start(
            proxy.url(postgres_url), "--node-id=solo", "--lease-ttl=4", "--lease-grace=2"
        )
        db = await asyncpg.connect(postgres_url)
        try:
            yield Rig(proxy, solo, db)
        finally:
            await db.close()
            await solo.close()


async def test_a_change_whose_commit_reply_was_lost_is_settled_and_wedges_nothing(
    rig: Rig,
) -> None:
    iids = [f"doubt{n}" for n in range(SESSIONS)]
    for iid in iids:
        await rig.solo.pair(iid)
    outcomes: dict[str, str] = {}
    for iid in iids:
        before = await rig.stored(iid)
        assert before is not None
        assert before["status"] == "connected"
        _, outcomes[iid] = await rig.lose_next_commit(
            b"UPDATE ll_whatsapp_qr_sessions",
            rig.solo.sessions.Disconnect(
                pb.DisconnectRequest(instance_id=iid), timeout=CALL_TIMEOUT
            ),
        )
        after = await rig.stored(iid)
        assert after is not None
        if outcomes[iid] == "acknowledged":
            assert (after["status"], after["revision"] > before["revision"]) == (
                "disconnected",
                True,
            ), f"{iid}: a Disconnect answered as done is stored as {after}"
        elif outcomes[iid] == "none":
            assert after["revision"] == before["revision"], (
                f"{iid}: refused with commit none, yet stored at revision {after['revision']}"
            )
        await wait_until(
            lambda iid=iid: rig.solo.matches_store(iid, rig.stored),  # type: ignore[misc]
            SETTLE,
            f"GetSession of {iid} after a lost COMMIT reply ({outcomes[iid]})",
        )
    print(f"lost COMMIT replies: {outcomes}")

    # Not wedged: each accepts a change, is paired again, and rides out a network drop.
    for iid in iids:
        await accepts_a_change(rig.solo, iid, rig.stored)
        await rig.solo.sessions.RequestQR(
            pb.RequestQRRequest(instance_id=iid), timeout=CALL_TIMEOUT
        )
        scanned = await rig.solo.simulator.ScanQR(
            sim.ScanQRRequest(instance_id=iid, phone_number=PHONE), timeout=CALL_TIMEOUT
        )
        assert scanned.session.phone_number == PHONE
        await rig.solo.simulator.DropNetwork(
            sim.DropNetworkRequest(instance_id=iid), timeout=CALL_TIMEOUT
        )
        await wait_until(
            lambda iid=iid: rig.solo.matches_store(iid, rig.stored),  # type: ignore[misc]
            SETTLE,
            f"GetSession of {iid} after its network drop",
        )
    await wait_until(lambda: rig.solo.health_is(serving=True), SETTLE, "health")
    assert FOREIGN_NODE not in rig.solo.log()
    code, took = await asyncio.to_thread(rig.solo.stop_within_bound)
    assert code == 0, rig.solo.log()[-3000:]
    print(f"stopped in {took:.1f} s")


async def test_a_send_whose_intent_commit_reply_was_lost_is_never_sent_unacknowledged(
    rig: Rig,
) -> None:
    iid = "doubtsend"
    await rig.solo.pair(iid)
    key = "in-doubt"
    request = pb.SendRequest(instance_id=iid, to=PHONE, text="hello", idempotency_key=key)
    answer, outcome = await rig.lose_next_commit(
        b"INSERT INTO messages", rig.solo.sessions.Send(request, timeout=CALL_TIMEOUT)
    )

    async def settled() -> str | None:
        row = await rig.message(iid, key)
        status = None if row is None else (row["status"], row["error_code"])
        if outcome == "acknowledged":
            assert row is not None
            assert row["id"] == answer.message_id, row
            return None if status == ("sent", None) else f"acknowledged, stored as {status}"
        if outcome == "none":
            assert row is None, f"refused with commit none, stored as {status}"
            return None
        # In doubt: settled as never sent (absent, or failed NOT_SENT), never sent nor unknown.
        assert status is None or status[0] in ("pending", "failed"), status
        if status is None or status == ("failed", "NOT_SENT"):
            return None
        return f"in doubt, stored as {status}"

    await wait_until(settled, SETTLE, f"the Send refused with {outcome}")
    await wait_until(lambda: rig.solo.matches_store(iid, rig.stored), SETTLE, "GetSession")
    # The session goes on: a new message is sent, and the key answers what is stored.
    await accepts_a_change(rig.solo, iid, rig.stored)
    await wait_until(lambda: rig.solo.health_is(serving=True), SETTLE, "health")
    code, _ = await asyncio.to_thread(rig.solo.stop_within_bound)
    assert code == 0, rig.solo.log()[-3000:]
