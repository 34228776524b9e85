"""Three Session Manager nodes over one PostgreSQL database, and the faults a deployment meets.

``ClusterHarness`` starts N nodes (``session-manager serve`` subprocesses on
port 0, the simulated engine in worker processes, short leases) on one
database. Each node reaches PostgreSQL through a ``NetProxy`` of its own, so
that one node can be cut off from the database while the others are not.

The faults: ``kill9`` (the node gets no chance to clean up), ``sigstop`` /
``sigcont`` (the node freezes; its workers keep running), ``restart`` (a
graceful stop, then a new incarnation, within ``STOP_BOUND``), ``partition`` /
``heal`` (the node's database traffic hangs, then its connections are closed),
``blackhole`` (the node's open connections hang for good, both ends still
open; new ones go through after a while), ``terminate_busy_writer``
(PostgreSQL ends the backend of the node's writer connection in the middle of
a transaction: what it was committing is in doubt), and, with the throwaway
cluster at hand, ``restart_postgres``.

What the tests observe comes from outside the nodes: the ``leases``, ``nodes``,
``ll_whatsapp_qr_sessions`` and ``messages`` tables (read directly, never
through a proxy, never written), each node's ``/metrics``, and the worker
processes in /proc (tests/census.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from service.store.postgres import lock_key
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim
from tests.netproxy import NetProxy
from tests.postgres import Cluster
from tests.servers import ServerProcess

# Short, yet long enough that a 2-core machine shared with other suites does not miss a renewal.
LEASE_TTL = 4.0
LEASE_GRACE = 2.0
MOVES_PER_SECOND = 20
POLL = 0.1
#: How long the harness tries to reach PostgreSQL again after losing its connection.
REOPEN = 20.0
#: A folder where a failed test leaves every node's whole log.
LOGS_FOLDER = "SESSION_MANAGER_CLUSTER_LOGS"
MOVING_ATTEMPTS = 5  # tries of a call refused with SESSION_MOVING (RetryInfo: about 1 s)
#: Seconds a node's in-flight calls get when it is stopped (``--shutdown-grace``).
SHUTDOWN_GRACE = 3.0
#: How long a graceful stop (SIGTERM) may take: the grace, then handing sessions over.
STOP_BOUND = SHUTDOWN_GRACE + 7.0
_METRICS_PORT = re.compile(r"metrics on port (\d+)")


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def reason(error: grpc.aio.AioRpcError) -> str:
    """The contract reason (ErrorInfo) of a failed call; empty when it carries none."""
    info = _error_info(error)
    return "" if info is None else str(info.reason)


def metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The ErrorInfo metadata of a failed call; empty when it carries none."""
    info = _error_info(error)
    return {} if info is None else dict(info.metadata)


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """The delay a SESSION_MOVING refusal asks for (its RetryInfo), or None for other errors."""
    if reason(error) != "SESSION_MOVING":
        return None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            return float(retry.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError(f"SESSION_MOVING without the RetryInfo the contract promises: {error}")


def node_flags(name: str, lease_ttl: float, lease_grace: float, moves: int) -> list[str]:
    """The command line flags of one node of a cluster, besides its database."""
    return [
        "--engine=simulated-worker",
        f"--node-id={name}",
        f"--lease-ttl={lease_ttl:g}",
        f"--lease-grace={lease_grace:g}",
        f"--moves-per-second={moves}",
        "--http-address=",
        "--metrics-address=127.0.0.1:0",
        "--log-level=info",  # the metrics port is in the log
        "--send-rate=0",
        f"--shutdown-grace={SHUTDOWN_GRACE:g}",
    ]


@dataclass(frozen=True)
class Lease:
    """A row of the ``leases`` table."""

    instance_id: str
    owner: str | None  # "<node_id>/<incarnation>"; None once handed back
    epoch: int
    valid: bool  # lease_until is still ahead of the database's clock

    @property
    def node(self) -> str:
        """The owner's node id; empty when nobody holds the lease."""
        return (self.owner or "").split("/", 1)[0]


@dataclass
class Node:
    """One node: its proxy to PostgreSQL, its process while it runs, a channel to it."""

    name: str
    proxy: NetProxy
    flags: list[str]
    process: ServerProcess | None = None
    metrics_port: int | None = None
    channel: grpc.aio.Channel | None = None
    frozen: bool = False
    going: bool = False  # being stopped or killed: no new call goes to it
    #: Cut off in a way the proxy no longer shows (a blackhole after it reopened), until the
    #: test has seen it serve again.
    impaired: bool = False
    incarnations: int = 0
    #: What each earlier incarnation wrote on stderr.
    past_logs: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    @property
    def healthy(self) -> bool:
        """Running, not frozen, not being stopped and not cut off from the database."""
        return self.running and not (
            self.frozen or self.going or self.impaired or self.proxy.partitioned
        )

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    @property
    def address(self) -> str:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.address

    @property
    def sessions(self) -> session_service_pb2_grpc.SessionServiceAsyncStub:
        assert self.channel is not None, f"{self.name} is not running"
        return session_service_pb2_grpc.SessionServiceStub(self.channel)

    @property
    def simulator(self) -> simulator_service_pb2_grpc.SimulatorServiceAsyncStub:
        assert self.channel is not None, f"{self.name} is not running"
        return simulator_service_pb2_grpc.SimulatorServiceStub(self.channel)

    def stderr(self) -> str:
        return self.process.stderr() if self.process is not None else ""

    def log_tail(self, lines: int) -> str:
        """The last ``lines`` lines of every incarnation's log, the earliest first."""
        return "\n".join(
            f"--- {self.name}, incarnation {n + 1}:\n" + "\n".join(log.splitlines()[-lines:])
            for n, log in enumerate([*self.past_logs, self.stderr()])
            if log
        )


@dataclass
class ClusterHarness:
    """N nodes over the database at ``database_url``; an async context manager."""

    database_url: str
    size: int = 3
    lease_ttl: float = LEASE_TTL
    lease_grace: float = LEASE_GRACE
    moves_per_second: int = MOVES_PER_SECOND
    extra_flags: Sequence[str] = ()
    #: The throwaway PostgreSQL server, for ``restart_postgres``.
    postgres: Cluster | None = None
    nodes: list[Node] = field(default_factory=list)
    #: How long each graceful stop took, by node name.
    stops: list[tuple[str, float]] = field(default_factory=list)
    _db: asyncpg.Connection | None = None
    _http: httpx.AsyncClient | None = None
    _folders: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> ClusterHarness:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *exc_info: object) -> None:
        if kind is not None:  # shown by pytest with the failure
            print(*(node.log_tail(40) for node in self.nodes), sep="\n")
            self.keep_logs()
        await self.close()

    def keep_logs(self) -> None:
        """Write every incarnation's whole log into $SESSION_MANAGER_CLUSTER_LOGS, if set."""
        folder = os.environ.get(LOGS_FOLDER)
        if not folder:
            return
        Path(folder).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            for n, log in enumerate([*node.past_logs, node.stderr()], start=1):
                (Path(folder) / f"{node.name}.{n}.log").write_text(log)
        print(f"the nodes' logs are in {folder}")

    async def start(self) -> None:
        """Start every node at once; return when each one listens."""
        self._db = await asyncpg.connect(self.database_url)
        self._http = httpx.AsyncClient(timeout=5)
        self._folders = tempfile.TemporaryDirectory(prefix="session-manager-nodes-")
        for n in range(1, self.size + 1):
            name = f"n{n}"
            flags = node_flags(name, self.lease_ttl, self.lease_grace, self.moves_per_second)
            # A folder of its own, as on separate machines: nothing passes between nodes
            # but through PostgreSQL.
            flags.append(f"--devices-dir={self._folders.name}/{name}")
            proxy = NetProxy.for_url(self.database_url)
            self.nodes.append(Node(name, proxy, [*flags, *self.extra_flags]))
        await asyncio.gather(*(self.launch(node) for node in self.nodes))

    async def close(self) -> None:
        """Kill every node (a frozen one too) and close the proxies, whatever fails on the way."""
        async with contextlib.AsyncExitStack() as closing:
            for node in self.nodes:
                closing.callback(node.proxy.close)
                closing.push_async_callback(self._forget, node, True)
        if self._http is not None:
            await self._http.aclose()
        if self._db is not None:
            await self._db.close()
        if self._folders is not None:
            self._folders.cleanup()

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def healthy(self) -> list[Node]:
        """The nodes that run, are not frozen and reach the database."""
        return [node for node in self.nodes if node.healthy]

    def by_pid(self) -> dict[int, Node]:
        return {node.pid: node for node in self.nodes if node.running}

    # The faults.

    async def launch(self, node: Node) -> None:
        """Start ``node`` (again): a new incarnation under the same node id."""
        assert not node.running, f"{node.name} already runs"
        url = node.proxy.url(self.database_url)
        node.process = await asyncio.to_thread(ServerProcess.start, url, *node.flags)
        node.incarnations += 1
        node.frozen = False
        node.metrics_port = _metrics_port(node.process.stderr())
        node.channel = grpc.aio.insecure_channel(node.address)

    async def kill9(self, node: Node) -> None:
        """SIGKILL: the node and, through PDEATHSIG, its workers die at once."""
        await self._forget(node, kill=True)

    async def restart(self, node: Node) -> None:
        """SIGTERM, wait for the graceful exit, start a new incarnation."""
        await self._forget(node, kill=False)
        await self.launch(node)

    def sigstop(self, node: Node) -> None:
        assert node.process is not None
        node.process.signal(signal.SIGSTOP)
        node.frozen = True

    def sigcont(self, node: Node) -> None:
        assert node.process is not None
        node.process.signal(signal.SIGCONT)
        node.frozen = False

    def partition(self, node: Node) -> None:
        node.proxy.partition()

    def heal(self, node: Node) -> None:
        node.proxy.heal()

    def blackhole(self, node: Node, reopen_after: float) -> None:
        """The node's open connections hang for good; new ones go through ``reopen_after``
        seconds later. The node counts as cut off until ``recovered``."""
        node.impaired = True
        node.proxy.blackhole(reopen_after)

    def recovered(self, node: Node) -> None:
        node.impaired = False

    def _writer_lock(self, node: Node) -> str:
        """SQL that matches the ``pg_locks`` row of the node's advisory lock (its writer's)."""
        key = lock_key(node.name)
        return (
            "l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            f"AND l.classid = {(key >> 32) & 0xFFFFFFFF} AND l.objid = {key & 0xFFFFFFFF} "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )

    async def writer_backend(self, node: Node) -> int | None:
        """The PostgreSQL backend of the node's writer: the one holding the node's lock."""
        rows = await self._query(f"SELECT l.pid FROM pg_locks l WHERE {self._writer_lock(node)}")
        return int(rows[0]["pid"]) if rows else None

    async def terminate_busy_writer(self, node: Node) -> bool:
        """End the backend of the node's writer if it is in the middle of something (a
        statement, a transaction, a COMMIT): what it was committing is then in doubt.
        Whether it ended one."""
        rows = await self._query(
            "SELECT pg_terminate_backend(a.pid) AS ended FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid "
            f"WHERE {self._writer_lock(node)} AND a.state <> 'idle'"
        )
        return bool(rows and rows[0]["ended"])

    async def restart_postgres(self) -> None:
        """Restart the PostgreSQL server (fast: every connection is ended, then it comes back
        on the same port)."""
        assert self.postgres is not None, "the harness was not given the PostgreSQL cluster"
        await asyncio.to_thread(self.postgres.restart)

    async def stop_all(self) -> None:
        """Stop every running node gracefully, at once; each within ``STOP_BOUND``."""
        await asyncio.gather(
            *(self._forget(node, kill=False) for node in self.nodes if node.running)
        )

    async def _forget(self, node: Node, kill: bool) -> None:
        """Kill or stop the node's process, then close the channel to it.

        A graceful stop must end within ``STOP_BOUND`` with exit status 0.
        """
        node.going = True
        if node.process is not None:
            process = node.process
            if kill:  # SIGKILL ends a stopped process too
                await asyncio.to_thread(process.kill)
            else:
                started = time.monotonic()
                try:
                    code = await asyncio.to_thread(process.stop, STOP_BOUND)
                except subprocess.TimeoutExpired:
                    await asyncio.to_thread(process.kill)
                    node.past_logs.append(process.stderr())
                    process.close()
                    node.process = None
                    raise AssertionError(
                        f"{node.name} did not stop within {STOP_BOUND:g} s of SIGTERM"
                    ) from None
                took = time.monotonic() - started
                self.stops.append((node.name, took))
                assert code == 0, f"{node.name} exited with {code}: {process.stderr()[-2000:]}"
            node.past_logs.append(process.stderr())
            process.close()
            node.process = None
        if node.channel is not None:
            await node.channel.close(None)
            node.channel = None
        node.frozen = node.going = False

    # What the tests observe.

    async def leases(self) -> dict[str, Lease]:
        rows = await self._query(
            "SELECT instance_id, owner, epoch, coalesce(lease_until > now(), false) AS valid "
            "FROM leases"
        )
        return {row["instance_id"]: Lease(**dict(row)) for row in rows}

    async def node_rows(self) -> list[dict[str, Any]]:
        rows = await self._query(
            "SELECT node_id, incarnation, address, heartbeat_at, started_at FROM nodes"
        )
        return [dict(row) for row in rows]

    async def stored_sessions(self) -> dict[str, dict[str, Any]]:
        """Every row of ``ll_whatsapp_qr_sessions``, by instance id."""
        rows = await self._query("SELECT * FROM ll_whatsapp_qr_sessions")
        return {row["instance_id"]: dict(row) for row in rows}

    async def stored_messages(self) -> dict[str, dict[str, Any]]:
        """Every row of ``messages``, by message id."""
        rows = await self._query("SELECT * FROM messages")
        return {row["id"]: dict(row) for row in rows}

    async def metric(self, node: Node, name: str) -> float:
        """The sum of every sample called ``name`` on the node's ``/metrics``."""
        assert self._http is not None, "the harness is not started"
        assert node.metrics_port is not None, f"{node.name} logged no metrics port"
        answer = await self._http.get(f"http://127.0.0.1:{node.metrics_port}/metrics")
        answer.raise_for_status()
        return sum(
            sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples
            if sample.name == name
        )

    async def live_owners(self) -> dict[str, Node]:
        """The healthy nodes by the lease owner name of their current incarnation."""
        healthy = {node.name: node for node in self.healthy()}
        return {
            f"{row['node_id']}/{row['incarnation']}": healthy[row["node_id"]]
            for row in await self.node_rows()
            if row["node_id"] in healthy
        }

    async def owned_by(self, node: Node) -> list[str]:
        """The sessions whose valid lease the current incarnation of ``node`` holds."""
        owners = await self.live_owners()
        return sorted(
            iid
            for iid, lease in (await self.leases()).items()
            if lease.valid and owners.get(lease.owner or "") is node
        )

    async def busiest(self) -> Node:
        """The healthy node holding the most valid leases."""
        owners = await self.live_owners()
        held = {node.name: 0 for node in owners.values()}
        for lease in (await self.leases()).values():
            holder = owners.get(lease.owner or "")
            if lease.valid and holder is not None:
                held[holder.name] += 1
        return self.node(max(held, key=lambda name: held[name]))

    async def not_moved(
        self, node: Node, instance_ids: Collection[str], since: datetime
    ) -> str | None:
        """Which of ``instance_ids`` is not yet connected again, after ``since``, on a healthy
        node other than ``node`` (its ``connected_at`` says when)."""
        leases, stored = await self.leases(), await self.stored_sessions()
        owners = await self.live_owners()
        for iid in sorted(instance_ids):
            lease, row = leases.get(iid), stored[iid]
            holder = owners.get(lease.owner or "") if lease is not None else None
            if lease is None or holder in (None, node) or not lease.valid:
                return f"{iid} is leased as {lease}"
            if row["status"] != "connected" or row["connected_at"] < since:
                return f"{iid} is {row['status']} since {row['connected_at']} on {lease.node}"
        return None

    def settled(
        self, instance_ids: Collection[str], quiet: float = 1.0
    ) -> Callable[[], Awaitable[str | None]]:
        """A check for ``wait_until``: every session connected under a valid lease of a healthy
        node, and no lease changed owner or epoch for ``quiet`` seconds (placement is done)."""
        seen: dict[str, tuple[str | None, int]] = {}
        since = time.monotonic()

        async def check() -> str | None:
            nonlocal seen, since
            leases, stored = await self.leases(), await self.stored_sessions()
            owners = await self.live_owners()
            now = {iid: (lease.owner, lease.epoch) for iid, lease in leases.items()}
            if now != seen:
                seen, since = now, time.monotonic()
            for iid in sorted(instance_ids):
                lease = leases.get(iid)
                if lease is None or not lease.valid or (lease.owner or "") not in owners:
                    return f"{iid} is leased as {lease}"
                if stored[iid]["status"] != "connected":
                    return f"{iid} is {stored[iid]['status']}"
            if time.monotonic() - since < quiet:
                return f"a lease moved less than {quiet:g} s ago"
            return None

        return check

    async def pair(self, instance_ids: Sequence[str], at_once: int = 3) -> None:
        """Create and pair each session (QR, then the phone scans it), ``at_once`` at a time,
        each call on the next healthy node, following SESSION_MOVING's RetryInfo; a code that
        cannot be scanned any more (FAILED_PRECONDITION) is asked for again."""
        turn = itertools.count()

        async def call(method: Callable[[Node], Awaitable[Any]]) -> None:
            for _ in range(MOVING_ATTEMPTS - 1):
                healthy = self.healthy()
                try:
                    await method(healthy[next(turn) % len(healthy)])
                    return
                except grpc.aio.AioRpcError as error:
                    delay = retry_after(error)
                    if delay is None:
                        raise
                    await asyncio.sleep(delay)  # the wait the contract asks for
            await method(self.healthy()[0])

        async def paired(iid: str) -> bool:
            """Whether the scan landed after all (the session connects): then it is done."""
            answer = await self.healthy()[0].sessions.GetSession(
                pb.GetSessionRequest(instance_id=iid), timeout=10
            )
            status = answer.session.status
            return status in (s.SESSION_STATUS_CONNECTING, s.SESSION_STATUS_CONNECTED)

        async def one(iid: str) -> None:
            await call(lambda n: n.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid)))
            for attempt in range(1, MOVING_ATTEMPTS + 1):
                try:
                    await call(lambda n: n.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid)))
                    await call(lambda n: n.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid)))
                    return
                except grpc.aio.AioRpcError as error:
                    # A scan that moved with its session may have landed (then it connects);
                    # else the code went with the pairing: as a user would, ask for a new one.
                    if await paired(iid):
                        return
                    if (
                        error.code() != grpc.StatusCode.FAILED_PRECONDITION
                        or attempt == MOVING_ATTEMPTS
                    ):
                        raise

        for start in range(0, len(instance_ids), at_once):
            await asyncio.gather(*(one(iid) for iid in instance_ids[start : start + at_once]))

    async def _query(self, sql: str) -> list[asyncpg.Record]:
        """``sql`` on the harness's own connection, opened again if PostgreSQL ended it (a
        restart of the server: then tried until it answers, for ``REOPEN`` seconds)."""
        deadline = time.monotonic() + REOPEN
        while True:
            try:
                if self._db is None or self._db.is_closed():
                    self._db = await asyncpg.connect(self.database_url, timeout=10)
                return list(await self._db.fetch(sql, timeout=10))
            except (
                asyncpg.ConnectionDoesNotExistError,
                asyncpg.CannotConnectNowError,
                asyncpg.AdminShutdownError,
                asyncpg.InterfaceError,
                OSError,
            ):
                if self._db is not None:
                    self._db.terminate()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(POLL)  # the server is restarting: its pace, bounded above


async def wait_until(
    check: Callable[[], Awaitable[str | None]], within: float, what: str, poll: float = POLL
) -> float:
    """Poll ``check`` until it returns None (nothing wrong left); the seconds it took.

    ``check`` returns a description of what is still wrong; after ``within``
    seconds the last one fails the test, prefixed by ``what``.
    """
    started = time.monotonic()
    while True:
        wrong = await check()
        if wrong is None:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}, not within {within:g} s: {wrong}")
        await asyncio.sleep(poll)  # the polling interval; the wait is bounded by ``within``


def _metrics_port(log: str) -> int | None:
    found = _METRICS_PORT.search(log)
    return int(found.group(1)) if found else None
