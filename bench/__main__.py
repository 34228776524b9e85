"""``python -m bench [--quick] [--label TEXT] [--output FILE]``: run the benchmarks, write the results.

Every server runs in its own process: the Session Manager (``session-manager
serve``) and the baseline (``bench/bare.py``, a bare grpc.aio server). Both
are loaded by the same client code from this process, with requests and
responses passed as bytes so the client costs the same for both. Figures are
medians of several runs; ratios are taken run by run against the baseline
measured in the same run.

Two kinds of figures: throughput and latency, which move with whatever else
runs on the machine, and the server's CPU time per call (read from ``/proc``,
see ``bench/cpu.py``), which barely does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import grpc

from bench.bare import NOOP, PUBLISH, SIZED, WATCH
from bench.cpu import cpu_during, cpu_per_call
from bench.servers import (
    SESSIONS,
    Server,
    identity,
    prepare,
    read_one_each,
    real,
    running,
    running_pair,
    unary,
    watching,
)
from service.domain.qr import render_data_url
from service.engine.simulated import pairing_payload
from service.store.sqlite import Store
from sessionmanager.v1 import engine_service_pb2 as engine
from sessionmanager.v1 import session_service_pb2 as pb

RESULTS = Path(__file__).parent / "RESULTS.md"
IN_FLIGHT = 64
REPORT_ERROR = "/sessionmanager.v1.EngineService/ReportError"
TITLE = """# Benchmark results

`python -m bench --label TEXT` adds a dated section (or replaces the one with the
same heading), so runs before and after a change stand side by side. Compare the
server CPU per call and its ratio to the bare baseline: the machine is shared, and
throughput and latency move with its load far more than CPU time does.
"""
WORKERS_SECTION = "## Engine workers"  # written by `python -m bench.workers`, kept last


@dataclass(frozen=True)
class Sizes:
    """How much each figure measures: the full run, or the quick one CI runs."""

    runs: int
    seconds: float  # of each throughput measurement
    watchers: int  # for the fan-out time and memory
    big: int  # sessions in the large database
    latency_calls: int
    cpu_calls: int  # per CPU figure and run
    cpu_watchers: int
    cpu_changes: int


FULL = Sizes(runs=5, seconds=3.0, watchers=10_000, big=100_000, latency_calls=2000,
             cpu_calls=2000, cpu_watchers=1000, cpu_changes=20)  # fmt: skip
QUICK = Sizes(runs=2, seconds=0.3, watchers=300, big=2_000, latency_calls=200,
              cpu_calls=300, cpu_watchers=100, cpu_changes=10)  # fmt: skip


@dataclass
class Figure:
    """A throughput, latency or size figure: one value per run, with a target (or none)."""

    name: str
    target: str
    values: list[float]
    unit: str
    met: Callable[[float], bool] | None

    def row(self) -> str:
        median = statistics.median(self.values)
        spread = f"{min(self.values):.3g} to {max(self.values):.3g}"
        return (
            f"| {self.name} | {median:.3g} {self.unit} | {spread} | {len(self.values)} | "
            f"{self.target} | {_verdict(self.met, median)} |"
        )


def _verdict(met: Callable[[float], bool] | None, median: float) -> str:
    if met is None:
        return "—"
    return "yes" if met(median) else "**no**"


@dataclass
class CpuFigure:
    """The server's CPU microseconds per call, beside the baseline's measured in the same run.

    ``limit`` is the target for the median ratio, when there is one.
    """

    name: str
    limit: float | None = None
    server: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)

    def row(self) -> str:
        ratios = [server / bare for server, bare in zip(self.server, self.bare, strict=True)]
        median = statistics.median(ratios)
        limit = self.limit
        target = "—" if limit is None else f"≤ {limit:.2f} x"
        met = None if limit is None else (lambda ratio: ratio <= limit)
        return (
            f"| {self.name} | {statistics.median(self.server):.0f} µs | "
            f"{min(self.server):.0f} to {max(self.server):.0f} | "
            f"{statistics.median(self.bare):.0f} µs | {median:.2f} x | "
            f"{min(ratios):.2f} to {max(ratios):.2f} | {len(self.server)} | "
            f"{target} | {_verdict(met, median)} |"
        )


@dataclass
class Results:
    figures: dict[str, Figure] = field(default_factory=dict)
    cpu: dict[str, CpuFigure] = field(default_factory=dict)
    #: Bytes of each call's reply, as the sized baseline answers them.
    reply_bytes: dict[str, list[int]] = field(default_factory=dict)
    #: The machine's load average (1 min) read between the parts of the run.
    loads: list[float] = field(default_factory=list)

    def add(self, name: str, target: str, unit: str, met: Callable[[float], bool] | None,
            value: float) -> None:  # fmt: skip
        self.figures.setdefault(name, Figure(name, target, [], unit, met)).values.append(value)
        print(f"  {name}: {value:.4g} {unit}", flush=True)

    def add_cpu(self, name: str, server: float, bare: float, limit: float | None = None) -> None:
        """Record one run's CPU seconds per call, server and baseline."""
        figure = self.cpu.setdefault(name, CpuFigure(name, limit))
        figure.server.append(server * 1e6)
        figure.bare.append(bare * 1e6)
        print(f"  CPU {name}: {server * 1e6:.0f} µs, bare {bare * 1e6:.0f} µs", flush=True)

    def note_load(self) -> None:
        self.loads.append(float(load_average()))


async def qps(address: str, method: str, payload: Callable[[int], bytes], seconds: float) -> float:
    """Calls per second with IN_FLIGHT calls always outstanding; call n sends ``payload(n)``."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, identity, identity)
        numbers = itertools.count()  # shared: each call takes the next number
        await asyncio.gather(*(call(payload(next(numbers))) for _ in range(IN_FLIGHT)))  # warm up
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await call(payload(next(numbers)))
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return done / (time.perf_counter() - started)


def cycle(payloads: list[bytes]) -> Callable[[int], bytes]:
    """Call n sends the n-th of ``payloads``, round and round."""
    return lambda n: payloads[n % len(payloads)]


async def latency(address: str, method: str, payloads: list[bytes], calls: int) -> float:
    """Median seconds of one call, one at a time."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, identity, identity)
        for payload in payloads[:50]:
            await call(payload)
        times = []
        for n in range(calls):
            started = time.perf_counter()
            await call(payloads[n % len(payloads)])
            times.append(time.perf_counter() - started)
        return statistics.median(times)


async def fanout(
    server: Server, method: str, payload: bytes, watchers: int, trigger: Callable[[], Awaitable[object]]
) -> tuple[float, float]:  # fmt: skip
    """(seconds until every watcher has one change, server bytes per open watcher)."""
    before = server.rss()
    async with watching(server.address, method, payload, watchers) as streams:
        await asyncio.sleep(0.5)  # let the streams' start-up garbage go before reading the memory
        per_watcher = (server.rss() - before) / watchers
        started = time.perf_counter()
        await trigger()
        await read_one_each(streams)
        return time.perf_counter() - started, per_watcher


async def fanout_cpu(
    server: Server, method: str, payload: bytes, watchers: int, changes: int,
    trigger: Callable[[int], Awaitable[object]],
) -> float:  # fmt: skip
    """The server's CPU seconds per delivered message: ``changes`` changes to ``watchers`` watchers.

    Each change is triggered once every watcher has the previous one, so none is skipped.
    """
    async with watching(server.address, method, payload, watchers) as streams:
        await trigger(0)  # warm up
        await read_one_each(streams)

        async def deliver() -> None:
            for n in range(1, changes + 1):
                await trigger(n)
                await read_one_each(streams)

        return await cpu_during(server.pid, deliver()) / (changes * watchers)


async def seed_database(path: Path, sessions: int) -> None:
    """A database with ``sessions`` sessions in init, written directly for speed."""
    await (await Store.open(path)).close()
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executemany(
            "INSERT INTO ll_whatsapp_qr_sessions (instance_id, status, qr_status, created_at, "
            "updated_at, revision) VALUES (?, 'init', 'none', ?, ?, 1)",
            ((f"bench_{n}", now, now) for n in range(sessions)),
        )
        db.commit()


def _send(instance_id: str, key: str) -> bytes:
    request = pb.SendRequest(instance_id=instance_id, to="+5491100000000", text="hola",
                             idempotency_key=key)  # fmt: skip
    return request.SerializeToString()


def _fault(instance_id: str, n: int) -> bytes:
    """A fault report; alternating between two codes makes each one a committed change."""
    request = engine.ReportErrorRequest(instance_id=instance_id, code=f"FAULT_{n % 2}", message="m")
    return request.SerializeToString()


async def _per_call(server: Server, method: str, payload: Callable[[int], bytes], calls: int) -> float:  # fmt: skip
    """The server's CPU seconds per call of ``method``, after a warm-up of a tenth as many."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = channel.unary_unary(method, identity, identity)
        warm_up = calls // 10
        for n in range(warm_up):
            await call(payload(n))
        return await cpu_per_call(
            server.pid, lambda n: call(payload(warm_up + n)), calls, IN_FLIGHT
        )


async def throughput_run(sizes: Sizes, work: Path, attempt: int, results: Results) -> None:
    add = results.add
    seconds = sizes.seconds
    with running_pair(work / f"r{attempt}.db") as (base, sm):
        noop = await qps(base.address, NOOP, cycle([b""]), seconds)
        add("bare no-op unary QPS (64 in flight)", "baseline", "QPS", None, noop)
        ids = await prepare(sm.address, IN_FLIGHT, connect=False, qr=True)
        get = [pb.GetSessionRequest(instance_id=i).SerializeToString() for i in ids]
        got = await qps(sm.address, f"{SESSIONS}/GetSession", cycle(get), seconds)
        add("GetSession QPS / bare", "≥ 0.85", "x", lambda v: v >= 0.85, got / noop)
        noop = await qps(base.address, NOOP, cycle([b""]), seconds)
        want = [pb.RequestQRRequest(instance_id=i).SerializeToString() for i in ids]
        qr = await qps(sm.address, f"{SESSIONS}/RequestQR", cycle(want), seconds)
        add("RequestQR (valid QR) QPS / bare", "≥ 0.85", "x", lambda v: v >= 0.85, qr / noop)

        live = await prepare(sm.address, IN_FLIGHT, connect=True, qr=False, prefix="live")
        sent = await qps(sm.address, f"{SESSIONS}/Send",
                         lambda n: _send(live[n % len(live)], f"qps-{n}"), seconds)  # fmt: skip
        add("Send accepted per second, new idempotency key (durable)", "≥ 2,000", "/s",
            lambda v: v >= 2000, sent)  # fmt: skip

        codes = [_fault(i, n) for n, i in enumerate(live * 2)]
        changes = await qps(sm.address, REPORT_ERROR, cycle(codes), seconds)
        add("committed state changes per second (durable)", "≥ 2,000", "/s",
            lambda v: v >= 2000, changes)  # fmt: skip

    with running_pair(work / f"f{attempt}.db") as (base, sm):
        await prepare(sm.address, 1, connect=False, qr=False)
        watch = pb.WatchSessionRequest(instance_id="load_0").SerializeToString()

        async def change() -> object:
            return await unary(sm.address, REPORT_ERROR, _fault("load_0", 0))

        async def publish() -> object:
            return await unary(base.address, PUBLISH, b"\x08\x02")

        bare_time, bare_bytes = await fanout(base, WATCH, b"", sizes.watchers, publish)
        sm_time, sm_bytes = await fanout(
            sm, f"{SESSIONS}/WatchSession", watch, sizes.watchers, change
        )
        add(f"one change to {sizes.watchers:,} watchers: time / bare", "≤ 1.5", "x",
            lambda v: v <= 1.5, sm_time / bare_time)  # fmt: skip
        add("server memory per open watcher", "≤ 30 KiB", "KiB", lambda v: v <= 30,
            sm_bytes / 1024)  # fmt: skip
        add("bare server memory per open stream", "baseline", "KiB", None, bare_bytes / 1024)


async def reply_size(address: str, method: str, payloads: list[bytes]) -> int:
    """The mean size in bytes of the replies to ``payloads``."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, identity, identity)
        replies = [await call(payload) for payload in payloads]
    return round(statistics.mean(len(reply) for reply in replies))


async def cpu_run(sizes: Sizes, work: Path, attempt: int, results: Results) -> None:
    """One run of every CPU figure, on a fresh Session Manager and baseline."""
    calls = sizes.cpu_calls
    with running_pair(work / f"c{attempt}.db") as (base, sm):
        ids = await prepare(sm.address, IN_FLIGHT, connect=False, qr=True)
        live = await prepare(sm.address, IN_FLIGHT, connect=True, qr=False, prefix="live")

        async def measure(name: str, method: str, payload: Callable[[int], bytes],
                          limit: float | None = None) -> float:  # fmt: skip
            """The figure and, just before it, the baseline's: both see the same machine."""
            noop = await _per_call(base, NOOP, lambda n: b"", calls)
            server = await _per_call(sm, method, payload, calls)
            results.add_cpu(name, server, noop, limit)
            return server

        async def measure_sized(name: str, method: str, payloads: list[bytes],
                                limits: tuple[float | None, float | None]) -> None:  # fmt: skip
            """Against the no-op and against a bare reply of as many bytes, measured just before."""
            size = await reply_size(sm.address, method, payloads)
            results.reply_bytes.setdefault(name, []).append(size)
            sized = await _per_call(base, SIZED, lambda n: str(size).encode(), calls)
            server = await measure(name, method, cycle(payloads), limits[0])
            results.add_cpu(f"{name}, against a bare reply of as many bytes", server, sized,
                            limits[1])  # fmt: skip

        gets = [pb.GetSessionRequest(instance_id=i).SerializeToString() for i in ids]
        await measure_sized("GetSession", f"{SESSIONS}/GetSession", gets, (None, 1.10))
        qrs = [pb.RequestQRRequest(instance_id=i).SerializeToString() for i in ids]
        await measure_sized("RequestQR, valid QR (returns it again)", f"{SESSIONS}/RequestQR",
                            qrs, (None, 1.10))  # fmt: skip
        page = pb.ListSessionsRequest(page_size=50).SerializeToString()
        await measure_sized("ListSessions, page of 50", f"{SESSIONS}/ListSessions", [page],
                            (2.0, None))  # fmt: skip
        await measure("Send, new idempotency key (durable)", f"{SESSIONS}/Send",
                      lambda n: _send(live[n % len(live)], f"new-{n}"), 2.0)  # fmt: skip
        await measure("Send, repeated idempotency key (replay)", f"{SESSIONS}/Send",
                      lambda n: _send(live[n % len(live)], f"new-{n % len(live)}"))  # fmt: skip
        await measure("ReportError, one committed change (durable)", REPORT_ERROR,
                      lambda n: _fault(ids[n % len(ids)], n // len(ids)))  # fmt: skip

        await prepare(sm.address, 1, connect=False, qr=False, prefix="watched")
        watch = pb.WatchSessionRequest(instance_id="watched_0").SerializeToString()
        async with (
            grpc.aio.insecure_channel(base.address) as to_bare,
            grpc.aio.insecure_channel(sm.address) as to_sm,
        ):
            publish = to_bare.unary_unary(PUBLISH, identity, identity)
            report = to_sm.unary_unary(REPORT_ERROR, identity, identity)
            watchers, changes = sizes.cpu_watchers, sizes.cpu_changes
            bare_fanout = await fanout_cpu(base, WATCH, b"", watchers, changes,
                                           lambda n: publish(b"\x08\x02"))  # fmt: skip
            sm_fanout = await fanout_cpu(sm, f"{SESSIONS}/WatchSession", watch, watchers, changes,
                                         lambda n: report(_fault("watched_0", n)))  # fmt: skip
        results.add_cpu(f"WatchSession, one change to {watchers:,} watchers (per watcher)",
                        sm_fanout, bare_fanout)  # fmt: skip


async def startup_and_latency(sizes: Sizes, work: Path, results: Results) -> None:
    print(f"seeding {sizes.big:,} sessions", flush=True)
    small_db, big_db = work / "small.db", work / "big.db"
    await seed_database(small_db, 100)
    await seed_database(big_db, sizes.big)
    get = [pb.GetSessionRequest(instance_id=f"bench_{n}").SerializeToString() for n in range(100)]
    for _ in range(sizes.runs):
        with running(real(small_db)) as sm:
            small = await latency(sm.address, f"{SESSIONS}/GetSession", get, sizes.latency_calls)
        with running(real(big_db)) as sm:
            results.add(f"server start-up with {sizes.big:,} sessions, to serving", "≤ 1 s", "s",
                        lambda v: v <= 1, sm.started_in)  # fmt: skip
            results.add(f"server CPU time of that start-up ({sizes.big:,} sessions)", "—", "s",
                        None, sm.cpu_when_started)  # fmt: skip
            large = await latency(sm.address, f"{SESSIONS}/GetSession", get, sizes.latency_calls)
        results.add(f"GetSession latency, {sizes.big:,} sessions / 100", "≤ 1.1", "x",
                    lambda v: v <= 1.1, large / small)  # fmt: skip


def qr_rendering(sizes: Sizes, results: Results) -> None:
    for attempt in range(sizes.runs):
        started = time.perf_counter()
        for n in range(50):
            render_data_url(pairing_payload(f"bench_{attempt}", n))
        results.add("new QR PNG data URL", "≤ 3 ms", "ms", lambda v: v <= 3,
                    (time.perf_counter() - started) / 50 * 1000)  # fmt: skip


async def run(sizes: Sizes, work: Path) -> Results:
    results = Results()
    for attempt in range(sizes.runs):
        print(f"run {attempt + 1}/{sizes.runs}", flush=True)
        results.note_load()
        await throughput_run(sizes, work, attempt, results)
        results.note_load()
        await cpu_run(sizes, work, attempt, results)
    results.note_load()
    await startup_and_latency(sizes, work, results)
    results.note_load()
    qr_rendering(sizes, results)
    return results


def _versions() -> str:
    names = ("grpcio", "protobuf", "aiosqlite")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def load_average() -> str:
    """The machine's load over the last minute: how much else was running."""
    return Path("/proc/loadavg").read_text().split()[0]


def section(results: Results, heading: str, command: str, took: float, load: str) -> str:
    """The Markdown section one run writes: how it ran, then its two tables."""
    loads = results.loads or [float(load)]
    sizes = ", ".join(f"{name.split(',')[0]} {statistics.median(values):,.0f}"
                      for name, values in results.reply_bytes.items())  # fmt: skip
    return "\n".join([
        heading,
        "",
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {took:.0f} s.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- load average (1 min) {load} at the start, {load_average()} at the end; read between "
        f"the parts of the run: median {statistics.median(loads):.2f}, {min(loads):.2f} to "
        f"{max(loads):.2f} (other work on the machine; 2.0 fills both CPUs)",
        f"- Python {platform.python_version()}; {_versions()}",
        "- every server in its own process; the same client code loads the Session Manager and",
        "  the bare grpc.aio baseline (no-op unary, reply of N bytes, no-op fan-out); ratios are",
        "  taken run by run",
        "- start-up: from the process's start to its 'listening' line (it serves from then on)",
        "",
        "| figure | median | spread (min to max) | runs | target | met |",
        "|---|---|---|---|---|---|",
        *(figure.row() for figure in results.figures.values()),
        "",
        "Server CPU time per call: user + system time of the server process (all its threads,",
        f"from `/proc/PID/stat`) over a fixed number of calls, {IN_FLIGHT} in flight, after a",
        "warm-up; the baseline is the bare no-op unary call (the bare fan-out for WatchSession),",
        "or the bare call that answers as many bytes as the call measured (its rows say so),",
        f"measured just before each figure, in the same run. Reply bytes: {sizes or 'none'}.",
        "",
        "| call | server CPU per call | spread | bare baseline | / bare | spread | runs | target "
        "| met |",
        "|---|---|---|---|---|---|---|---|---|",
        *(figure.row() for figure in results.cpu.values()),
        "",
    ])  # fmt: skip


def _sections(text: str) -> list[str]:
    """The ``## `` sections of a results file, each with its heading."""
    return [part for part in re.split(r"(?m)^(?=## )", text) if part.startswith("## ")]


def write(output: Path, new: str) -> None:
    """Put ``new`` in ``output`` in place of the section with its heading, else at the end of its kind.

    The workers' sections (``bench.workers``) come last.
    """
    heading = new.split("\n", 1)[0]
    kept = [s for s in _sections(output.read_text() if output.exists() else "")
            if s.split("\n", 1)[0] != heading]  # fmt: skip
    workers = [s for s in kept if s.startswith(WORKERS_SECTION)]
    others = [s for s in kept if not s.startswith(WORKERS_SECTION)]
    if new.startswith(WORKERS_SECTION):
        workers.append(new)
    else:
        others.append(new)
    parts = [s.rstrip("\n") + "\n" for s in [*others, *workers]]
    output.write_text(f"{TITLE}\n" + "\n".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and smaller sizes (CI)")
    parser.add_argument("--label", help="name the run: its section is kept beside other runs'")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file to update")
    args = parser.parse_args()
    command = "python -m bench" + (" --quick" if args.quick else "")
    command += f' --label "{args.label}"' if args.label else ""
    heading = f"## {datetime.now(UTC):%Y-%m-%d}: {args.label}" if args.label else "## Latest run"
    started, load = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as work:
        results = asyncio.run(run(QUICK if args.quick else FULL, Path(work)))
    new = section(results, heading, command, time.perf_counter() - started, load)
    write(args.output, new)
    print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
