"""The event log's retention: events older than it are trimmed in the background.

Every ``every`` seconds on the server's clock, the oldest events older than
the retention are removed, a batch per transaction so that no commit waits
long behind a trim. What goes is always a prefix of the log; a stream whose
cursor points into it is told CURSOR_EXPIRED and starts again from the
current state.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Protocol

from service.clock import Clock

log = logging.getLogger(__name__)

#: Seconds between two trims, at most.
TRIM_EVERY = 60.0
#: Events removed per transaction.
BATCH = 5000


class Trimmable(Protocol):
    async def trim_events(self, before: datetime, batch: int) -> int: ...


class Retention:
    """Trims the log of events older than ``keep`` seconds, every so often."""

    def __init__(self, store: Trimmable, clock: Clock, keep: float) -> None:
        self._store = store
        self._clock = clock
        self.keep = keep
        self.every = min(TRIM_EVERY, keep / 4)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def trim(self) -> int:
        """Remove every event older than the retention; how many."""
        before = self._clock.now() - timedelta(seconds=self.keep)
        removed = 0
        while True:
            batch = await self._store.trim_events(before, BATCH)
            removed += batch
            if batch < BATCH:
                return removed

    async def _run(self) -> None:
        while True:
            await self._clock.sleep_until(self._clock.now() + timedelta(seconds=self.every))
            try:
                removed = await self.trim()
            except Exception as error:  # noqa: BLE001 - tried again at the next round
                log.warning("could not trim the event log: %s", error)
            else:
                if removed:
                    log.info(
                        "trimmed %d events older than %g s from the event log", removed, self.keep
                    )
