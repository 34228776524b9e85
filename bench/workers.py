"""``python -m bench.workers [--runs N]``: memory of engine workers, against a bare Python.

Each session that pairs or is connected costs one worker process. This starts
real workers the way the server does (``python -m service.engine.worker``, driven
over the worker protocol) and reads their resident memory (VmRSS) at rest:

- a whatsmeow worker that has started and answered a heartbeat (neonize is
  loaded when the first connection starts, not before);
- a whatsmeow worker after a failed dial (neonize loaded, its client and
  device store open): what a session costs while WhatsApp is unreachable;
- a simulated worker at rest.

The baseline is a bare Python interpreter blocked on its input, measured in the
same run. Medians over the runs; appends its table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from service.engine.protocol import encode, read_frame
from sessionmanager.v1 import worker_pb2

RESULTS = Path(__file__).parent / "RESULTS.md"
Command = worker_pb2.WorkerCommand
Event = worker_pb2.WorkerEvent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _settle(pid: int) -> float:
    await asyncio.sleep(0.5)  # let start-up garbage go before reading
    return rss_mib(pid)


async def bare_python() -> float:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE
    )
    try:
        return await _settle(process.pid)
    finally:
        process.kill()
        await process.wait()


async def _call(process: asyncio.subprocess.Process, command: Command, ident: int) -> Event.Reply:
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


async def worker(engine: str, device_dir: Path, dial: bool) -> float:
    await asyncio.to_thread(device_dir.mkdir, parents=True, exist_ok=True)  # as the supervisor does
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.engine.worker",
        f"--engine={engine}",
        "--instance-id=bench",
        "--session-id=1",
        f"--credentials={device_dir}",
        f"--parent-pid={os.getpid()}",
        "--log-level=warning",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _call(process, Command(ping=Command.Ping()), 1)
        if dial:
            reply = await _call(process, Command(start_pairing=Command.StartPairing()), 2)
            assert reply.error_code == "DIAL_FAILED", f"expected an offline dial, got {reply}"
        return await _settle(process.pid)
    finally:
        process.kill()
        await process.wait()


async def run(runs: int, work: Path) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for attempt in range(runs):
        print(f"run {attempt + 1}/{runs}", flush=True)
        measured = {
            "bare Python interpreter (baseline)": await bare_python(),
            "whatsmeow worker, started": await worker("whatsmeow", work / f"s{attempt}", False),
            "whatsmeow worker after a failed dial": await worker(
                "whatsmeow", work / f"d{attempt}", True
            ),
            "simulated worker, started": await worker("simulated", work / f"m{attempt}", False),
        }
        for name, value in measured.items():
            figures.setdefault(name, []).append(value)
            print(f"  {name}: {value:.1f} MiB", flush=True)
    return figures


def table(figures: dict[str, list[float]]) -> list[str]:
    base = statistics.median(figures["bare Python interpreter (baseline)"])
    lines = [
        "## Engine workers: resident memory per worker",
        "",
        "Written by `python -m bench.workers` (offline: the dial fails as it does on a",
        "machine that cannot reach WhatsApp). One worker per paired or connected session.",
        "",
        "| worker | median RSS | spread | runs | / bare Python |",
        "|---|---|---|---|---|",
    ]
    for name, values in figures.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median:.1f} MiB | {min(values):.1f} to {max(values):.1f} | "
            f"{len(values)} | {median / base:.2f} x |"
        )
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        figures = asyncio.run(run(args.runs, Path(work)))
    lines = table(figures)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "## Engine workers"
    if marker in text:
        text = text[: text.index(marker)]
    RESULTS.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
