"""``python -m bench.cluster [--quick] [--output FILE]``: nodes over PostgreSQL on this machine.

For 1, 2 and 3 nodes that take over (a cluster of N + 1 nodes, one of which dies):

- **failover**: K sessions connected across the cluster, then kill -9 of the node
  that owns the most. From the sessions' ``connected_at`` on the nodes that took
  them: the seconds from the kill until the last one is CONNECTED again, and the
  sessions moved per second from the first to the last. The baseline, measured in
  the same run: the SQLite single node killed the same way and started again at
  once (what a supervisor such as systemd does), its sessions restored by itself.
- **GetSession CPU per call** on one surviving node (its reads come from
  PostgreSQL), against the SQLite single node and the bare grpc.aio no-op
  measured in the same run; and PostgreSQL's own CPU per call, since a node's
  reads are now partly the database server's work.

Every node runs in its own process (``session-manager serve``, simulated engine in
workers); the lease TTL, grace and move rate are the chaos test's
(tests/cluster.py). Medians of several runs, ratios taken run by run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import pwd
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench.__main__ import IN_FLIGHT, RESULTS, load_average, write
from bench.bare import NOOP
from bench.cpu import cpu_per_call, cpu_seconds
from bench.servers import BARE_COMMAND, SESSIONS, _launch, _real_command, identity, prepare, real
from sessionmanager.v1 import session_pb2 as s
from sessionmanager.v1 import session_service_pb2 as pb
from tests.cluster import LEASE_GRACE, LEASE_TTL, MOVES_PER_SECOND, ClusterHarness, wait_until
from tests.postgres import SUPERUSER, Cluster, server_binaries

NODES = (1, 2, 3)
POLL = 0.02  # seconds between two looks at the store while sessions move
HEADING = "## Several nodes over PostgreSQL"
SQLITE_SECONDS = "SQLite single node, kill -9 and started again: seconds until all connected"
SQLITE_RATE = "SQLite single node, kill -9 and started again: sessions back per second"


@dataclass(frozen=True)
class Sizes:
    runs: int
    sessions: int  # K, connected across the cluster before a node dies
    cpu_calls: int


FULL = Sizes(runs=5, sessions=30, cpu_calls=2000)
QUICK = Sizes(runs=1, sessions=8, cpu_calls=200)  # the busiest of 4 nodes owns 2 or more


@dataclass
class Row:
    """One figure: a value per run, and optionally the baseline's value in the same run."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)

    def add(self, value: float, baseline: float | None = None) -> None:
        self.values.append(value)
        if baseline is not None:
            self.baseline.append(baseline)
        print(f"  {self.name}: {value:.4g} {self.unit}", flush=True)

    def cells(self) -> str:
        median = statistics.median(self.values)
        spread = f"{min(self.values):.3g} to {max(self.values):.3g}"
        if self.baseline:
            ratios = [v / b for v, b in zip(self.values, self.baseline, strict=True)]
            ratio = f"{statistics.median(ratios):.2f} x ({min(ratios):.2f} to {max(ratios):.2f})"
        else:
            ratio = "baseline"
        return (
            f"| {self.name} | {median:.3g} {self.unit} | {spread} | {ratio} | {len(self.values)} |"
        )


@dataclass
class Results:
    rows: dict[str, Row] = field(default_factory=dict)

    def row(self, name: str, unit: str) -> Row:
        return self.rows.setdefault(name, Row(name, unit))


@contextmanager
def postgresql() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster (initdb into a temporary folder), as the tests use."""
    root = Path(tempfile.mkdtemp(prefix="session-manager-bench-"))
    if os.geteuid() == 0:  # initdb refuses root: the cluster runs as postgres
        owner = pwd.getpwnam(SUPERUSER)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(root, server_binaries())
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def postgres_cpu(cluster: Cluster) -> float:
    """The CPU seconds of the PostgreSQL server and all its processes so far."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == postmaster:
                    total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
            except (FileNotFoundError, ProcessLookupError):
                continue
    return total


async def not_connected(address: str, instance_ids: list[str]) -> str | None:
    """The first session that does not read CONNECTED on the server at ``address``, if any."""
    async with grpc.aio.insecure_channel(address) as channel:
        get = channel.unary_unary(f"{SESSIONS}/GetSession", identity, identity)
        for iid in instance_ids:
            try:
                raw = await get(pb.GetSessionRequest(instance_id=iid).SerializeToString())
            except grpc.aio.AioRpcError as error:
                return f"{iid}: {error.code().name}"
            if pb.GetSessionResponse.FromString(raw).session.status != s.SESSION_STATUS_CONNECTED:
                return f"{iid} is not connected"
    return None


async def get_session_cpu(pid: int, address: str, ids: list[str], calls: int) -> float:
    """The CPU seconds ``pid`` spends per GetSession, after a warm-up of a tenth as many."""
    requests = [pb.GetSessionRequest(instance_id=i).SerializeToString() for i in ids]
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"{SESSIONS}/GetSession", identity, identity)
        for n in range(calls // 10):
            await call(requests[n % len(requests)])
        return await cpu_per_call(
            pid, lambda n: call(requests[n % len(requests)]), calls, IN_FLIGHT
        )


async def noop_cpu(pid: int, address: str, calls: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(NOOP, identity, identity)
        for _ in range(calls // 10):
            await call(b"")
        return await cpu_per_call(pid, lambda n: call(b""), calls, IN_FLIGHT)


@dataclass(frozen=True)
class Recovery:
    """How sessions came back after a kill -9, from their ``connected_at``."""

    seconds: float  # from the kill to the last one connected again
    per_second: float  # sessions connected per second, from the first to the last

    @classmethod
    async def read(cls, address: str, ids: list[str], killed_at: datetime) -> Recovery:
        times = sorted(
            session.connected_at.ToDatetime(tzinfo=UTC) for session in await sessions(address, ids)
        )
        spread = (times[-1] - times[0]).total_seconds()
        if len(times) < 2 or spread <= 0:
            raise RuntimeError(f"too few sessions came back to measure a rate: {times}")
        return cls((times[-1] - killed_at).total_seconds(), (len(times) - 1) / spread)


@dataclass(frozen=True)
class Baseline:
    """What the SQLite single node and the bare server measured in the same run."""

    noop_cpu: float
    get_cpu: float
    recovery: Recovery


async def sessions(address: str, ids: list[str]) -> list[s.WhatsAppSession]:
    async with grpc.aio.insecure_channel(address) as channel:
        get = channel.unary_unary(f"{SESSIONS}/GetSession", identity, identity)
        return [
            pb.GetSessionResponse.FromString(
                await get(pb.GetSessionRequest(instance_id=i).SerializeToString())
            ).session
            for i in ids
        ]


async def sqlite_run(sizes: Sizes, work: Path, attempt: int, results: Results) -> Baseline:
    """The baselines: the bare no-op's CPU per call, the SQLite node's GetSession CPU per call,
    and how that node's sessions come back when it is killed and started again at once."""
    database = work / f"single{attempt}.db"
    bare, single = _launch(BARE_COMMAND, _real_command(database, "--engine=simulated-worker"))
    try:
        ids = await prepare(single.address, sizes.sessions // 2, connect=True, qr=False)
        noop = await noop_cpu(bare.pid, bare.address, sizes.cpu_calls)
        sqlite = await get_session_cpu(single.pid, single.address, ids, sizes.cpu_calls)
        killed_at = datetime.now(UTC)
        single.process.kill()
        single.process.wait()
    finally:
        bare.stop()
        single.stop()
    restarted = real(database, "--engine=simulated-worker")
    try:
        await wait_until(lambda: not_connected(restarted.address, ids), 60, "SQLite restart", POLL)
        recovery = await Recovery.read(restarted.address, ids, killed_at)
    finally:
        restarted.stop()
    results.row(SQLITE_SECONDS, "s").add(recovery.seconds)
    results.row(SQLITE_RATE, "/s").add(recovery.per_second)
    results.row("GetSession CPU, SQLite node / bare no-op", "µs").add(sqlite * 1e6, noop * 1e6)
    return Baseline(noop, sqlite, recovery)


@asynccontextmanager
async def cluster_of(postgres: Cluster, size: int, moves: int) -> AsyncIterator[ClusterHarness]:
    url = await postgres.create_database()
    async with ClusterHarness(url, size=size, moves_per_second=moves) as harness:
        yield harness


async def cluster_run(
    postgres: Cluster, survivors: int, sizes: Sizes, moves: int, baseline: Baseline,
    results: Results,
) -> None:  # fmt: skip
    """Kill the busiest of ``survivors + 1`` nodes, time the move, then read CPU on a survivor."""
    async with cluster_of(postgres, survivors + 1, moves) as cluster:
        ids = [f"load_{n}" for n in range(sizes.sessions)]
        await cluster.pair(ids)
        await wait_until(cluster.settled(ids), 60, "placement", POLL)
        victim = await cluster.busiest()
        owned = await cluster.owned_by(victim)
        killed_at = datetime.now(UTC)
        await cluster.kill9(victim)
        await wait_until(
            lambda: cluster.not_moved(victim, owned, killed_at),
            120,
            f"{survivors} nodes taking over",
            POLL,
        )
        survivor = cluster.healthy()[0]
        recovery = await Recovery.read(survivor.address, owned, killed_at)
        label = f"{survivors} node{'s' if survivors > 1 else ''}"
        results.row(f"{label} take over: seconds until all connected / SQLite", "s").add(
            recovery.seconds, baseline.recovery.seconds
        )
        results.row(f"{label} take over: sessions moved per second / SQLite", "/s").add(
            recovery.per_second, baseline.recovery.per_second
        )

        before = postgres_cpu(postgres)
        cpu = await get_session_cpu(survivor.pid, survivor.address, ids, sizes.cpu_calls)
        database = (postgres_cpu(postgres) - before) / sizes.cpu_calls
        results.row(f"GetSession CPU, node of {label} / SQLite node", "µs").add(
            cpu * 1e6, baseline.get_cpu * 1e6
        )
        results.row(f"GetSession CPU, node of {label} / bare no-op", "µs").add(
            cpu * 1e6, baseline.noop_cpu * 1e6
        )
        results.row(f"GetSession, PostgreSQL's CPU per call ({label})", "µs").add(database * 1e6)


async def run(sizes: Sizes, work: Path, moves: int) -> Results:
    results = Results()
    with postgresql() as postgres:
        for attempt in range(sizes.runs):
            print(f"run {attempt + 1}/{sizes.runs}", flush=True)
            baseline = await sqlite_run(sizes, work, attempt, results)
            for survivors in NODES:
                await cluster_run(postgres, survivors, sizes, moves, baseline, results)
    return results


def section(
    results: Results, command: str, took: float, load: str, sizes: Sizes, moves: int
) -> str:
    return "\n".join([
        HEADING,
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC in {took:.0f} s.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs; load average (1 min) {load} at "
        f"the start, {load_average()} at the end",
        f"- N nodes take over from a cluster of N + 1 on one PostgreSQL (loopback), simulated "
        f"engine in workers; {sizes.sessions} sessions connected before the kill -9 of the node "
        f"owning the most; lease TTL {LEASE_TTL:g} s, grace {LEASE_GRACE:g} s, {moves} moves per "
        "second per node: a new owner waits out the lease, so the seconds include TTL + grace",
        f"- the SQLite baseline: one node with {sizes.sessions // 2} sessions, killed the same way "
        "and started again at once; seconds and rates from the sessions' `connected_at`",
        f"- CPU: user + system time from `/proc/PID/stat` over {sizes.cpu_calls:,} GetSession calls, "
        f"{IN_FLIGHT} in flight, after a warm-up, on one surviving node; PostgreSQL's is the sum "
        "of its server processes",
        "",
        "| figure | median | spread (min to max) | / baseline, same run | runs |",
        "|---|---|---|---|---|",
        *(row.cells() for row in results.rows.values()),
        "",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run, few sessions (CI)")
    parser.add_argument("--moves-per-second", type=int, default=MOVES_PER_SECOND)
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file to update")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    command = "python -m bench.cluster" + (" --quick" if args.quick else "")
    started, load = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as work:
        results = asyncio.run(run(sizes, Path(work), args.moves_per_second))
    new = section(
        results, command, time.perf_counter() - started, load, sizes, args.moves_per_second
    )
    write(args.output, new)
    print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
