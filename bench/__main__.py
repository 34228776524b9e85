"""``python -m bench [--quick]``: run the benchmarks and write bench/RESULTS.md.

Every server runs in its own process: the Session Manager (``session-manager
serve``) and the baseline (``bench/bare.py``, a bare grpc.aio server). Both
are loaded by the same client code from this process, with requests and
responses passed as bytes so the client costs the same for both. Figures are
medians of several runs, ratios are taken run by run against the baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import grpc

from bench.bare import NOOP, PUBLISH, WATCH
from service.domain.qr import render_data_url
from service.engine.simulated import pairing_payload
from service.store.sqlite import Store
from sessionmanager.v1 import engine_service_pb2 as engine
from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import simulator_service_pb2 as sim

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "RESULTS.md"
IN_FLIGHT = 64


def _identity(value: bytes) -> bytes:
    return value


@dataclass
class Server:
    process: subprocess.Popen[str]
    address: str
    started_in: float

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _launch(command: list[str]) -> Server:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on port" not in line:
        raise RuntimeError(f"{command[0]} did not start: {line!r}")
    return Server(
        process, f"127.0.0.1:{line.rsplit(' ', 1)[1].strip()}", time.perf_counter() - started
    )


def real(database: Path, *flags: str) -> Server:
    return _launch(
        [str(BIN / "session-manager"), "serve", "--address=127.0.0.1:0", f"--database={database}", "--engine=simulated",
         "--log-level=warning", "--send-rate=0", "--qr-first-seconds=86400",
         "--max-watchers-per-session=100000", "--max-watchers=100000", *flags]
    )  # fmt: skip


def bare() -> Server:
    return _launch([sys.executable, "-m", "bench.bare"])


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


async def unary(address: str, method: str, payload: bytes) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, _identity, _identity)
        return bytes(await call(payload, timeout=30))


async def qps(address: str, method: str, payloads: list[bytes], seconds: float) -> float:
    """Calls per second with IN_FLIGHT calls always outstanding."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, _identity, _identity)
        await asyncio.gather(*(call(p) for p in payloads[:IN_FLIGHT]))  # warm up
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            nonlocal done
            payload = payloads[n % len(payloads)]
            while time.perf_counter() < stop:
                await call(payload)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(IN_FLIGHT)))
        return done / (time.perf_counter() - started)


async def latency(address: str, method: str, payloads: list[bytes], calls: int) -> float:
    """Median seconds of one call, one at a time."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, _identity, _identity)
        for payload in payloads[:50]:
            await call(payload)
        times = []
        for n in range(calls):
            started = time.perf_counter()
            await call(payloads[n % len(payloads)])
            times.append(time.perf_counter() - started)
        return statistics.median(times)


async def fanout(
    address: str, method: str, payload: bytes, watchers: int, trigger: Callable[[], Awaitable[object]],
    rss: Callable[[], int],
) -> tuple[float, float]:  # fmt: skip
    """(seconds until every watcher has one change, server bytes per open watcher)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(8)]
    try:
        before = rss()
        streams = [
            channels[n % len(channels)].unary_stream(method, _identity, _identity)(payload)
            for n in range(watchers)
        ]
        await asyncio.gather(*(s.read() for s in streams))  # each has its current state
        await asyncio.sleep(0.5)
        per_watcher = (rss() - before) / watchers
        started = time.perf_counter()
        await trigger()
        await asyncio.gather(*(s.read() for s in streams))
        elapsed = time.perf_counter() - started
        for stream in streams:
            stream.cancel()
        return elapsed, per_watcher
    finally:
        for channel in channels:
            await channel.close(None)


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


async def prepare(
    address: str, count: int, connect: bool, qr: bool, prefix: str = "load"
) -> list[str]:
    ids = [f"{prefix}_{n}" for n in range(count)]
    for iid in ids:
        await unary(address, "/sessionmanager.v1.SessionService/CreateSession",
                    pb.CreateSessionRequest(instance_id=iid).SerializeToString())  # fmt: skip
        if qr or connect:
            await unary(address, "/sessionmanager.v1.SessionService/RequestQR",
                        pb.RequestQRRequest(instance_id=iid).SerializeToString())  # fmt: skip
        if connect:
            await unary(address, "/sessionmanager.v1.SimulatorService/ScanQR",
                        sim.ScanQRRequest(instance_id=iid).SerializeToString())  # fmt: skip
    return ids


@dataclass
class Figure:
    name: str
    target: str
    values: list[float]
    unit: str
    met: Callable[[float], bool]

    def row(self) -> str:
        median = statistics.median(self.values)
        spread = f"{min(self.values):.3g} to {max(self.values):.3g}"
        return (
            f"| {self.name} | {median:.3g} {self.unit} | {spread} | {len(self.values)} | "
            f"{self.target} | {'yes' if self.met(median) else '**no**'} |"
        )


async def run(quick: bool, work: Path) -> list[Figure]:
    runs = 2 if quick else 5
    seconds = 1.5 if quick else 3.0
    watchers = 2_000 if quick else 10_000
    big = 20_000 if quick else 100_000
    figures: dict[str, Figure] = {}

    def add(name: str, target: str, unit: str, met: Callable[[float], bool], value: float) -> None:
        figures.setdefault(name, Figure(name, target, [], unit, met)).values.append(value)
        print(f"  {name}: {value:.4g} {unit}", flush=True)

    for attempt in range(runs):
        print(f"run {attempt + 1}/{runs}", flush=True)
        with running(bare()) as base, running(real(work / f"r{attempt}.db")) as sm:
            noop = await qps(base.address, NOOP, [b""], seconds)
            add("bare no-op unary QPS (64 in flight)", "baseline", "QPS", lambda v: True, noop)
            ids = await prepare(sm.address, IN_FLIGHT, connect=False, qr=True)
            get = [pb.GetSessionRequest(instance_id=i).SerializeToString() for i in ids]
            got = await qps(
                sm.address, "/sessionmanager.v1.SessionService/GetSession", get, seconds
            )
            add("GetSession QPS / bare", "≥ 0.85", "x", lambda v: v >= 0.85, got / noop)
            noop = await qps(base.address, NOOP, [b""], seconds)
            want = [pb.RequestQRRequest(instance_id=i).SerializeToString() for i in ids]
            qr = await qps(sm.address, "/sessionmanager.v1.SessionService/RequestQR", want, seconds)
            add("RequestQR (valid QR) QPS / bare", "≥ 0.85", "x", lambda v: v >= 0.85, qr / noop)

            live = await prepare(sm.address, IN_FLIGHT, connect=True, qr=False, prefix="live")
            send = [
                pb.SendRequest(instance_id=i, to="+5491100000000", text="hola").SerializeToString()
                for i in live
            ]
            sent = await qps(sm.address, "/sessionmanager.v1.SessionService/Send", send, seconds)
            add("Send accepted per second (durable)", "≥ 2,000", "/s", lambda v: v >= 2000, sent)

            codes = [
                engine.ReportErrorRequest(instance_id=i, code=f"FAULT_{n % 2}", message="m").SerializeToString()
                for n, i in enumerate(live * 2)
            ]  # fmt: skip
            # Each report alternates its session between two faults: one committed change each.
            changes = await qps(
                sm.address, "/sessionmanager.v1.EngineService/ReportError", codes, seconds
            )
            add(
                "committed state changes per second (durable)",
                "≥ 2,000",
                "/s",
                lambda v: v >= 2000,
                changes,
            )

        with running(bare()) as base, running(real(work / f"f{attempt}.db")) as sm:
            await prepare(sm.address, 1, connect=False, qr=False)
            watch = pb.WatchSessionRequest(instance_id="load_0").SerializeToString()

            async def change() -> object:
                request = engine.ReportErrorRequest(instance_id="load_0", code="FAULT", message="m")
                return await unary(
                    sm.address,
                    "/sessionmanager.v1.EngineService/ReportError",
                    request.SerializeToString(),
                )

            async def publish() -> object:
                return await unary(base.address, PUBLISH, b"\x08\x02")

            bare_time, bare_bytes = await fanout(
                base.address, WATCH, b"", watchers, publish, base.rss
            )
            sm_time, sm_bytes = await fanout(
                sm.address, "/sessionmanager.v1.SessionService/WatchSession", watch, watchers, change, sm.rss
            )  # fmt: skip
            add(
                f"one change to {watchers:,} watchers: time / bare",
                "≤ 1.5",
                "x",
                lambda v: v <= 1.5,
                sm_time / bare_time,
            )
            add(
                "server memory per open watcher",
                "≤ 30 KiB",
                "KiB",
                lambda v: v <= 30,
                sm_bytes / 1024,
            )
            add(
                "bare server memory per open stream",
                "baseline",
                "KiB",
                lambda v: True,
                bare_bytes / 1024,
            )

    print(f"seeding {big:,} sessions", flush=True)
    small_db, big_db = work / "small.db", work / "big.db"
    await seed_database(small_db, 100)
    await seed_database(big_db, big)
    for _ in range(runs):
        get = [
            pb.GetSessionRequest(instance_id=f"bench_{n}").SerializeToString() for n in range(100)
        ]
        with running(real(small_db)) as sm:
            small = await latency(
                sm.address, "/sessionmanager.v1.SessionService/GetSession", get, 2000
            )
        with running(real(big_db)) as sm:
            add(
                f"server start-up with {big:,} sessions",
                "≤ 2 s",
                "s",
                lambda v: v <= 2,
                sm.started_in,
            )
            large = await latency(
                sm.address, "/sessionmanager.v1.SessionService/GetSession", get, 2000
            )
        add(
            f"GetSession latency, {big:,} sessions / 100",
            "≤ 1.1",
            "x",
            lambda v: v <= 1.1,
            large / small,
        )

    for attempt in range(runs):
        started = time.perf_counter()
        for n in range(50):
            render_data_url(pairing_payload(f"bench_{attempt}", n))
        add(
            "new QR PNG data URL",
            "≤ 5 ms",
            "ms",
            lambda v: v <= 5,
            (time.perf_counter() - started) / 50 * 1000,
        )
    return list(figures.values())


def _versions() -> str:
    names = ("grpcio", "protobuf", "aiosqlite", "qrcode")
    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def write(figures: list[Figure], quick: bool, took: float) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python -m bench{' --quick' if quick else ''}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {took:.0f} s.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- Python {platform.python_version()}; {_versions()}",
        "- every server in its own process; the same client code loads the Session Manager and",
        "  the bare grpc.aio baseline (no-op unary, no-op fan-out); ratios are taken run by run",
        "",
        "| figure | median | spread (min to max) | runs | target | met |",
        "|---|---|---|---|---|---|",
        *(figure.row() for figure in figures),
        "",
    ]
    previous = RESULTS.read_text() if RESULTS.exists() else ""
    workers = previous.find("## Engine workers")  # written by `python -m bench.workers`
    kept = "\n" + previous[workers:] if workers >= 0 else ""
    RESULTS.write_text("\n".join(lines) + kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and smaller sizes")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        figures = asyncio.run(run(args.quick, Path(work)))
    write(figures, args.quick, time.perf_counter() - started)
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
