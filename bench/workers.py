"""``python -m bench.workers [--runs N] [--together K] [--label TEXT]``: memory of engine workers.

Each session that pairs or is connected costs one worker process. This starts
real workers the way the server does (``python -m service.engine.worker``,
driven over the worker protocol), ``--together`` of a kind at once as a server
runs many, brings them to a state and reads each one's memory at rest:

- RSS (``VmRSS``): every page it maps, shared or not;
- PSS (``Pss:`` of ``/proc/PID/smaps_rollup``): its private pages plus its share
  of each shared page (divided among the processes that map it): what the
  workers of a server add up to;
- USS (``Private_Clean`` + ``Private_Dirty``): its own pages only, what one more
  worker costs once many share the rest.

The states: a whatsmeow worker that has started and answered a heartbeat
(neonize is loaded when the first connection starts, not before); one after
its dial (neonize loaded, its client and device store open; offline here, the
dial fails as it does where WhatsApp cannot be reached): what a session costs;
a simulated worker started, and after its dial (a code shown). The baseline is
a bare Python interpreter blocked on its input. Sessions per 24 GiB divide
24 GiB by the PSS after the dial. Medians over the runs (and the workers of a
run); the table goes to bench/RESULTS.md after the other sections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.__main__ import RESULTS, WORKERS_SECTION, load_average, write
from service.engine.protocol import encode, read_frame
from sessionmanager.v1 import worker_pb2

Command = worker_pb2.WorkerCommand
Event = worker_pb2.WorkerEvent
Process = asyncio.subprocess.Process
MACHINE = 24 * 1024  # MiB: the machine the issue counts sessions on
BASELINE = "bare Python interpreter (baseline)"


@dataclass(frozen=True)
class Memory:
    """One process's memory at rest, in MiB."""

    rss: float
    pss: float
    uss: float

    @classmethod
    def of(cls, pid: int) -> Memory:
        """Read ``/proc/PID/smaps_rollup`` (RSS, PSS and the private pages)."""
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) / 1024  # kB
        private = fields["Private_Clean"] + fields["Private_Dirty"]
        return cls(rss=fields["Rss"], pss=fields["Pss"], uss=private)


@dataclass
class Figures:
    """Each state's measurements, every worker of every run."""

    by_state: dict[str, list[Memory]] = field(default_factory=dict)

    def add(self, state: str, measured: list[Memory]) -> None:
        self.by_state.setdefault(state, []).extend(measured)
        pss = statistics.median(m.pss for m in measured)
        print(f"  {state}: PSS {pss:.1f} MiB (median of {len(measured)})", flush=True)


async def _settle(processes: list[Process]) -> list[Memory]:
    await asyncio.sleep(0.5)  # let start-up garbage go before reading
    return [Memory.of(process.pid) for process in processes]


async def _stop(processes: list[Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def bare_python(together: int) -> list[Memory]:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE
        )
        for _ in range(together)
    ]
    try:
        return await _settle(processes)
    finally:
        await _stop(processes)


async def _call(process: Process, command: Command, ident: int) -> Event.Reply:
    assert process.stdin is not None
    assert process.stdout is not None
    command.id = ident
    process.stdin.write(encode(command))
    await process.stdin.drain()
    while True:
        frame = await asyncio.wait_for(read_frame(process.stdout), 60)
        assert frame is not None, "the worker exited"
        event = Event.FromString(frame)
        if event.WhichOneof("event") == "reply" and event.reply.id == ident:
            return event.reply


async def _start_worker(engine: str, device_dir: Path) -> Process:
    await asyncio.to_thread(device_dir.mkdir, parents=True, exist_ok=True)  # as the supervisor does
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.engine.worker",
        f"--engine={engine}",
        f"--instance-id=bench_{device_dir.name}",
        "--session-id=1",
        f"--credentials={device_dir}",
        f"--parent-pid={os.getpid()}",
        "--log-level=warning",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _bring_up(process: Process, engine: str, dial: bool) -> None:
    """A heartbeat, then (``dial``) the pairing's dial: it fails offline for whatsmeow."""
    await _call(process, Command(ping=Command.Ping()), 1)
    if dial:
        reply = await _call(process, Command(start_pairing=Command.StartPairing()), 2)
        if engine == "whatsmeow":
            assert reply.error_code == "DIAL_FAILED", f"expected an offline dial, got {reply}"
        else:
            assert not reply.error_code, f"the simulated dial failed: {reply}"


async def workers(engine: str, folder: Path, dial: bool, together: int) -> list[Memory]:
    """``together`` workers of ``engine`` at once, each brought up, then read."""
    processes = [await _start_worker(engine, folder / f"w{n}") for n in range(together)]
    try:
        await asyncio.gather(*(_bring_up(p, engine, dial) for p in processes))
        return await _settle(processes)
    finally:
        await _stop(processes)


async def run(runs: int, together: int, work: Path) -> Figures:
    figures = Figures()
    states: dict[str, Callable[[Path], Awaitable[list[Memory]]]] = {
        BASELINE: lambda folder: bare_python(together),
        "whatsmeow worker, started": lambda folder: workers("whatsmeow", folder, False, together),
        "whatsmeow worker after its dial (offline)": lambda folder: workers(
            "whatsmeow", folder, True, together
        ),
        "simulated worker, started": lambda folder: workers("simulated", folder, False, together),
        "simulated worker after its dial (a code shown)": lambda folder: workers(
            "simulated", folder, True, together
        ),
    }
    for attempt in range(runs):
        print(f"run {attempt + 1}/{runs}", flush=True)
        for number, (state, measure) in enumerate(states.items()):
            figures.add(state, await measure(work / f"r{attempt}s{number}"))
    return figures


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} MiB ({min(values):.1f} to {max(values):.1f})"


def table(figures: Figures, heading: str, together: int, runs: int, load: str) -> str:
    lines = [
        heading,
        "",
        f"Written by `python -m bench.workers` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC:",
        f"{runs} runs, {together} workers of a kind at once, each read at rest (offline: a",
        "whatsmeow dial fails as it does where WhatsApp cannot be reached); load average",
        f"(1 min) {load} at the start, {load_average()} at the end. One worker per paired or",
        "connected session. PSS is the worker's share of the memory (shared pages divided",
        f"among the processes that map them: the {together} workers, and anything else on",
        "the machine that maps the same files); USS its private pages alone, what one more",
        "worker costs. Sessions per 24 GiB: 24 GiB / PSS after the dial (the best-known peer",
        "publishes about 500 per server for its Go engine, about 50 MB each).",
        "",
        "| worker | RSS | PSS | USS | sessions per 24 GiB (by PSS) | workers read |",
        "|---|---|---|---|---|---|",
    ]
    for state, measured in figures.by_state.items():
        pss = [m.pss for m in measured]
        per_machine = f"{MACHINE / statistics.median(pss):,.0f}" if "dial" in state else "—"
        lines.append(
            f"| {state} | {_cell([m.rss for m in measured])} | {_cell(pss)} | "
            f"{_cell([m.uss for m in measured])} | {per_machine} | {len(measured)} |"
        )
    return "\n".join([*lines, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--together", type=int, default=8, help="workers of a kind at once")
    parser.add_argument("--label", help="name the run: its section is kept beside other runs'")
    parser.add_argument("--output", type=Path, default=RESULTS, help="the results file to update")
    args = parser.parse_args()
    heading = f"{WORKERS_SECTION}: memory per worker"
    heading += f", {args.label}" if args.label else ""
    load = load_average()
    with tempfile.TemporaryDirectory() as work:
        figures = asyncio.run(run(args.runs, args.together, Path(work)))
    new = table(figures, heading, args.together, args.runs, load)
    write(args.output, new)
    print(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
