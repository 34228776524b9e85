"""The CPU time a process spends, read from ``/proc``: the steady figure on a shared machine.

Throughput on a small machine moves with whatever else runs on it, the load
generator included; the CPU time the server itself spends on a call barely
does. ``cpu_per_call`` reads the server's CPU time before and after a fixed
number of calls and divides.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The user plus system CPU seconds ``pid`` has used so far, all its threads included.

    Fields 14 and 15 of ``/proc/PID/stat`` (utime, stime) count the whole thread
    group, threads that already exited included (proc(5)). Field 2, the command
    name, may hold spaces and parentheses, so the fields are counted from its last
    closing parenthesis.
    """
    after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(after_name[11]), int(after_name[12])  # fields 14 and 15
    return (utime + stime) / TICKS_PER_SECOND


async def cpu_during(pid: int, work: Awaitable[object]) -> float:
    """The CPU seconds ``pid`` spends while ``work`` runs to its end."""
    before = cpu_seconds(pid)
    await work
    return cpu_seconds(pid) - before


async def cpu_per_call(
    pid: int, call: Callable[[int], Awaitable[object]], calls: int, in_flight: int = 1
) -> float:
    """The CPU seconds ``pid`` spends per call over ``call(0)`` … ``call(calls - 1)``.

    ``in_flight`` calls are kept outstanding at a time. Warm the server up before:
    every CPU second spent while the calls run is charged to them.
    """
    numbers = iter(range(calls))  # shared: each caller takes the next number

    async def caller() -> None:
        for n in numbers:
            await call(n)

    callers = asyncio.gather(*(caller() for _ in range(min(in_flight, calls))))
    return await cpu_during(pid, callers) / calls
