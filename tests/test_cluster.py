"""Three nodes over one PostgreSQL under mixed load, and the faults a deployment meets.

Each fault hits one node (the healthy one that owns the most sessions) or the
database itself, while load runs on the healthy nodes: sessions created,
paired through the simulated phone, messages sent with idempotency keys,
networks dropped, sessions disconnected and deleted, and watchers on a node
that survives follow every session. The faults, in turn: kill -9, SIGSTOP
past the lease, a graceful restart, a partition from PostgreSQL (healed by
closing the connections), a blackhole (the node's connections hang for good
with both ends open; new ones go through after a while), a restart of
PostgreSQL, and PostgreSQL ending one node's writer connection again and again
(commits in doubt). After each fault, and sampled throughout:

- no session ever has two live workers (tests/census.py, every ~15 ms), and
  no credential schema ``wa_device_<id>`` ever has two writers at once;
- none is lost: every acknowledged, undeleted session exists; each one paired
  and not disconnected since ends CONNECTED without a new QR, leased by a
  healthy node, with exactly one worker, a child of that node;
- no session is wedged: every live session accepts a change (a Send when
  connected, a QR code when new, a Disconnect otherwise), and GetSession says
  what is stored;
- every outcome is explained, and nothing else is accepted. Each call ends
  acknowledged, or refused in a way the contract defines: changed nothing
  (FAILED_PRECONDITION; SESSION_MOVING, tried again after its RetryInfo;
  STORAGE_UNAVAILABLE with ``commit: none``), or in doubt
  (STORAGE_UNAVAILABLE with ``commit: unknown``; no answer at all, only while a
  node stalls or from a node killed or stopped with the call in flight).
  Every Send is checked against its row in ``messages``, read by its key,
  which is unique to the fault (phase) it was sent in: an acknowledged send
  is stored ``sent`` under its id and stays so; a refusal that changed
  nothing stored nothing; a send in doubt is absent or ``failed`` with
  ``NOT_SENT``, unless WhatsApp may have received it (then its answer said
  MESSAGE_OUTCOME_UNKNOWN with its id);
- every acknowledged create, disconnect and delete is reflected;
- every watcher on a surviving node ends on the stored state, in revision order,
  and no session paired before the fault shows a new QR code (after the restart
  of PostgreSQL, which ends every node's change feed, watchers opened once the
  nodes serve again);
- a frozen or cut-off owner never keeps its sessions from moving, reports
  itself not serving while cut off, and serves again once it can commit; the
  calls it was sent meanwhile are all answered soon after it comes back, each
  explained as above;
- every graceful stop ends within its bound (tests/cluster.py, STOP_BOUND),
  the restart's and the final one of every node.

Set ``SESSION_MANAGER_CLUSTER_LOGS`` to a folder to keep every node's log of a
run that fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import random
import time
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
from tests.census import CredentialCensus, WorkerCensus
from tests.cluster import (
    MOVING_ATTEMPTS,
    ClusterHarness,
    Node,
    metadata,
    reason,
    retry_after,
    wait_until,
)
from tests.postgres import Cluster

CALL_TIMEOUT = 3.0
#: A RequestQR starts a worker process (a Python interpreter and its imports): seconds on
#: a loaded 2-core machine, where three nodes, their workers and PostgreSQL share it.
QR_TIMEOUT = 10.0
SETTLE = 20.0  # seconds for every session to be back on a healthy node after a fault
FIRST_SESSIONS = 12
PAIRING_AT_ONCE = 3
PAIRING_ATTEMPTS = 3  # QR codes a user asks for before giving up
MAX_SESSIONS = 24
PACE = 0.04  # seconds between two steps of one load worker
#: The deadline of a call sent to a node while it cannot act: longer than any fault lasts.
STALE_TIMEOUT = 90.0
#: How soon after the node comes back each such call must be answered.
STALE_ANSWER = 15.0
# Seconds before a blackholed node's new connections go through: longer than its sessions
# take to move (the lease's TTL, its grace, and the taker's own wait of TTL + grace).
BLACKHOLE = 20.0
RECOVERY = 25.0  # seconds for a node to serve again once it can reach the database
TERMINATIONS = 6.0  # seconds during which the victim's busy writer backend is ended, again
TERMINATION_PACE = 0.005  # seconds between two looks at whether it is busy
TERMINATION_REST = 0.2  # seconds after ending one before looking again
MIN_TERMINATIONS = 3
CHANGE_WITHIN = 15.0  # seconds a session has to accept a change after a fault settled
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FENCING = "sessionmanager_fencing_rejections_total"
FENCING_LOG = "the database refused a stale write"
#: What a node says of a forwarded call whose owner died or stopped with it in flight.
FORWARD_IN_DOUBT = "the command may or may not have been carried out"
PHONE = "+5491100000000"
STORED_STATUS = {
    s.SESSION_STATUS_INIT: "init",
    s.SESSION_STATUS_QR_REQUIRED: "qr_required",
    s.SESSION_STATUS_CONNECTING: "connecting",
    s.SESSION_STATUS_CONNECTED: "connected",
    s.SESSION_STATUS_DISCONNECTED: "disconnected",
    s.SESSION_STATUS_ERROR: "error",
}

pytestmark = pytest.mark.timeout(240)

# What a call ended as (``Outcome.kind``).
OK = "acknowledged"
REFUSED = "refused, nothing changed"  # FAILED_PRECONDITION, SESSION_MOVING
NOT_STORED = "storage unavailable, commit none"
IN_DOUBT = "storage unavailable, commit unknown"
NO_ANSWER = "no answer"  # the client's deadline, or a forwarded call cut by its owner's end
OUTCOME_UNKNOWN = "message outcome unknown"
NOT_ACCEPTED = "WhatsApp did not accept it"
#: Kinds after which the call changed nothing.
UNCHANGED = (REFUSED, NOT_STORED)


@dataclass(frozen=True)
class Phase:
    """The fault under way: its name (in every idempotency key sent during it), whether a
    node stalls (so a call may get no answer), and the addresses of nodes killed or stopped
    (a call forwarded to one of them may have been cut in flight)."""

    name: str
    stalls: bool = False
    ended: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Outcome:
    """How one call ended."""

    kind: str
    phase: str
    message_id: str = ""
    said: str = ""
    code: str = ""  # the gRPC status code's name, for a failed call


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
    #: Every Send tried, by idempotency key: its session and how each try ended.
    tries: dict[str, tuple[str, list[Outcome]]] = field(default_factory=dict)
    unanswered_keys: dict[str, str] = field(default_factory=dict)  # key -> instance id

    def live(self) -> set[str]:
        """Created and not deleted (nor perhaps deleted)."""
        return self.created - self.deleted - self.maybe_deleted

    def connected(self) -> set[str]:
        return self.paired - self.uncertain


def explain_send(tries: list[Outcome], row: dict[str, Any] | None) -> str | None:
    """Why the stored row of one idempotency key cannot follow from how its tries ended, or
    None when it can. A row still ``pending`` is not settled yet: said so, to be waited on."""
    stored = "absent" if row is None else f"{row['status']} ({row['error_code']})"
    said = "; ".join(f"{o.kind} [{o.phase}] {o.said}".strip() for o in tries)
    acknowledged = {o.message_id for o in tries if o.kind == OK}
    if acknowledged:
        if row is None or {row["id"]} != acknowledged or row["status"] != "sent":
            return f"acknowledged as {sorted(acknowledged)}, stored {stored}: {said}"
        return None
    if row is None:
        if all(o.kind in (REFUSED, NOT_STORED, IN_DOUBT, NO_ANSWER) for o in tries):
            return None
        return f"answered with a message id, yet not stored: {said}"
    if row["status"] == "pending":
        return f"still pending: {said}"
    for o in tries:
        if o.kind == NO_ANSWER:
            return None  # the call may have done anything a call does
        if o.kind == IN_DOUBT and (row["status"], row["error_code"]) == ("failed", "NOT_SENT"):
            return None
        if o.kind == OUTCOME_UNKNOWN and o.message_id == row["id"]:
            return None  # unknown, or forward from it: sent or failed
        if o.kind == NOT_ACCEPTED and o.message_id == row["id"] and row["status"] == "failed":
            return None
    return f"stored {stored} ({row['id']}), which no try explains: {said}"


class Load:
    """Mixed load on the healthy nodes; records what was acknowledged, and how each call
    ended."""

    def __init__(self, cluster: ClusterHarness, prefix: str, seed: int) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.acked = Acknowledged()
        self.phase = Phase("pairing")
        self.calls = 0
        self.failures = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.kinds_before: collections.Counter[str] = collections.Counter()
        self.calls_before = 0
        self.said: dict[str, str] = {}  # the last details of each error code
        #: Outcomes the contract does not explain: each one fails the test.
        self.unexplained: list[str] = []
        self._random = random.Random(seed)
        self._names = itertools.count()
        self._keys = itertools.count()

    def begin(self, phase: Phase) -> None:
        """A fault begins: what follows is counted, and keyed, as its."""
        self.phase = phase
        self.kinds_before = collections.Counter(self.kinds)
        self.calls_before = self.calls

    def node(self) -> Node:
        healthy = self.cluster.healthy()
        assert healthy, "no healthy node to load"
        return self._random.choice(healthy)

    def classify(self, error: grpc.aio.AioRpcError, node: Node | None, what: str) -> Outcome:
        """How a failed call ended; one the contract does not explain is recorded as such."""
        why, data = reason(error), metadata(error)
        details = error.details() or ""
        where = f"{what} on {node.name if node else '?'} at {datetime.now(UTC):%H:%M:%S.%f}"
        said = f"{error.code().name} {why}: {details} ({where})"
        kind: str | None = None
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION or why == "SESSION_MOVING":
            kind = REFUSED
        elif why == "STORAGE_UNAVAILABLE":
            kind = {"none": NOT_STORED, "unknown": IN_DOUBT}.get(data.get("commit", ""))
            if kind is None:
                self.unexplained.append(f"STORAGE_UNAVAILABLE without commit none|unknown: {said}")
                kind = IN_DOUBT
        elif why == "MESSAGE_OUTCOME_UNKNOWN":
            kind = OUTCOME_UNKNOWN
        elif why == "WHATSAPP_ERROR":
            kind = NOT_ACCEPTED
        elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            kind = NO_ANSWER
            if not self.phase.stalls:
                self.unexplained.append(f"no answer while no node stalls: {said}")
        elif FORWARD_IN_DOUBT in details and any(a in details for a in self.phase.ended):
            kind = NO_ANSWER  # forwarded to a node killed or stopped in this phase
        else:
            self.unexplained.append(said)
            kind = NO_ANSWER
        self.kinds[kind] += 1
        return Outcome(kind, self.phase.name, data.get("message_id", ""), said, error.code().name)

    async def attempt(self, what: str, method: Callable[[Node], Awaitable[Any]]) -> Any:
        """One call on a healthy node, tried again as SESSION_MOVING's RetryInfo says;
        raises ``Failed`` with how the last try ended."""
        for attempt in itertools.count(1):
            self.calls += 1
            node = self.node()
            try:
                return await method(node)
            except grpc.aio.AioRpcError as error:
                self.failed(error, node)
                delay = retry_after(error)
                if delay is None or attempt == MOVING_ATTEMPTS:
                    raise Failed(self.classify(error, node, what)) from None
                await asyncio.sleep(delay)  # the wait the contract asks for
        raise AssertionError("unreachable")

    async def call(
        self, instance_id: str, what: str, method: Callable[[Node], Awaitable[Any]]
    ) -> Any:
        """The answer of ``method``, or None if it failed.

        A refusal that changed nothing by contract leaves the session as it was;
        any other failure makes it uncertain.
        """
        try:
            return await self.attempt(what, method)
        except Failed as failed:
            if failed.outcome.kind not in UNCHANGED:
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

    def assert_all_explained(self) -> None:
        assert not self.unexplained, (
            f"{len(self.unexplained)} outcomes the contract does not explain; first: "
            + " | ".join(self.unexplained[:5])
        )

    async def pair_new(self) -> str | None:
        """Create a session, then pair it."""
        iid = f"{self.prefix}{next(self._names)}"
        request = pb.CreateSessionRequest(instance_id=iid)
        created = await self.call(
            iid, "CreateSession", lambda n: n.sessions.CreateSession(request, timeout=CALL_TIMEOUT)
        )
        if created:
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
            code = await self.call(
                iid, "RequestQR", lambda n: n.sessions.RequestQR(qr, timeout=QR_TIMEOUT)
            )
            if code is None:
                return None if attempt == 0 and iid not in self.acked.uncertain else False
            try:
                scanned = await self.attempt(
                    "ScanQR", lambda n: n.simulator.ScanQR(scan, timeout=CALL_TIMEOUT)
                )
            except Failed as failed:
                if failed.outcome.code == "FAILED_PRECONDITION":
                    continue  # the code could not be scanned (it went with its pairing)
                # The phone scanned: whatever the simulator says of the session afterwards
                # (SESSION_MOVING when it was handed over mid-handshake), the scan may have
                # landed, so the session is not known to be as it was.
                self.acked.uncertain.add(iid)
                return False
            if scanned.session.status == s.SESSION_STATUS_CONNECTED:
                self.acked.paired.add(iid)
                return True
            return False
        return False

    async def create_then_delete(self) -> None:
        iid = f"{self.prefix}{next(self._names)}"
        request = pb.CreateSessionRequest(instance_id=iid)
        made = await self.call(
            iid, "CreateSession", lambda n: n.sessions.CreateSession(request, timeout=CALL_TIMEOUT)
        )
        if made is None:
            return
        self.acked.created.add(iid)
        gone = pb.DeleteSessionRequest(instance_id=iid)
        deleted = await self.call(
            iid, "DeleteSession", lambda n: n.sessions.DeleteSession(gone, timeout=CALL_TIMEOUT)
        )
        if deleted:
            self.acked.deleted.add(iid)
        else:
            self.acked.maybe_deleted.add(iid)

    def new_key(self, what: str = "k") -> str:
        """An idempotency key used in this phase only."""
        return f"{self.phase.name}-{what}{next(self._keys)}"

    async def send(self, iid: str, key: str | None = None) -> bool:
        """Send with an idempotency key (a new one unless retrying ``key``); whether it was
        acknowledged."""
        key = key or self.new_key()
        self.acked.unanswered_keys[key] = iid
        request = pb.SendRequest(instance_id=iid, to=PHONE, text=key, idempotency_key=key)
        try:
            sent = await self.attempt(
                "Send", lambda n: n.sessions.Send(request, timeout=CALL_TIMEOUT)
            )
        except Failed as failed:
            self.tried(iid, key, failed.outcome)
            if failed.outcome.kind in (OUTCOME_UNKNOWN, NOT_ACCEPTED):
                self.acked.unanswered_keys.pop(key, None)  # answered for good: not tried again
            return False  # otherwise unanswered: tried again with the same key
        self.record_send(iid, key, sent)
        return True

    def tried(self, iid: str, key: str, outcome: Outcome) -> None:
        self.acked.tries.setdefault(key, (iid, []))[1].append(outcome)

    def record_send(self, iid: str, key: str, sent: pb.SendResponse) -> None:
        self.acked.unanswered_keys.pop(key, None)
        self.acked.sends[key] = Sent(iid, key, sent.message_id, sent.status)
        self.tried(iid, key, Outcome(OK, self.phase.name, sent.message_id))

    async def disconnect(self, iid: str) -> None:
        request = pb.DisconnectRequest(instance_id=iid)
        self.acked.paired.discard(iid)
        if await self.call(
            iid, "Disconnect", lambda n: n.sessions.Disconnect(request, timeout=CALL_TIMEOUT)
        ):
            self.acked.disconnected.add(iid)
        elif iid not in self.acked.uncertain:
            self.acked.paired.add(iid)  # refused: by contract it is still connected

    async def drop_network(self, iid: str) -> None:
        """The phone's network drops; the engine reconnects by itself."""
        request = sim.DropNetworkRequest(instance_id=iid)
        await self.call(
            iid, "DropNetwork", lambda n: n.simulator.DropNetwork(request, timeout=CALL_TIMEOUT)
        )

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


class Failed(Exception):
    """A call failed; how it ended."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.said)
        self.outcome = outcome


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
    await wait_until(lambda: unexplained_sends(cluster, load.acked), SETTLE, f"sends of {what}")
    await wait_until(
        lambda: _watchers_off(cluster, watchers, load.acked), 10, f"watchers after {what}"
    )
    watchers.assert_no_new_qr(what)
    changed = await every_session_accepts_a_change(cluster, load)
    census.assert_never_twice()
    load.assert_all_explained()
    print(
        f"{what}: settled in {took:.1f} s; {load.calls - load.calls_before} calls, failures "
        f"{dict(load.kinds - load.kinds_before)}; {changed}"
    )


async def _watchers_off(
    cluster: ClusterHarness, watchers: Watchers, acked: Acknowledged
) -> str | None:
    return watchers.off_truth(await cluster.stored_sessions(), acked.deleted)


async def unexplained_sends(cluster: ClusterHarness, acked: Acknowledged) -> str | None:
    """The first Send whose stored row its tries do not explain (or that is not settled yet),
    read by its key, which is unique to its phase, and its session's current incarnation."""
    sessions = await cluster.stored_sessions()
    rows = {
        (row["session_id"], row["idempotency_key"]): row
        for row in (await cluster.stored_messages()).values()
    }
    for key, (iid, tries) in sorted(acked.tries.items()):
        session = sessions.get(iid)
        if session is None:
            assert iid not in acked.live(), f"{iid} is lost"
            continue  # deleted: its messages went with it
        wrong = explain_send(tries, rows.get((session["id"], key)))
        if wrong is not None:
            return f"{iid}, key {key}: {wrong}"
    return None


async def every_session_accepts_a_change(cluster: ClusterHarness, load: Load) -> str:
    """No session is wedged: each live one accepts a change as its stored status allows (a
    Send when connected, a QR code when new, a Disconnect otherwise), on a healthy node, and
    GetSession then says what is stored. What was done, counted."""
    done: collections.Counter[str] = collections.Counter()
    stored = await cluster.stored_sessions()
    # Every session of the load that is stored and not deleted: those whose creation was
    # in doubt too.
    for iid in sorted(
        i for i in stored if i.startswith(load.prefix) and i not in load.acked.deleted
    ):
        status = stored[iid]["status"]
        started = time.monotonic()
        while True:
            try:
                await _change(load, iid, status)
                break
            except Failed as failed:
                kind = failed.outcome.kind
                late = time.monotonic() - started > CHANGE_WITHIN
                if kind not in (REFUSED, NOT_STORED, IN_DOUBT) or late:
                    raise AssertionError(
                        f"{iid} ({status}, revision {stored[iid]['revision']}) is wedged: "
                        f"{failed.outcome.said}"
                    ) from None
            stored = await cluster.stored_sessions()
            status = stored[iid]["status"]
        done[status] += 1
        await wait_until(
            functools.partial(_shows_stored, cluster, load, iid), 10, f"GetSession {iid}"
        )
    return "changed, by status before: " + ", ".join(f"{n} {st}" for st, n in sorted(done.items()))


async def _change(load: Load, iid: str, status: str) -> None:
    """One change of ``iid``; the load's record follows what was acknowledged."""
    if status == "connected":
        key = load.new_key(f"change-{iid}-")
        request = pb.SendRequest(instance_id=iid, to=PHONE, text=key, idempotency_key=key)
        load.acked.unanswered_keys[key] = iid
        try:
            sent = await load.attempt(
                "Send", lambda n: n.sessions.Send(request, timeout=CALL_TIMEOUT)
            )
        except Failed as failed:
            load.tried(iid, key, failed.outcome)
            load.acked.unanswered_keys.pop(key, None)
            raise
        load.record_send(iid, key, sent)
        load.acked.uncertain.discard(iid)
        load.acked.paired.add(iid)
        load.acked.disconnected.discard(iid)
    elif status == "init":
        qr = pb.RequestQRRequest(instance_id=iid)
        load.acked.qr_requests.append(iid)
        await load.attempt("RequestQR", lambda n: n.sessions.RequestQR(qr, timeout=QR_TIMEOUT))
    else:
        unlink = pb.DisconnectRequest(instance_id=iid)
        await load.attempt(
            "Disconnect", lambda n: n.sessions.Disconnect(unlink, timeout=CALL_TIMEOUT)
        )
        load.acked.uncertain.discard(iid)
        load.acked.paired.discard(iid)
        load.acked.disconnected.add(iid)


async def _shows_stored(cluster: ClusterHarness, load: Load, iid: str) -> str | None:
    row = (await cluster.stored_sessions())[iid]
    node = load.node()
    shown = (
        await node.sessions.GetSession(pb.GetSessionRequest(instance_id=iid), timeout=CALL_TIMEOUT)
    ).session
    if (shown.revision, STORED_STATUS[shown.status]) == (row["revision"], row["status"]):
        return None
    return (
        f"GetSession({iid}) on {node.name} says revision {shown.revision} "
        f"{STORED_STATUS[shown.status]}, the store {row['revision']} {row['status']}"
    )


def other_than(cluster: ClusterHarness, victim: Node) -> Node:
    return next(node for node in cluster.healthy() if node is not victim)


@dataclass
class StaleCalls:
    """Calls sent to a node while it cannot act (frozen or cut off); served when it comes back.

    Each must be answered within ``STALE_ANSWER`` of the node's return, and end in a
    way the contract explains (``Load.classify``); each Send is then checked against its
    row like any other (its key names the phase, the victim and the session).
    """

    victim: Node
    sends: dict[str, tuple[str, asyncio.Future[pb.SendResponse]]] = field(default_factory=dict)
    drops: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    ends: collections.Counter[str] = field(default_factory=collections.Counter)

    @classmethod
    def send_to(cls, victim: Node, owned: list[str], phase: str) -> StaleCalls:
        calls = cls(victim)
        for iid in owned[:3]:
            key = f"stale-{phase}-{victim.name}-{iid}"
            send = pb.SendRequest(instance_id=iid, to=PHONE, text=key, idempotency_key=key)
            calls.sends[key] = (
                iid,
                asyncio.ensure_future(victim.sessions.Send(send, timeout=STALE_TIMEOUT)),
            )
            drop = sim.DropNetworkRequest(instance_id=iid)
            calls.drops[iid] = asyncio.ensure_future(
                victim.simulator.DropNetwork(drop, timeout=STALE_TIMEOUT)
            )
        return calls

    async def collect(self, load: Load) -> str:
        """Wait (bounded) for every answer, record each; a line saying how they ended."""
        pending = [*self.drops.values(), *(call for _, call in self.sends.values())]
        assert pending, f"no calls were sent to {self.victim.name}: it owned no paired session"
        _, late = await asyncio.wait(pending, timeout=STALE_ANSWER)
        if late:
            for call in late:
                call.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            raise AssertionError(
                f"{len(late)} of {len(pending)} calls sent to {self.victim.name} while it could "
                f"not act were still unanswered {STALE_ANSWER:g} s after it came back"
            )
        for iid, drop in self.drops.items():
            error = drop.exception()
            if isinstance(error, grpc.aio.AioRpcError):
                load.failed(error, self.victim)
                self.ends[load.classify(error, self.victim, f"late DropNetwork({iid})").kind] += 1
            else:
                assert error is None, error
                self.ends[OK] += 1
        for key, (iid, call) in self.sends.items():
            error = call.exception()
            if isinstance(error, grpc.aio.AioRpcError):
                load.failed(error, self.victim)
                outcome = load.classify(error, self.victim, f"late Send({iid})")
                load.tried(iid, key, outcome)
                self.ends[outcome.kind] += 1
            else:
                assert error is None, error
                load.record_send(iid, key, call.result())
                self.ends[OK] += 1
        return f"late calls to {self.victim.name}: {dict(self.ends)}"

    async def fencing(self, cluster: ClusterHarness) -> str:
        """Whether the database refused any of the stale owner's writes by their epoch."""
        counted = await cluster.metric(self.victim, FENCING)
        logged = FENCING_LOG in self.victim.stderr()
        return (
            f"{self.victim.name}: {counted:g} stale writes refused by the epoch (logged: {logged})"
        )


async def health(node: Node) -> int:
    probe = health_pb2_grpc.HealthStub(node.channel)
    answer = await probe.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    return int(answer.status)


async def _health(node: Node, expected: int) -> str | None:
    status = await health(node)
    return None if status == expected else f"{node.name}'s health is {status}, not {expected}"


async def _all_serving(cluster: ClusterHarness) -> str | None:
    for node in cluster.nodes:
        if node.running:
            wrong = await _health(node, SERVING)
            if wrong is not None:
                return wrong
    return None


async def owned_by(cluster: ClusterHarness, node: Node, acked: Acknowledged) -> list[str]:
    """The sessions ``node`` owns that the load paired and did not disconnect since."""
    return [iid for iid in await cluster.owned_by(node) if iid in acked.connected()]


async def busiest_owner(cluster: ClusterHarness, acked: Acknowledged) -> tuple[Node, list[str]]:
    """The healthy node owning the most sessions the load paired, and those sessions (a
    session handed back after a restart may take a moment to be owned again)."""
    best: list[tuple[Node, list[str]]] = []

    async def someone_owns() -> str | None:
        owners = [(node, await owned_by(cluster, node, acked)) for node in cluster.healthy()]
        best[:] = [max(owners, key=lambda pair: len(pair[1]))]
        return None if best[0][1] else "no healthy node owns a paired session"

    await wait_until(someone_owns, SETTLE, "a victim")
    return best[0]


async def test_three_nodes_survive_kill_freeze_restart_partition_and_database_faults(
    postgres_cluster: Cluster, postgres_url: str
) -> None:
    prefix = f"chaos_{uuid.uuid4().hex[:6]}_"
    census = WorkerCensus(prefix)
    writers = CredentialCensus(postgres_url)
    async with ClusterHarness(postgres_url, postgres=postgres_cluster) as cluster:
        census.start()
        writers.start()
        started = time.monotonic()
        try:
            load = Load(cluster, prefix, seed=14)
            # As users scan, a few at a time, while the nodes share the sessions out; a session
            # handed over mid-handshake may end unpaired: another one is paired instead.
            for _ in range(2 * FIRST_SESSIONS // PAIRING_AT_ONCE):
                if len(load.acked.connected()) >= FIRST_SESSIONS:
                    break
                await asyncio.gather(*(load.pair_new() for _ in range(PAIRING_AT_ONCE)))
            assert len(load.acked.connected()) >= FIRST_SESSIONS, load.said
            await kill9_under_load(cluster, census, load)
            await freeze_under_load(cluster, census, load)
            await restart_under_load(cluster, census, load)
            await partition_under_load(cluster, census, load)
            await blackhole_under_load(cluster, census, load)
            await postgres_restart_under_load(cluster, census, load)
            await writer_terminated_under_load(cluster, census, load)
            await cluster.stop_all()  # each within its bound
        finally:
            census.stop()
            writers.stop()
        census.assert_never_twice()
        writers.assert_never_two_writers()
        load.assert_all_explained()
        assert load.acked.sends, "no send was acknowledged"
        assert census.samples > 100, census.samples
        assert writers.samples > 100, writers.samples
        stops = ", ".join(f"{name} {took:.1f} s" for name, took in cluster.stops)
        print(
            f"{time.monotonic() - started:.0f} s; worker census {census.samples} samples; "
            f"credential census {writers.samples} samples, {writers.writes_seen} with a writer; "
            f"graceful stops: {stops}"
        )


async def kill9_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """kill -9: the node and its workers die at once; its sessions move; it comes back."""
    victim, owned = await busiest_owner(cluster, load.acked)
    assert owned, f"{victim.name} owns nothing to move"
    load.begin(Phase("kill9", ended=frozenset({victim.address})))
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
    SIGCONT the calls it was sent meanwhile are answered, each as the contract explains."""
    victim, owned = await busiest_owner(cluster, load.acked)
    load.begin(Phase("freeze", stalls=True))
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            since = datetime.now(UTC)
            cluster.sigstop(victim)
            stale = StaleCalls.send_to(victim, owned, load.phase.name)
            await wait_until(
                lambda: cluster.not_moved(victim, load.still_paired(owned), since),
                SETTLE,
                "SIGSTOP",
            )
            cluster.sigcont(victim)
            print(await stale.collect(load))
            print(await stale.fencing(cluster))
        await settle(cluster, census, load, watchers, f"SIGSTOP of {victim.name}")


async def restart_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """A graceful restart: the node hands its sessions over, then takes its share back."""
    victim = await cluster.busiest()
    load.begin(Phase("restart", ended=frozenset({victim.address})))
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            await cluster.restart(victim)
        await settle(cluster, census, load, watchers, f"restart of {victim.name}")


async def partition_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """Cut from PostgreSQL: the node stops its workers in time and reports not serving;
    healed, it serves again and the calls it was sent meanwhile are explained."""
    victim, owned = await busiest_owner(cluster, load.acked)
    load.begin(Phase("partition", stalls=True))
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            since = datetime.now(UTC)
            cluster.partition(victim)
            stale = StaleCalls.send_to(victim, owned, load.phase.name)
            await wait_until(
                lambda: cluster.not_moved(victim, load.still_paired(owned), since),
                SETTLE,
                "partition",
            )
            await wait_until(lambda: _health(victim, NOT_SERVING), 10, "the cut-off node's health")
            cluster.heal(victim)
            print(await stale.collect(load))
            print(await stale.fencing(cluster))
            await wait_until(lambda: _health(victim, SERVING), RECOVERY, "the healed node's health")
        await settle(cluster, census, load, watchers, f"partition of {victim.name}")


async def blackhole_under_load(cluster: ClusterHarness, census: WorkerCensus, load: Load) -> None:
    """A blackhole: the node's connections hang for good with both ends open (PostgreSQL keeps
    their backends, and the writer's lock); new connections go through ``BLACKHOLE`` seconds
    later. Its sessions move; within ``RECOVERY`` of the route's return it serves again."""
    victim, owned = await busiest_owner(cluster, load.acked)
    load.begin(Phase("blackhole", stalls=True))
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            since = datetime.now(UTC)
            cluster.blackhole(victim, BLACKHOLE)
            reopens = time.monotonic() + BLACKHOLE
            stale = StaleCalls.send_to(victim, owned, load.phase.name)
            await wait_until(
                lambda: cluster.not_moved(victim, load.still_paired(owned), since),
                SETTLE,
                "blackhole",
            )
            if time.monotonic() < reopens - 1:
                await wait_until(
                    lambda: _health(victim, NOT_SERVING), reopens - time.monotonic(), "health"
                )
            await asyncio.sleep(max(0.0, reopens - time.monotonic()))  # the fault's own timing
            took = await wait_until(
                lambda: _health(victim, SERVING), RECOVERY, "the node after the blackhole"
            )
            print(f"{victim.name} serves again {took:.1f} s after the route came back")
            print(await stale.collect(load))
            cluster.recovered(victim)
        await settle(cluster, census, load, watchers, f"blackhole of {victim.name}")
    cluster.heal(victim)  # closes the hung connections, and so their backends


async def postgres_restart_under_load(
    cluster: ClusterHarness, census: WorkerCensus, load: Load
) -> None:
    """PostgreSQL restarts (every connection ended at once, then it serves again): every
    node serves again, and what was in flight is explained. A watch may end with its node's
    change feed (the stream says so, and is opened again): the watchers of this check are
    opened once the nodes serve again, and must follow every commit from then on."""
    load.begin(Phase("postgres-restart", stalls=True))
    async with load.running():
        await cluster.restart_postgres()
        await wait_until(lambda: _all_serving(cluster), RECOVERY, "nodes after the restart")
    async with watching(cluster.healthy()[0], load.acked) as watchers:
        await settle(cluster, census, load, watchers, "a PostgreSQL restart")


async def writer_terminated_under_load(
    cluster: ClusterHarness, census: WorkerCensus, load: Load
) -> None:
    """PostgreSQL ends the backend of one node's writer again and again during load, each
    time in the middle of a transaction: its commits under way are in doubt, and settled."""
    victim = await cluster.busiest()
    load.begin(Phase("terminate-writer", stalls=True))
    ended = 0
    async with watching(other_than(cluster, victim), load.acked) as watchers:
        async with load.running():
            until = time.monotonic() + TERMINATIONS
            while time.monotonic() < until:
                caught = await cluster.terminate_busy_writer(victim)
                ended += caught
                # The fault's cadence: look often for a busy writer; after ending one, let
                # the node reconnect and work a little before the next.
                await asyncio.sleep(TERMINATION_REST if caught else TERMINATION_PACE)
            await wait_until(lambda: _all_serving(cluster), RECOVERY, "nodes after the kills")
        assert ended >= MIN_TERMINATIONS, f"the writer was caught busy only {ended} times"
        await settle(cluster, census, load, watchers, f"{ended} ends of {victim.name}'s writer")
