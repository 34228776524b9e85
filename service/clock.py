"""Time, injectable: the real clock in production, a manual one in tests.

Deadlines that guard ownership (a node's leases, its workers' ``Hold``) are
counted on ``boottime()`` instead: it is system-wide, so a server and its
workers read the same clock, and unlike ``time.monotonic()`` it keeps counting
while the machine is suspended, so a deadline passes during a suspend as it
does on every other machine.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


def boottime() -> float:
    """Seconds on ``CLOCK_BOOTTIME``: monotonic, system-wide, and counting across a suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""

    async def sleep_until(self, when: datetime) -> None:
        """Return once ``now() >= when``."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        while (delay := (when - self.now()).total_seconds()) > 0:  # noqa: ASYNC110 - a timer
            await asyncio.sleep(delay)


class ManualClock:
    """A clock that moves only when told to; sleepers wake in deadline order."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 4, 12, 0, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        if when <= self._now:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose deadline passed, in order."""
        target = self._now + timedelta(seconds=seconds)
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not future.done():
                future.set_result(None)
            for _ in range(20):  # let the woken task run its follow-up work
                await asyncio.sleep(0)
        self._now = target
