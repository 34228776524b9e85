"""What the event log adds to a committed change: the server's CPU time per call, with and without.

Run with ``python -m bench.event_log`` (``--quick``: fewer and shorter runs).
Three server processes run side by side: the bare grpc.aio no-op
(``bench.bare``), the Session Manager as it is, and the same Session Manager
with its event log switched off (this module with ``--serve-without-log``,
which replaces, in that process only, the changes a write notes and their
append by nothing). Each run measures, one after the other, the bare no-op
and then each call on both Session Managers, by the server's user + system
CPU time from ``/proc`` around a fixed number of calls (``bench.cpu``); the
ratio with / without the log is taken run by run. The report goes into
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from bench.__main__ import IN_FLIGHT, REPORT_ERROR, _fault, _per_call, _send, load_average
from bench.bare import NOOP
from bench.servers import SESSIONS, Server, bare, launch, prepare, real_command

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADING = "## Event log: what it adds to a committed change"
TARGET = 1.15


@dataclass(frozen=True)
class Sizes:
    runs: int
    calls: int


FULL = Sizes(runs=7, calls=2000)
QUICK = Sizes(runs=2, calls=300)


@dataclass
class Figure:
    """One call's server CPU per call on both Session Managers, run by run."""

    name: str
    logged: list[float] = field(default_factory=list)
    unlogged: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.logged, self.unlogged, strict=True)]


def serve_without_log(argv: list[str]) -> int:
    """``session-manager`` with nothing noted nor appended to the event log: the baseline."""
    from service.__main__ import main
    from service.store import sql

    async def append_nothing(db: object, changes: object) -> list[object]:
        return []

    def nothing(*args: object) -> None:
        return None

    sql.append_events = append_nothing  # type: ignore[assignment]
    sql.events = SimpleNamespace(  # type: ignore[assignment]
        session_updated=nothing, session_deleted=nothing, message_updated=nothing
    )
    return main(argv)


async def measure(sizes: Sizes, work: Path) -> list[Figure]:
    database, without = work / "logged.db", work / "unlogged.db"
    base = bare()
    logged = launch(real_command(database))
    command = real_command(without)
    unlogged = launch(
        [sys.executable, "-m", "bench.event_log", "--serve-without-log", *command[1:]]
    )
    try:
        return await _runs(sizes, base, logged, unlogged)
    finally:
        for server in (unlogged, logged, base):
            server.stop()


async def _runs(sizes: Sizes, base: Server, logged: Server, unlogged: Server) -> list[Figure]:
    loads: list[tuple[Figure, str, Callable[[list[str]], Callable[[int], bytes]]]] = [
        (
            Figure("ReportError, one committed change (durable)"),
            REPORT_ERROR,
            lambda ids: lambda n: _fault(ids[n % len(ids)], n // len(ids)),
        ),
        (
            Figure("Send, new idempotency key (two committed changes)"),
            f"{SESSIONS}/Send",
            lambda live: lambda n: _send(live[n % len(live)], f"key-{n}"),
        ),
    ]
    ready = {}
    for server in (logged, unlogged):
        ids = await prepare(server.address, IN_FLIGHT, connect=False, qr=True)
        live = await prepare(server.address, IN_FLIGHT, connect=True, qr=False, prefix="live")
        ready[server.pid] = (ids, live)
    # Every Send of every run has a key of its own, and each ReportError changes its
    # session (the codes alternate per round over the sessions): calls are numbered on.
    step = 2 * IN_FLIGHT * (sizes.calls // IN_FLIGHT + 1)
    first = 0
    for run in range(sizes.runs):
        for figure, method, payloads in loads:
            figure.bare.append(await _per_call(base, NOOP, lambda n: b"", sizes.calls))
            # With, without, without, with: a machine whose load drifts during the run
            # weighs on both alike.
            spent: dict[int, list[float]] = {logged.pid: [], unlogged.pid: []}
            for server in (logged, unlogged, unlogged, logged):
                ids, live = ready[server.pid]
                payload = _from(payloads(ids if method == REPORT_ERROR else live), first)
                spent[server.pid].append(await _per_call(server, method, payload, sizes.calls))
                first += step
            figure.logged.append(statistics.mean(spent[logged.pid]))
            figure.unlogged.append(statistics.mean(spent[unlogged.pid]))
        print(f"run {run + 1}/{sizes.runs} done", file=sys.stderr, flush=True)
    return [figure for figure, _, _ in loads]


def _from(payload: Callable[[int], bytes], first: int) -> Callable[[int], bytes]:
    """``payload`` numbered from ``first``."""
    return lambda n: payload(first + n)


def _us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.0f} µs"


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{min(values) * scale:.{digits}f} to {max(values) * scale:.{digits}f}"


def report(figures: list[Figure], sizes: Sizes, seconds: float, load: str) -> str:
    rows = []
    for figure in figures:
        ratio = statistics.median(figure.ratios())
        met = "yes" if ratio <= TARGET else "**no**"
        rows.append(
            f"| {figure.name} | {_us(figure.logged)} | {_us(figure.unlogged)} | "
            f"{_us(figure.bare)} | {ratio:.2f} x | {_spread(figure.ratios())} | "
            f"{(ratio - 1) * 100:+.0f} % | {met if figure is figures[0] else '—'} |"
        )
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            HEADING,
            "",
            f"Written by `python -m bench.event_log` on {now} in {seconds:.0f} s "
            f"(load average {load} before it).",
            "",
            f"- server CPU time (user + system, `/proc/PID/stat`) over {sizes.calls:,} calls, "
            f"{IN_FLIGHT} in flight, after a warm-up; {sizes.runs} runs, each measuring the "
            "bare no-op, then the call on the Session Manager with its log, without it, "
            "without it and with it again (the mean of each pair)",
            "- without the log: the same code, with the changes a write notes and their append "
            "replaced by nothing (`--serve-without-log`, a benchmark's switch, not a setting)",
            "- target: the log adds at most 15 % to a committed change (ReportError)",
            "",
            "| call | with the log | without | bare no-op | with / without | spread | "
            "the log adds | target met |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def write(section: str, path: Path = RESULTS) -> None:
    """Replace this benchmark's section of the results file, or add it before the workers'."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(HEADING)
    if start >= 0:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    workers = text.find("## Engine workers")
    if workers < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        text = text[:workers] + section + "\n" + text[workers:]
    path.write_text(text)


def main() -> int:
    if sys.argv[1:2] == ["--serve-without-log"]:
        return serve_without_log(sys.argv[2:])
    parser = argparse.ArgumentParser(prog="python -m bench.event_log", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    started, load = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory() as work:
        figures = asyncio.run(measure(sizes, Path(work)))
    section = report(figures, sizes, time.perf_counter() - started, load)
    write(section, args.output)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
