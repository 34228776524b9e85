"""GetSession over HTTP against a bare Starlette route: the server's CPU time per call.

Run with ``python -m bench.http``. Two server processes run side by side: the
Session Manager (``GET /api/session-manager/sessions/{instance_id}``) and a
bare Starlette app with one route that returns the same bytes, served by the
same embedded uvicorn (``service.api.http.server``). Each run reads each
server's user + system CPU time from ``/proc`` around a fixed number of calls
(``bench.cpu``); the report gives the median and spread of 5 runs, with
GetSession over gRPC on the same server for comparison, and is written into
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.__main__ import write
from bench.cpu import cpu_per_call
from bench.servers import identity
from service.api.http.server import HttpServer
from sessionmanager.v1 import session_service_pb2 as pb

RUNS = 5
CALLS = 2_000
WARMUP = 300
IN_FLIGHT = 16
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).parent / "RESULTS.md"
HEADING = "## HTTP API: server CPU time per call"
SESSION = "bench_http"


def bare_app(body: bytes) -> Starlette:
    """One route, as small as Starlette allows, answering ``body``."""

    async def read(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/bare/{instance_id}", read)])


async def serve_bare(body: bytes) -> None:
    server = HttpServer.start(bare_app(body), "127.0.0.1:0", grace=1)
    print(f"bare http listening on port {server.port}", flush=True)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.close()


class Process:
    """A server subprocess and the ports it announced."""

    def __init__(self, command: list[str], lines: int) -> None:
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        self.ports = []
        for _ in range(lines):
            line = self.process.stdout.readline()
            if "listening on port" not in line:
                self.stop()
                raise RuntimeError(f"{command[0]} did not start")
            self.ports.append(int(line.rsplit(" ", 1)[1]))

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def _spread(values: list[float], scale: float, digits: int = 0) -> tuple[str, str]:
    median = statistics.median(values) * scale
    return (
        f"{median:.{digits}f}",
        f"{min(values) * scale:.{digits}f} to {max(values) * scale:.{digits}f}",
    )


async def measure(database: Path) -> dict[str, list[float]]:
    sm = Process(
        [str(BIN / "session-manager"), "serve", "--address=127.0.0.1:0",
         "--http-address=127.0.0.1:0", f"--database={database}", "--engine=simulated",
         "--log-level=warning"],
        lines=2,
    )  # fmt: skip
    try:
        grpc_port, http_port = sm.ports
        api = f"http://127.0.0.1:{http_port}/api/session-manager"
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(limits=limits) as client:
            created = await client.post(f"{api}/sessions", json={"instance_id": SESSION})
            created.raise_for_status()
            body = (await client.get(f"{api}/sessions/{SESSION}")).content
            bare = Process([sys.executable, "-m", "bench.http", "--serve-bare", body.decode()], 1)
            try:
                return await _runs(client, sm, bare, api, grpc_port)
            finally:
                bare.stop()
    finally:
        sm.stop()


async def _runs(
    client: httpx.AsyncClient, sm: Process, bare: Process, api: str, grpc_port: int
) -> dict[str, list[float]]:
    bare_url = f"http://127.0.0.1:{bare.ports[0]}/bare/{SESSION}"
    session_url = f"{api}/sessions/{SESSION}"

    def http_get(url: str) -> Callable[[int], Awaitable[object]]:
        async def call(_: int) -> object:
            response = await client.get(url)
            response.raise_for_status()
            return response

        return call

    figures: dict[str, list[float]] = {"bare": [], "http": [], "grpc": []}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        get = channel.unary_unary(
            "/sessionmanager.v1.SessionService/GetSession", identity, identity
        )
        request = pb.GetSessionRequest(instance_id=SESSION).SerializeToString()

        async def grpc_get(_: int) -> object:
            return await get(request, timeout=30)

        loads = (
            ("bare", bare.pid, http_get(bare_url)),
            ("http", sm.pid, http_get(session_url)),
            ("grpc", sm.pid, grpc_get),
        )
        for pid, call in ((p, c) for _, p, c in loads):
            await cpu_per_call(pid, call, WARMUP, IN_FLIGHT)
        for run in range(RUNS):
            for name, pid, call in loads:
                figures[name].append(await cpu_per_call(pid, call, CALLS, IN_FLIGHT))
            print(f"run {run + 1}/{RUNS} done", file=sys.stderr, flush=True)
    return figures


def report(
    figures: dict[str, list[float]],
    seconds: float,
    load: tuple[float, float, float],
    heading: str = HEADING,
) -> str:
    http_over_bare = [h / b for h, b in zip(figures["http"], figures["bare"], strict=True)]
    http_over_grpc = [h / g for h, g in zip(figures["http"], figures["grpc"], strict=True)]
    rows = [
        ("bare Starlette route, same uvicorn (baseline)", *_spread(figures["bare"], 1e6), "µs"),
        ("GetSession over HTTP", *_spread(figures["http"], 1e6), "µs"),
        ("GetSession over gRPC, same server", *_spread(figures["grpc"], 1e6), "µs"),
        ("GetSession over HTTP / bare route", *_spread(http_over_bare, 1, 2), "x"),
        ("GetSession over HTTP / over gRPC", *_spread(http_over_grpc, 1, 2), "x"),
    ]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        heading,
        "",
        f"Written by `python -m bench.http` on {now} in {seconds:.0f} s "
        f"(load average {', '.join(f'{x:.1f}' for x in load)} before it).",
        "",
        f"- machine: {platform.machine()}, Python {platform.python_version()}",
        f"- server CPU time (user + system, `/proc/PID/stat`) over {CALLS:,} calls, "
        f"{IN_FLIGHT} in flight on keep-alive connections, after {WARMUP} warm-up calls; "
        f"{RUNS} runs, each measuring the three loads one after the other",
        "- the bare route answers the same bytes as GetSession, from the same embedded uvicorn",
        "",
        "| figure | median | spread (min to max) | unit |",
        "|---|---|---|---|",
        *(f"| {name} | {median} | {spread} | {unit} |" for name, median, spread, unit in rows),
        "",
    ]
    return "\n".join(lines)


def _load() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__)
    parser.add_argument("--serve-bare", metavar="BODY", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file")
    parser.add_argument("--label", help="name the run: its section is kept beside other runs'")
    args = parser.parse_args()
    if args.serve_bare is not None:
        asyncio.run(serve_bare(args.serve_bare.encode()))
        return
    started, load = time.perf_counter(), _load()
    with tempfile.TemporaryDirectory() as scratch:
        figures = asyncio.run(measure(Path(scratch) / "bench.db"))
    heading = f"{HEADING}, {args.label}" if args.label else HEADING
    section = report(figures, time.perf_counter() - started, load, heading)
    write(args.output, section)  # in place of the section with its heading, else at the end
    print(section)


if __name__ == "__main__":
    main()
