"""Several nodes over one PostgreSQL database, in this process: any node answers any call.

Three servers share one throwaway database (tests/postgres.py), each with a
node id of its own and short leases. Placement is rendezvous hashing, so the
tests ask ``placement.owner_of`` which node should own a session and call the
others. The process-level proof (kill -9, SIGSTOP, partitions, worker
processes) is tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from service.cluster import placement
from service.config import PostgresURL, Settings
from service.domain import errors
from service.engine.supervisor import WorkerEngine
from service.server import RunningServer, start
from service.startup import StartupError
from service.store import leases, postgres
from sessionmanager.v1 import node_service_pb2 as node_pb
from sessionmanager.v1 import session_pb2, session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim_pb
from tests.flows import eventually
from tests.processes import alive
from tests.status_details import error_info
from tests.test_http_api import API
from tests.test_http_sse import events

NODES = ("n1", "n2", "n3")
CONNECTED = session_pb2.SESSION_STATUS_CONNECTED


@dataclass
class Member:
    running: RunningServer
    channel: grpc.aio.Channel

    @property
    def node_id(self) -> str:
        assert self.running.cluster is not None
        return self.running.cluster.node.node_id

    @property
    def sessions(self) -> session_service_pb2_grpc.SessionServiceAsyncStub:
        return session_service_pb2_grpc.SessionServiceStub(self.channel)

    @property
    def simulator(self) -> simulator_service_pb2_grpc.SimulatorServiceAsyncStub:
        return simulator_service_pb2_grpc.SimulatorServiceStub(self.channel)

    async def stop(self) -> None:
        await self.channel.close(None)
        await self.running.stop(grace=1.0)


def node_settings(settings: Settings, url: str, node_id: str, tmp_path: Path) -> Settings:
    return dataclasses.replace(
        settings,
        database=PostgresURL(url),
        devices_dir=tmp_path / node_id,
        node_id=node_id,
        lease_ttl=1.0,
        lease_grace=0.3,
        moves_per_second=200.0,
    )


async def join(settings: Settings) -> Member:
    running = await start(settings)
    return Member(running, grpc.aio.insecure_channel(f"127.0.0.1:{running.port}"))


@pytest.fixture
async def members(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> AsyncIterator[dict[str, Member]]:
    started: dict[str, Member] = {}
    try:
        for node_id in NODES:
            started[node_id] = await join(node_settings(settings, postgres_url, node_id, tmp_path))
        for member in started.values():  # each has heard of every other one
            node = member.running.cluster.node  # type: ignore[union-attr]
            await eventually(lambda node=node: len(node.live) == len(NODES))  # type: ignore[misc]
        yield started
    finally:
        for member in started.values():
            await member.stop()


def owner_and_others(members: dict[str, Member], instance_id: str) -> tuple[Member, list[Member]]:
    owner = placement.owner_of(instance_id, members)
    assert owner is not None
    return members[owner], [m for node_id, m in members.items() if node_id != owner]


async def connect(via: Member, instance_id: str) -> None:
    await via.sessions.CreateSession(pb.CreateSessionRequest(instance_id=instance_id))
    await via.sessions.RequestQR(pb.RequestQRRequest(instance_id=instance_id))
    await via.simulator.ScanQR(sim_pb.ScanQRRequest(instance_id=instance_id))
    answer = await via.sessions.GetSession(pb.GetSessionRequest(instance_id=instance_id))
    assert answer.session.status == CONNECTED


async def next_state(stream: Any) -> session_pb2.WhatsAppSession:
    """The next state a WatchSession stream sends, within 10 s."""
    change = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(change, pb.WatchSessionResponse)
    return change.session


async def lease_of(url: str, instance_id: str) -> tuple[str | None, int]:
    db = await asyncpg.connect(url)
    try:
        row = await db.fetchrow(
            "SELECT owner, epoch FROM leases WHERE instance_id = $1", instance_id
        )
    finally:
        await db.close()
    assert row is not None
    return row["owner"], row["epoch"]


async def test_commands_on_any_node_run_on_the_owner(
    members: dict[str, Member], postgres_url: str
) -> None:
    owner, (other, third) = owner_and_others(members, "sender_1")
    await connect(other, "sender_1")  # created, paired and scanned through a node that forwards
    lease_owner, _ = await lease_of(postgres_url, "sender_1")
    assert lease_owner is not None
    assert lease_owner.startswith(f"{owner.node_id}/")
    for member in members.values():
        got = await member.sessions.GetSession(pb.GetSessionRequest(instance_id="sender_1"))
        assert got.session.status == CONNECTED
    sent = await third.sessions.Send(
        pb.SendRequest(
            instance_id="sender_1", to="+5491100000000", text="hola", idempotency_key="k"
        )
    )
    again = await other.sessions.Send(
        pb.SendRequest(
            instance_id="sender_1", to="+5491100000000", text="hola", idempotency_key="k"
        )
    )
    assert (again.message_id, again.replayed) == (sent.message_id, True)
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await third.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_1"))
    assert error_info(twice.value).reason == "SESSION_ALREADY_EXISTS"  # the owner's own error


async def test_watchers_on_every_node_follow_the_owner_commits(
    members: dict[str, Member],
) -> None:
    owner, others = owner_and_others(members, "sender_2")
    await owner.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_2"))
    streams = [
        m.sessions.WatchSession(pb.WatchSessionRequest(instance_id="sender_2"))
        for m in members.values()
    ]
    firsts = [await next_state(stream) for stream in streams]
    assert {first.revision for first in firsts} == {1}
    await others[0].sessions.RequestQR(pb.RequestQRRequest(instance_id="sender_2"))
    await others[1].simulator.ScanQR(sim_pb.ScanQRRequest(instance_id="sender_2"))
    for stream in streams:
        seen: list[session_pb2.WhatsAppSession] = []
        while not seen or seen[-1].status != CONNECTED:
            seen.append(await next_state(stream))
        revisions = [s.revision for s in seen]
        assert revisions == sorted(set(revisions))  # in order, never back
        stream.cancel()


async def test_a_node_that_leaves_hands_its_sessions_over_without_a_new_qr(
    members: dict[str, Member], postgres_url: str
) -> None:
    owner, (survivor, _) = owner_and_others(members, "sender_3")
    await connect(survivor, "sender_3")

    _, epoch = await lease_of(postgres_url, "sender_3")
    watch = survivor.sessions.WatchSession(pb.WatchSessionRequest(instance_id="sender_3"))
    assert (await next_state(watch)).status == CONNECTED
    del members[owner.node_id]
    await owner.stop()
    statuses: list[int] = []
    while len(statuses) < 2 or statuses[-1] != CONNECTED:
        statuses.append((await next_state(watch)).status)
    assert session_pb2.SESSION_STATUS_CONNECTING in statuses  # reconnected, never asked for a QR
    assert session_pb2.SESSION_STATUS_QR_REQUIRED not in statuses
    new_owner, new_epoch = await lease_of(postgres_url, "sender_3")
    assert new_epoch > epoch
    assert new_owner is not None
    assert not new_owner.startswith(f"{owner.node_id}/")
    watch.cancel()


async def test_a_write_with_a_stale_epoch_changes_nothing(
    members: dict[str, Member], postgres_url: str
) -> None:
    owner, _ = owner_and_others(members, "sender_4")
    await owner.sessions.CreateSession(pb.CreateSessionRequest(instance_id="sender_4"))
    node = owner.running.cluster.node  # type: ignore[union-attr]
    store = owner.running.store
    session = await store.get_session("sender_4")
    assert session is not None
    db = await asyncpg.connect(postgres_url)
    try:  # another owner took the lease over (as after this node froze past it)
        await db.execute(
            "UPDATE leases SET owner = 'elsewhere/1', epoch = epoch + 1 WHERE instance_id = $1",
            "sender_4",
        )
    finally:
        await db.close()
    stale = dataclasses.replace(session, revision=session.revision + 1, phone_number="+1555")
    before = node.book.epochs.get("sender_4")
    assert before is not None
    with pytest.raises(errors.ContractError) as refused:
        await store.update_session(stale)
    assert refused.value.reason == session_pb2.ERROR_REASON_SESSION_MOVING
    assert (await store.get_session("sender_4")) == session  # nothing written
    await eventually(lambda: "sender_4" not in node.book.epochs)  # the node let it go


async def test_a_session_whose_owner_cannot_be_reached_is_moving_over_http(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    member = await join(
        dataclasses.replace(
            node_settings(settings, postgres_url, "n1", tmp_path), http_address="127.0.0.1:0"
        )
    )
    try:
        db = await asyncpg.connect(postgres_url)
        try:  # a session held by a node whose lease runs but which left the nodes table
            await db.execute(
                "INSERT INTO ll_whatsapp_qr_sessions (instance_id, status, qr_status, "
                "created_at, updated_at, revision) VALUES ('far_1', 'init', 'none', now(), "
                "now(), 1)"
            )
            await leases.acquire(db, "far_1", "gone/1", 60.0, 0.0)
        finally:
            await db.close()
        url = f"http://127.0.0.1:{member.running.http_port}/api/session-manager"
        async with httpx.AsyncClient(base_url=url) as http:
            answer = await http.post("/sessions/far_1/qr")
            assert answer.status_code == 503, answer.text
            body = answer.json()
            assert body["code"] == "SESSION_MOVING"
            assert answer.headers.get("retry-after") is not None
            read = await http.get("/sessions/far_1")  # reads need no owner
            assert read.status_code == 200
            assert read.json()["status"] == "init"
    finally:
        await member.stop()


async def test_a_node_id_runs_once_per_database(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    member = await join(node_settings(settings, postgres_url, "n1", tmp_path))
    try:
        with pytest.raises(Exception) as refused:  # noqa: PT011 - the one-line startup error
            await start(node_settings(settings, postgres_url, "n1", tmp_path))
        assert "give each node its own --node-id" in str(refused.value)
    finally:
        await member.stop()
    _ = postgres  # the store module names the lock


def owned_by(node_id: str, prefix: str, nodes: tuple[str, ...]) -> str:
    """An instance_id that ``node_id`` owns while ``nodes`` run."""
    return next(
        f"{prefix}_{n}"
        for n in range(1000)
        if placement.owner_of(f"{prefix}_{n}", nodes) == node_id
    )


async def test_with_workers_a_moved_session_reconnects_from_stored_credentials(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    workers = dataclasses.replace(settings, engine="simulated-worker")
    first = await join(node_settings(workers, postgres_url, "n1", tmp_path))
    second = await join(node_settings(workers, postgres_url, "n2", tmp_path))
    running = [first, second]
    try:
        for member in (first, second):
            node = member.running.cluster.node  # type: ignore[union-attr]
            await eventually(lambda node=node: len(node.live) == 2)  # type: ignore[misc]
        paired = owned_by("n1", "paired", ("n1", "n2"))
        pairing = owned_by("n1", "pairing", ("n1", "n2"))
        await connect(second, paired)  # through n2, run by n1's worker
        await second.sessions.CreateSession(pb.CreateSessionRequest(instance_id=pairing))
        shown = await second.sessions.RequestQR(pb.RequestQRRequest(instance_id=pairing))
        first_engine = first.running.engine
        assert isinstance(first_engine, WorkerEngine)
        assert set(first_engine.worker_pids()) == {paired, pairing}
        running.remove(first)
        await first.stop()  # hands both over to n2
        second_engine = second.running.engine
        assert isinstance(second_engine, WorkerEngine)
        await eventually(lambda: set(second_engine.worker_pids()) == {paired}, within=15)

        async def status_of(instance_id: str) -> session_pb2.WhatsAppSession:
            got = await second.sessions.GetSession(pb.GetSessionRequest(instance_id=instance_id))
            return got.session

        watch = second.sessions.WatchSession(pb.WatchSessionRequest(instance_id=paired))
        while (await next_state(watch)).status != CONNECTED:
            pass
        watch.cancel()
        moved = await status_of(paired)
        assert moved.phone_number  # reconnected from its credentials, no QR on the way
        assert moved.qr_status != session_pb2.QR_STATUS_GENERATED
        expired = await status_of(pairing)  # its code was shown by a worker that is gone
        assert expired.qr_status == session_pb2.QR_STATUS_EXPIRED
        assert expired.qr_string == shown.session.qr_string
        db = await asyncpg.connect(postgres_url)
        try:
            schemas = {row["nspname"] for row in await db.fetch("SELECT nspname FROM pg_namespace")}
        finally:
            await db.close()
        _, epoch = await lease_of(postgres_url, paired)
        # The credentials live in PostgreSQL, in the schema of the new owner's epoch.
        assert f"wa_device_{moved.id}_e{epoch}" in schemas
        assert f"wa_device_{moved.id}_e{epoch - 1}" not in schemas
    finally:
        for member in running:
            await member.stop()


async def test_a_command_for_a_missing_session_takes_no_lease(
    members: dict[str, Member], postgres_url: str
) -> None:
    for member in members.values():
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await member.sessions.RequestQR(pb.RequestQRRequest(instance_id="nobody_1"))
        assert error_info(missing.value).reason == "SESSION_NOT_FOUND"
    db = await asyncpg.connect(postgres_url)
    try:
        assert await db.fetchval("SELECT count(*) FROM leases WHERE instance_id = 'nobody_1'") == 0
    finally:
        await db.close()


async def test_an_event_stream_on_another_node_follows_the_owner(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    with_http = dataclasses.replace(settings, http_address="127.0.0.1:0")
    first = await join(node_settings(with_http, postgres_url, "n1", tmp_path))
    second = await join(node_settings(with_http, postgres_url, "n2", tmp_path))
    try:
        for member in (first, second):
            node = member.running.cluster.node  # type: ignore[union-attr]
            await eventually(lambda node=node: len(node.live) == 2)  # type: ignore[misc]
        iid = owned_by("n1", "streamed", ("n1", "n2"))
        url = f"http://127.0.0.1:{second.running.http_port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert (
                await http.post(f"{API}/sessions", json={"instance_id": iid})
            ).status_code == 201
            async with events(http, iid) as stream:
                assert (await stream.session())["revision"] == 1
                assert (await http.post(f"{API}/sessions/{iid}/qr")).status_code == 200
                await first.simulator.ScanQR(sim_pb.ScanQRRequest(instance_id=iid))
                seen = [await stream.session() for _ in range(3)]
                assert [(s["revision"], s["status"]) for s in seen] == [
                    (2, "qr_required"),
                    (3, "connecting"),
                    (4, "connected"),
                ]
                assert (await http.delete(f"{API}/sessions/{iid}")).status_code == 204
                end = await stream.next()
                assert end is not None
                assert end.event == "end"
    finally:
        await second.stop()
        await first.stop()


async def test_a_renewal_that_comes_after_the_deadline_reconnects_the_sessions(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    workers = dataclasses.replace(settings, engine="simulated-worker")
    member = await join(node_settings(workers, postgres_url, "n1", tmp_path))
    try:
        await connect(member, "late_1")
        engine = member.running.engine
        assert isinstance(engine, WorkerEngine)
        first_pid = engine.worker_pids()["late_1"]
        _, epoch = await lease_of(postgres_url, "late_1")
        before = (
            await member.sessions.GetSession(pb.GetSessionRequest(instance_id="late_1"))
        ).session
        node = member.running.cluster.node  # type: ignore[union-attr]
        renew = node._renew
        stalled = asyncio.Event()

        async def late(held: dict[str, int]) -> Any:
            if not stalled.is_set():  # one renewal stalls past the deadline (a starved machine)
                stalled.set()
                await asyncio.sleep(node.settings.lease_ttl)
            return await renew(held)

        node._renew = late  # type: ignore[method-assign]
        # On a starved machine the watchdog may not run before the late renewal lands: the
        # renewal itself must notice that the deadline passed (the workers ended meanwhile).
        assert node._watchdog is not None
        node._watchdog.cancel()
        await eventually(lambda: not alive(first_pid), within=10)  # it ended itself (Hold)
        await eventually(
            lambda: engine.worker_pids().get("late_1") not in (None, first_pid), within=15
        )
        watch = member.sessions.WatchSession(pb.WatchSessionRequest(instance_id="late_1"))
        state = await next_state(watch)
        while state.status != CONNECTED or state.revision <= before.revision + 1:
            state = await next_state(watch)  # connecting, then connected again
        watch.cancel()
        _, retaken = await lease_of(postgres_url, "late_1")
        assert retaken > epoch  # given back and taken again, not kept with no worker
    finally:
        await member.stop()


async def test_nodes_forward_with_the_internal_token(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    secured = dataclasses.replace(settings, public_tokens=(b"hub",), internal_tokens=(b"inside",))
    first = await join(node_settings(secured, postgres_url, "n1", tmp_path))
    second = await join(node_settings(secured, postgres_url, "n2", tmp_path))
    try:
        for member in (first, second):
            node = member.running.cluster.node  # type: ignore[union-attr]
            await eventually(lambda node=node: len(node.live) == 2)  # type: ignore[misc]
        iid = owned_by("n1", "secured", ("n1", "n2"))
        hub = (("authorization", "Bearer hub"),)
        created = await second.sessions.CreateSession(
            pb.CreateSessionRequest(instance_id=iid), metadata=hub
        )  # Central Hub's token on n2; n2 forwards to n1 with the internal one
        assert created.session.revision == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the public token cannot do that
            await second.channel.unary_unary(
                "/sessionmanager.v1.NodeService/CreateSession",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda b: b,
            )(node_pb.NodeServiceCreateSessionRequest(), metadata=hub)
        assert error_info(refused.value).reason == "PERMISSION_DENIED"
    finally:
        await second.stop()
        await first.stop()
    with pytest.raises(StartupError, match="SESSION_MANAGER_INTERNAL_TOKEN"):
        await start(
            node_settings(
                dataclasses.replace(settings, public_tokens=(b"hub",)), postgres_url, "n3", tmp_path
            )
        )


async def test_a_lease_the_database_calls_expired_is_taken_only_after_this_nodes_own_wait(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    member = await join(node_settings(settings, postgres_url, "n1", tmp_path))
    try:
        db = await asyncpg.connect(postgres_url)
        try:  # a lease that looks expired for an hour: the database's clock jumped ahead
            await db.execute(
                "INSERT INTO ll_whatsapp_qr_sessions (instance_id, status, qr_status, "
                "created_at, updated_at, revision) VALUES ('stepped_1', 'init', 'none', now(), "
                "now(), 1)"
            )
            await db.execute(
                "INSERT INTO leases (instance_id, owner, epoch, lease_until) "
                "VALUES ('stepped_1', 'elsewhere/1', 1, now() - interval '1 hour')"
            )
        finally:
            await db.close()
        seen = time.monotonic()  # this node cannot have seen it expired before now
        node = member.running.cluster.node  # type: ignore[union-attr]
        await eventually(lambda: "stepped_1" in node.book.epochs, within=10)
        waited = time.monotonic() - seen
        assert waited >= node.settings.lease_ttl + node.settings.lease_grace
        owner, epoch = await lease_of(postgres_url, "stepped_1")
        assert owner == node.owner
        assert epoch == 2
    finally:
        await member.stop()


async def until_lapsed(url: str, instance_id: str, node_id: str, ttl: float) -> None:
    """Wait (10 s at most) until the session's lease has expired and the node's heartbeat
    is older than the TTL, on the database's clock."""
    db = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(10):
            while not await db.fetchval(  # noqa: ASYNC110 - polling the database's clock
                "SELECT (SELECT lease_until < now() FROM leases WHERE instance_id = $1) "
                "AND (SELECT heartbeat_at < now() - make_interval(secs => $3) FROM nodes "
                "WHERE node_id = $2)",
                instance_id,
                node_id,
                ttl,
            ):
                await asyncio.sleep(0.1)
    finally:
        await db.close()


class FailingCommits:
    """A store's ``CommitHealth`` that a test turns on and off."""

    def __init__(self) -> None:
        self.failing = False

    def commits_failing(self) -> bool:
        return self.failing


async def test_a_node_that_cannot_commit_stops_renewing_its_leases(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> None:
    workers = dataclasses.replace(settings, engine="simulated-worker")
    member = await join(node_settings(workers, postgres_url, "n1", tmp_path))
    try:
        await connect(member, "mute_1")
        engine = member.running.engine
        assert isinstance(engine, WorkerEngine)
        worker = engine.worker_pids()["mute_1"]
        node = member.running.cluster.node  # type: ignore[union-attr]
        health = FailingCommits()
        node.commit_health = health
        health.failing = True
        # Its leases run out and the node drops them: the worker ends, the node says so.
        await eventually(lambda: "mute_1" not in node.book.epochs, within=10)
        await eventually(lambda: not alive(worker), within=10)
        assert not node.connected
        # Neither its lease nor its heartbeat is renewed: the other nodes would take its share.
        await until_lapsed(postgres_url, "mute_1", "n1", node.settings.lease_ttl)

        health.failing = False  # it commits again: it renews, and takes the session back
        await eventually(lambda: "mute_1" in node.book.epochs, within=15)
        await eventually(lambda: "mute_1" in engine.worker_pids(), within=15)
        assert node.connected
    finally:
        await member.stop()


async def test_a_nodes_connections_are_probed_by_tcp_keepalives(
    members: dict[str, Member],
) -> None:
    node = members["n1"].running.cluster.node  # type: ignore[union-attr]
    idle = max(1, math.ceil(node.settings.lease_ttl / 4))
    for pool in (node._pool, node._beat):
        assert pool is not None
        async with pool.acquire() as db:
            assert await db.fetchval("SHOW tcp_keepalives_idle") == str(idle)
            assert await db.fetchval("SHOW tcp_keepalives_count") == "3"
            transport = db._con._transport  # type: ignore[union-attr]
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == (idle + 3) * 1000
