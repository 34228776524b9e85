"""Three nodes over one PostgreSQL under mixed load: kill -9, freeze, restart, partition.

Each fault hits the healthy node that owns the most sessions, while load runs
on the others: sessions created, paired through the simulated phone, messages
sent with idempotency keys, networks dropped, sessions disconnected and
deleted, and watchers on a node that survives follow every session. After each
fault, and sampled throughout:

- no session ever has two live workers (tests/census.py, every ~15 ms);
- none is lost: every acknowledged, undeleted session exists; each one paired
  and not disconnected since ends CONNECTED without a new QR, leased by a
  healthy node, with exactly one worker, a child of that node;
- every acknowledged change is present: each acknowledged send is in
  ``messages`` under its key, each create, disconnect and delete is reflected;
- every watcher on a surviving node ends on the stored state, in revision order,
  and no session paired before the fault shows a new QR code;
- a frozen or cut-off owner never keeps its sessions from moving, and what it
  was asked meanwhile changes nothing behind the new owner's back: when it
  comes back, either the database refused its stale writes by their epoch (its
  fencing counter or log line), or every late call was refused by contract (or
  routed to the new owner) with nothing of the refused ones stored — the test
  prints which; a node cut off from PostgreSQL reports itself not serving, and
  serves again once healed;
- no call of the load is refused as unknown, invalid or an unexpected failure;
  a session changing owner is SESSION_MOVING, tried again after its RetryInfo.

An operation whose call failed or timed out is not acknowledged: the session
it touched is "uncertain" and only has to exist and be consistent. Set
``SESSION_MANAGER_CLUSTER_LOGS`` to a folder to keep every node's log of a run
that fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.census import WorkerCensus
from tests.cluster import (
    MOVING_ATTEMPTS,
    ClusterHarness,
    Node,
    reason,
    retry_after,
    wait_until,
)

CALL_TIMEOUT = 3.0
SETTLE = 20.0  # seconds for every session to be back on a healthy node after a fault
FIRST_SESSIONS = 12
PAIRING_AT_ONCE = 3
PAIRING_ATTEMPTS = 3  # QR codes a user asks for before giving up
MAX_SESSIONS = 24
PACE = 0.04  # seconds between two steps of one load worker
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FENCING = "sessionmanager_fencing_rejections_total"
FENCING_LOG = "the database refused a stale write"
# Errors no call of the load may get, whatever the fault: its sessions exist, its input is valid,
# and a session changing owner is SESSION_MOVING (UNAVAILABLE), never an unexpected failure.
NEVER = (
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "ALREADY_EXISTS",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "INTERNAL",
)
PHONE = "+5491100000000"
STORED_STATUS = {
    s.SESSION_STATUS_INIT: "init",
    s.SESSION_STATUS_QR_REQUIRED: "qr_required",
    s.SESSION_STATUS_CONNECTING: "connecting",
    s.SESSION_STATUS_CONNECTED: "connected",
    s.SESSION_STATUS_DISCONNECTED: "disconnected",
    s.SESSION_STATUS_ERROR: "error",
}

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Sent:
    """An acknowledged Send."""

    instance_id: str
    key: str
    message_id: str
    status: int


@dataclass
class Acknowledged:
    """What the cluster acknowledged, and what it may or may not have done."""

    created: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    maybe_deleted: set[str] = field(default_factory=set)  # a delete without an answer
    paired: set[str] = field(default_factory=set)  # connected, not disconnected since
    disconnected: set[str] = field(default_factory=set)
    uncertain: set[str] = field(default_factory=set)
    qr_requests: list[str] = field(default_factory=list)  # each time the load asked for a QR
    sends: dict[str, Sent] = field(default_factory=dict)  # by idempotency key
    unanswered_keys: dict[str, str] = field(default_factory=dict)  # key -> instance id

    def live(self) -> set[str]:
        """Created and not deleted (nor perhaps deleted)."""
        return self.created - self.deleted - self.maybe_deleted

    def connected(self) -> set[str]:
        return self.paired - self.uncertain


def nothing_changed(error: grpc.aio.AioRpcError) -> bool:
    """Whether the contract says the refused call changed nothing."""
    return error.code() == grpc.StatusCode.FAILED_PRECONDITION or reason(error) == "SESSION_MOVING"


class Load:
    """Mixed load on the healthy nodes; records what was acknowledged."""

    def __init__(self, cluster: ClusterHarness, prefix: str, seed: int) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.acked = Acknowledged()
        self.calls = 0
        self.failures = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.said: dict[str, str] = {}  # the last details of each error code
        self._random = random.Random(seed)
        self._names = itertools.count()
        self._keys = itertools.count()

    def node(self) -> Node:
        healthy = self.cluster.healthy()
        assert healthy, "no healthy node to load"
        return self._random.choice(healthy)

    async def attempt(self, method: Callable[[Node], Awaitable[Any]]) -> Any:
        """One call on a healthy node, tried again as SESSION_MOVING's RetryInfo says."""
        for attempt in itertools.count(1):
            self.calls += 1
            node = self.node()
            try:
                return await method(node)
            except grpc.aio.AioRpcError as error:
                self.failed(error, node)
                delay = retry_after(error)
                if delay is None or attempt == MOVING_ATTEMPTS:
                    raise
                await asyncio.sleep(delay)  # the wait the contract asks for
        raise AssertionError("unreachable")

    async def call(self, instance_id: str, method: Callable[[Node], Awaitable[Any]]) -> Any:
        """The answer of ``method``, or None if it failed.

        A refusal that changed nothing by contract (a precondition, SESSION_MOVING)
        leaves the session as it was; any other failure makes it uncertain.
        """
        try:
            return await self.attempt(method)
        except grpc.aio.AioRpcError as error:
            if not nothing_changed(error):
                self.acked.uncertain.add(instance_id)
            return None

    def failed(self, error: grpc.aio.AioRpcError, node: Node | None = None) -> None:
        """Count a failed call, and keep what the last one of its code said (and where)."""
        self.failures += 1
        self.errors[error.code().name] += 1
        where = f" (from {node.name}, {datetime.now(UTC):%H:%M:%S.%f})" if node else ""
        self.said[error.code().name] = f"{error.details()}{where}"

    def still_paired(self, instance_ids: list[str]) -> list[str]:
        """Those of ``instance_ids`` the load has not disconnected since (nor lost track of)."""
        return [iid for iid in instance_ids if iid in self.acked.connected()]

    def assert_no_contract_violation(self) -> None:
        """No call on a session the load created was refused as unknown or invalid."""
        wrong = {code: self.errors[code] for code in NEVER if self.errors[code]}
        assert not wrong, f"calls refused with {wrong}; all failures: {self.said}"

    async def pair_new(self) -> str | None:
        """Create a session, then pair it."""
        iid = f"{self.prefix}{next(self._names)}"
        request = pb.CreateSessionRequest(instance_id=iid)
        if await self.call(iid, lambda n: n.sessions.CreateSession(request, timeout=CALL_TIMEOUT)):
            self.acked.created.add(iid)
            await self.pair(iid)
        return iid

    async def pair(self, iid: str) -> bool | None:
        """Ask for a QR code and have the phone scan it; a code that cannot be scanned any
        more (it went with a pairing that moved: a precondition refusal) is asked for again,
        as a user would. True once acknowledged as connected; None if the first request for a
        code was refused (nothing changed); False otherwise."""
        qr = pb.RequestQRRequest(instance_id=iid)
        scan = sim.ScanQRRequest(instance_id=iid, phone_number=PHONE)
        for attempt in range(PAIRING_ATTEMPTS):
            self.acked.qr_requests.append(iid)
            code = await self.call(iid, lambda n: n.sessions.RequestQR(qr, timeout=CALL_TIMEOUT))
            if code is None:
                return None if attempt == 0 and iid not in self.acked.uncertain else False
            scanned = await self.call(iid, lambda n: n.simulator.ScanQR(scan, timeout=CALL_TIMEOUT))
            if scanned is not None and scanned.session.status == s.SESSION_STATUS_CONNECTED:
                self.acked.paired.add(iid)
                return True
            if scanned is not None or iid in self.acked.uncertain:
                return False
        return False

    async def create_then_delete(self) -> None:
        iid = f"{self.prefix}{next(self._names)}"
        request = pb.CreateSessionRequest(instance_id=iid)
        made = await self.call(
            iid, lambda n: n.sessions.CreateSession(request, timeout=CALL_TIMEOUT)
        )
        if made is None:
            return
        self.acked.created.add(iid)
        gone = pb.DeleteSessionRequest(instance_id=iid)
        if await self.call(iid, lambda n: n.sessions.DeleteSession(gone, timeout=CALL_TIMEOUT)):
            self.acked.deleted.add(iid)
        else:
            self.acked.maybe_deleted.add(iid)

    async def send(self, iid: str, key: str | None = None) -> None:
        """Send with an idempotency key (a new one unless retrying ``key``)."""
        key = key or f"k{next(self._keys)}"
        self.acked.unanswered_keys[key] = iid
        request = pb.SendRequest(instance_id=iid, to=PHONE, text=key, idempotency_key=key)
        try:
            sent = await self.attempt(lambda n: n.sessions.Send(request, timeout=CALL_TIMEOUT))
        except grpc.aio.AioRpcError:
            return  # unanswered (or refused): tried again with the same key
        self.record_send(iid, key, sent)

    def record_send(self, iid: str, key: str, sent: pb.SendResponse) -> None:
        self.acked.unanswered_keys.pop(key, None)
        self.acked.sends[key] = Sent(iid, key, sent.message_id, sent.status)

    async def disconnect(self, iid: str) -> None:
        request = pb.DisconnectRequest(instance_id=iid)
        self.acked.paired.discard(iid)
        if await self.call(iid, lambda n: n.sessions.Disconnect(request, timeout=CALL_TIMEOUT)):
            self.acked.disconnected.add(iid)
        elif iid not in self.acked.uncertain:
            self.acked.paired.add(iid)  # refused: by contract it is still connected

    async def drop_network(self, iid: str) -> None:
        """The phone's network drops; the engine reconnects by itself."""
        request = sim.DropNetworkRequest(instance_id=iid)
        await self.call(iid, lambda n: n.simulator.DropNetwork(request, timeout=CALL_TIMEOUT))

    async def pair_again(self, iid: str) -> None:
        """A disconnected session is paired again."""
        self.acked.disconnected.discard(iid)
        if await self.pair(iid) is None:
            self.acked.disconnected.add(iid)  # refused: by contract it is as it was

    async def step(self, n: int) -> None:
        connected = sorted(self.acked.connected())
        disconnected = sorted(self.acked.disconnected - self.acked.uncertain)
        if n % 4 == 0 and len(self.acked.live()) < MAX_SESSIONS:
            await self.pair_new()
        elif n % 4 == 0 and disconnected:
            await self.pair_again(self._random.choice(disconnected))
        elif n % 17 == 5:
            await self.create_then_delete()
        elif n % 13 == 7 and len(connected) > FIRST_SESSIONS // 2:
            await self.disconnect(self._random.choice(connected))
        elif n % 6 == 3 and connected:
            await self.drop_network(self._random.choice(connected))
        elif connected:
            await self.send(self._random.choice(connected))
        for key, iid in list(self.acked.unanswered_keys.items())[:2]:
            if iid in self.acked.connected():
                await self.send(iid, key)

    async def run(self, stop: asyncio.Event, worker: int, workers: int) -> None:
        for n in itertools.count(worker, workers):
            if stop.is_set():
                return
            await self.step(n)
            # Pacing, not waiting: a steady load that leaves the 2 cores to the nodes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PACE)

    @contextlib.asynccontextmanager
    async def running(self, workers: int = 2) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.run(stop, w, workers)) for w in range(workers)]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    async def answer_every_key(self) -> None:
        """Send again each key without an answer whose session is still connected."""
        for key, iid in list(self.acked.unanswered_keys.items()):
            if iid in self.acked.connected():
                await self.send(iid, key)
            else:
                del self.acked.unanswered_keys[key]


class Watchers:
    """WatchSession streams on one node, one per live session, each keeping its latest state
    and whether it saw a new QR code."""

    def __init__(self, node: Node, acked: Acknowledged) -> None:
        self.node = node
        self.acked = acked
        self.paired_at_start = acked.connected()
        self.qr_requests_before = len(acked.qr_requests)
        self.latest: dict[str, s.WhatsAppSession] = {}
        self.new_qr: set[str] = set()
        self.disorder: list[str] = []
        self.ended: dict[str, str] = {}
        self._tasks = [asyncio.create_task(self._follow(iid)) for iid in sorted(acked.live())]

    def assert_no_new_qr(self, what: str) -> None:
        """No session paired before the fault showed a new QR, unless the load asked for one."""
        asked = set(self.acked.qr_requests[self.qr_requests_before :])
        shown = (self.new_qr & self.paired_at_start) - asked
        assert not shown, f"paired sessions showed a new QR code after {what}: {sorted(shown)}"

    async def _follow(self, iid: str) -> None:
        call = self.node.sessions.WatchSession(pb.WatchSessionRequest(instance_id=iid))
        try:
            async for response in call:
                state, before = response.session, self.latest.get(iid)
                if before is not None and (state.id, state.revision) <= (
                    before.id,
                    before.revision,
                ):
                    self.disorder.append(f"{iid}: {before.revision} then {state.revision}")
                if before is not None and state.qr_status == s.QR_STATUS_GENERATED:
                    self.new_qr.add(iid)
                self.latest[iid] = state
            self.ended[iid] = "the stream ended"
        except grpc.aio.AioRpcError as error:
            self.ended[iid] = f"{error.code().name}: {error.details()}"

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def off_truth(self, stored: dict[str, dict[str, Any]], deleted: set[str]) -> str | None:
        """What a watcher still shows differently from the store, or None."""
        assert not self.disorder, f"watchers on {self.node.name} out of order: {self.disorder}"
        for iid in sorted(set(self.latest) | set(self.ended)):
            row = stored.get(iid)
            if iid in deleted or (row is None and self.ended.get(iid, "").startswith("NOT_FOUND")):
                continue
            if iid in self.ended:
                return f"the watch of {iid} on {self.node.name} ended: {self.ended[iid]}"
            if row is None:
                return f"{iid} is gone from the store and its watcher on {self.node.name} goes on"
            seen = self.latest[iid]
            if (seen.id, seen.revision, STORED_STATUS[seen.status]) != (
                row["id"], row["revision"], row["status"]
            ):  # fmt: skip
                return (
                    f"the watcher of {iid} on {self.node.name} shows revision {seen.revision} "
                    f"({STORED_STATUS[seen.status]}), the store {row['revision']} ({row['status']})"
                )
        return None


@contextlib.asynccontextmanager
async def watching(node: Node, acked: Acknowledged) -> AsyncIterator[Watchers]:
    watchers = Watchers(node, acked)
    try:
        yield watchers
    finally:
        await watchers.close()


async def wrong_placement(
    cluster: ClusterHarness, census: WorkerCensus, acked: Acknowledged
) -> str | None:
    """What is not (yet) as it must be after a fault has settled, or None."""
    stored = await cluster.stored_sessions()
    leases = await cluster.leases()
    workers = census.sample()
    owners = await cluster.live_owners()
    for iid in sorted(acked.live()):
        if iid not in stored:
            return f"{iid} was created and never deleted, and is lost"
    for iid in sorted(acked.deleted & set(stored)):
        return f"{iid} was deleted, and is still stored"
    for iid in sorted(acked.connected() & acked.live()):
        row = stored[iid]
        if (row["status"], row["qr_status"], row["qr_string"]) != ("connected", "none", None):
            return f"{iid} was paired and is {row['status']} / QR {row['qr_status']}"
    for iid in sorted(acked.disconnected - acked.uncertain):
        if stored[iid]["status"] != "disconnected":
            return f"{iid} was disconnected and is {stored[iid]['status']}"
    for iid, row in sorted(stored.items()):
        if row["status"] != "connected":
            continue
        lease = leases.get(iid)
        owner = owners.get(lease.owner or "") if lease is not None else None
        if lease is None or not lease.valid or owner is None:
            return f"{iid} is connected, its lease is {lease} (healthy: {sorted(owners)})"
        running = workers.get(iid, [])
        if [w.parent for w in running] != [owner.pid]:
            parents = [cluster.by_pid().get(w.parent, w.parent) for w in running]
            return f"{iid} is leased by {owner.name} and its live workers are children of {parents}"
    return None


async def settle(
    cluster: ClusterHarness, census: WorkerCensus, load: Load, watchers: Watchers, what: str
) -> None:
    """Wait until the fault is behind (the load stopped): every check of the module docstring."""
    took = await wait_until(
        lambda: wrong_placement(cluster, census, load.acked), SETTLE, f"after {what}"
    )
    await load.answer_every_key()
    await check_messages(cluster, load.acked)
    await wait_until(
        lambda: _watchers_off(cluster, watchers, load.acked), 10, f"watchers after {what}"
    )
    watchers.assert_no_new_qr(what)
    census.assert_never_twice()
    load.assert_no_contract_violation()
    print(
        f"{what}: settled in {took:.1f} s; {load.calls} calls, {load.failures} failed, "
        f"{len(load.acked.uncertain)} sessions uncertain; errors {dict(load.errors)}"
    )


async def _watchers_off(
    cluster: ClusterHarness, watchers: Watchers, acked: Acknowledged
) -> str | None:
    return watchers.off_truth(await cluster.stored_sessions(), acked.deleted)


async def check_messages(cluster: ClusterHarness, acked: Acknowledged) -> None:
    """Each acknowledged send is in ``messages``, under its key and session, with its id."""
    stored = await cluster.stored_messages()
    sessions = {row["id"]: iid for iid, row in (await cluster.stored_sessions()).items()}
    for key, sent in acked.sends.items():
        row = stored.get(sent.message_id)
        assert row is not None, f"the acknowledged send {key} ({sent.message_id}) is not stored"
        assert (row["idempotency_key"], sessions.get(row["session_id"])) == (key, sent.instance_id)
        if sent.status == pb.MESSAGE_STATUS_SENT:
            assert row["status"] == "sent", f"{key} was acknowledged as sent, is {row['status']}"


def other_than(cluster: ClusterHarness, victim: Node) -> Node:
    return next(node for node in cluster.healthy() if node is not victim)


@dataclass
@dataclass
class StaleCalls:
    """Calls sent to a node while it cannot act (frozen or cut off); served when it comes back.

    Each must end either acknowledged (routed to the session's new owner: then it is
    stored like any other acknowledged send) or refused by contract (SESSION_MOVING,
    STORAGE_UNAVAILABLE, a precondition) with nothing of it stored.
    """

    victim: Node
    sends: dict[str, tuple[str, asyncio.Future[pb.SendResponse]]] = field(default_factory=dict)
    drops: list[asyncio.Future[Any]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # the refused sends' keys: reasons

    @classmethod
    def send_to(cls, victim: Node, owned: list[str]) -> StaleCalls:
        calls = cls(victim)
        for iid in owned[:3]:
            key = f"stale-{victim.name}-{iid}"
            send = pb.SendRequest(instance_id=iid, to=PHONE, text=key, idempotency_key=key)
            calls.sends[key] = (iid, asyncio.ensure_future(victim.sessions.Send(send, timeout=30)))
            drop = sim.DropNetworkRequest(instance_id=iid)
            calls.drops.append(
                asyncio.ensure_future(victim.simulator.DropNetwork(drop, timeout=30))
            )
        return calls

    async def collect(self, load: Load) -> None:
        """Record each acknowledged send; check that each refusal is one the contract allows."""
        refusals = list(await asyncio.gather(*self.drops, return_exceptions=True))
        for key, (iid, call) in self.sends.items():
            try:
                load.record_send(iid, key, await call)
            except grpc.aio.AioRpcError as error:
                refusals.append(error)
                self.refused[key] = reason(error) or error.code().name
        for refusal in refusals:
            if isinstance(refusal, grpc.aio.AioRpcError):
                load.failed(refusal, self.victim)
                assert nothing_changed(refusal) or reason(refusal) == "STORAGE_UNAVAILABLE", (
                    f"a late call on {self.victim.name}: {refusal}"
                )
            else:
                assert not isinstance(refusal, BaseException), refusal

    async def fencing(self, cluster: ClusterHarness) -> str:
        """Which way the stale owner's writes were kept out: counted as refused by the
        database's epoch, or every late call refused (or routed again) with nothing of the
        refused ones stored. A line saying which."""
        counted = await cluster.metric(self.victim, FENCING)
        if counted > 0 or FENCING_LOG in self.victim.stderr():
            return f"{self.victim.name}: {counted:g} stale writes refused by the database's epoch"
        rows = {row["idempotency_key"]: row for row in (await cluster.stored_messages()).values()}
        stored = {
            key: (self.refused[key], rows[key]["status"]) for key in self.refused if key in rows
        }
        # A commit whose connection was cut (the partition's heal) may have landed although
        # the node answered STORAGE_UNAVAILABLE (README, PostgreSQL: such a failure leaves it
        # unknown whether the change was stored). Every other refusal stored nothing.
        wrong = {key: why for key, why in stored.items() if why[0] != "STORAGE_UNAVAILABLE"}
        assert not wrong, f"refused late sends of {self.victim.name} are stored: {wrong}"
        return (
            f"{self.victim.name}: no write reached the database with a stale epoch; "
            f"{len(self.refused)} of {len(self.sends)} late sends refused; stored after a cut "
            f"connection (reason, status): {stored or 'none'}"
        )


async def health(node: Node) -> int:
    probe = health_pb2_grpc.HealthStub(node.channel)
    answer = await probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    return int(answer.status)


async def owned_by(cluster: ClusterHarness, node: Node, acked: Acknowledged) -> list[str]:
    """The sessions ``node`` owns that the load paired and did not disconnect since."""
    return [iid for iid in await cluster.owned_by(node) if iid in acked.connected()]


async def test_three_nodes_survive_kill_freeze_restart_and_partition(postgres_url: str) -> None:
    prefix = f"chaos_{uuid.uuid4().hex[:6]}_"
    census = WorkerCensus(prefix)
    async with ClusterHarness(postgres_url) as cluster:
        census.start()
        try:
            load = Load(cluster, prefix, seed=14)
            for _ in range(FIRST_SESSIONS // PAIRING_AT_ONCE):  # as users scan, a few at a time
                await asyncio.gather(*(load.pair_new() for _ in range(PAIRING_AT_ONCE)))
            assert len(load.acked.connected()) == FIRST_SESSIONS, load.said
            await kill9_under_load(cluster, census, load)
            await freeze_under_load(cluster, census, load)
            await restart_under_load(cluster, census, load)
            await partition_under_load(cluster, census, load)
        finally:
            census.stop()
        census.assert_never_twice()
        load.assert_no_contract_violation()
        assert load.acked.sends, "no send was acknowledged"
        assert census.samples > 100, census.samples


async def kill9_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """kill -9: the node and its workers die at once; its sessions move; it comes back."""
    victim = await cluster.busiest()
    owned = await owned_by(cluster, victim, load.acked)
    assert owned, f"{victim.name} owns nothing to move"
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            since = datetime.now(UTC)
            await cluster.kill9(victim)
            await wait_until(
                lambda: cluster.not_moved(victim, load.still_paired(owned), since),
                SETTLE,
                "kill -9",
            )
        await settle(cluster, census, load, watchers, f"kill -9 of {victim.name}")
    await cluster.launch(victim)


async def freeze_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """SIGSTOP past the lease: its workers end by themselves, others take over; after
    SIGCONT the calls it was sent meanwhile change nothing behind the new owner's back."""
    victim = await cluster.busiest()
    owned = await owned_by(cluster, victim, load.acked)
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            since = datetime.now(UTC)
            cluster.sigstop(victim)
            stale = StaleCalls.send_to(victim, owned)
            await wait_until(
                lambda: cluster.not_moved(victim, load.still_paired(owned), since),
                SETTLE,
                "SIGSTOP",
            )
            cluster.sigcont(victim)
            await stale.collect(load)
            print(await stale.fencing(cluster))
        await settle(cluster, census, load, watchers, f"SIGSTOP of {victim.name}")


async def restart_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """A graceful restart: the node hands its sessions over, then takes its share back."""
    victim = await cluster.busiest()
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            await cluster.restart(victim)
        await settle(cluster, census, load, watchers, f"restart of {victim.name}")


async def partition_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """Cut from PostgreSQL: the node stops its workers in time and reports not serving;
    healed, it serves again and the calls it was sent meanwhile change nothing."""
    victim = await cluster.busiest()
    owned = await owned_by(cluster, victim, load.acked)
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            since = datetime.now(UTC)
            cluster.partition(victim)
            stale = StaleCalls.send_to(victim, owned)
            await wait_until(
                lambda: cluster.not_moved(victim, load.still_paired(owned), since),
                SETTLE,
                "partition",
            )
            await wait_until(lambda: _health(victim, NOT_SERVING), 10, "the cut-off node's health")
            cluster.heal(victim)
            await stale.collect(load)
            print(await stale.fencing(cluster))
            await wait_until(lambda: _health(victim, SERVING), 10, "the healed node's health")
        await settle(cluster, census, load, watchers, f"partition of {victim.name}")


async def _health(node: Node, expected: int) -> str | None:
    status = await health(node)
    return None if status == expected else f"{node.name}'s health is {status}, not {expected}"
