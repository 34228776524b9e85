"""List-wide streams of the event log: the current state or a resume point, then every event.

One ``EventStreams`` per server follows the log. The store hands it the events
of each transaction this server commits (``appended``); with several nodes,
the database's notifications say that another node appended (``wake``), and it
reads the log after the last event it has seen. It offers each event, in
order, to every open ``EventStream``.

A stream keeps a bounded queue. A reader that falls behind is no longer
offered events: it reads them from the log itself, page by page, until it has
caught up, and is offered them again. So a slow reader never makes the
server's memory grow and never holds anybody back, and still gets every event
that matches it exactly once, in order; a reader that resumes after a
sequence number it received gets every later event the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.domain import errors
from service.domain.contract import Status, status_from_text
from service.domain.events import Event, EventFilter, EventPage, LogPosition
from service.domain.limits import Limits
from service.domain.states import Session
from service.domain.watch import WatchClosed

log = logging.getLogger(__name__)

#: Events read from the log at a time.
PAGE = 256
#: Events queued for one stream before it reads the log itself instead.
BUFFER = 1024
#: Seconds before the log is read again after a read failed.
RETRY_PAUSE = 1.0


class EventLog(Protocol):
    """What the streams read: the store's event log."""

    async def log_position(self) -> LogPosition: ...

    async def read_events(self, after: int, limit: int) -> EventPage: ...

    async def current_state(
        self, status: Status | None, instance_id_prefix: str
    ) -> tuple[list[Session], int]: ...


class EventStream:
    """One reader's place in the log and the events queued for it."""

    def __init__(self, streams: EventStreams, selected: EventFilter, position: int) -> None:
        self._streams = streams
        self.filter = selected
        #: The log has been looked through up to this sequence number for this reader.
        self.position = position
        self._queue: deque[Event] = deque()
        #: Reading the log itself (just opened, or fallen behind) rather than being offered.
        self._behind = True
        self._ready = asyncio.Event()
        self._closed: WatchClosed | None = None

    def offer(self, event: Event) -> None:
        """The next event of the log (the streams call this in sequence order)."""
        if self._behind or event.sequence <= self.position:
            return
        if self.filter.matches(event):
            if len(self._queue) >= self._streams.buffer:
                self._behind = True  # the reader will read from here on itself
                self._ready.set()
                return
            self._queue.append(event)
            self._ready.set()
        self.position = event.sequence

    def close(self, why: WatchClosed) -> None:
        self._closed = why
        self._ready.set()

    async def next(self) -> Event:
        """The next matching event, in sequence order.

        Raises WatchClosed once the stream is closed and drained, and
        CURSOR_EXPIRED if the log was trimmed past this reader. Cancelling it
        loses nothing: an event leaves the stream only when returned.
        """
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._closed is not None:
                raise self._closed
            if self._behind:
                await self._catch_up()
                continue
            self._ready.clear()
            await self._ready.wait()

    async def _catch_up(self) -> None:
        """Read the next page of the log; be offered events again once caught up."""
        page = await self._streams.log.read_events(self.position, self._streams.page)
        if page.trimmed > self.position:
            raise errors.cursor_expired(self.position, page.trimmed)
        self._queue.extend(event for event in page.events if self.filter.matches(event))
        self.position = max(self.position, page.through)
        if self.position >= self._streams.head:
            self._behind = False


@dataclass(frozen=True, slots=True)
class Opened:
    """A stream just opened, and what it starts with."""

    stream: EventStream
    #: The sessions as they stand, when it was opened without a cursor (None with one).
    current: list[Session] | None
    #: The sequence number the stream starts after: the current state's, or the cursor.
    position: int


class EventStreams:
    """Every open list-wide stream of this server, offered the log's events in order."""

    def __init__(
        self, event_log: EventLog, limits: Limits, buffer: int = BUFFER, page: int = PAGE
    ) -> None:
        self.log = event_log
        self._limits = limits
        self.buffer = buffer
        self.page = page
        #: The last sequence number offered to the streams.
        self.head = 0
        self._streams: set[EventStream] = set()
        self._reader: asyncio.Task[None] | None = None
        self._unread = False

    async def start(self) -> None:
        """Begin at the end of the log: the streams opened from now on read what came before."""
        self.head = (await self.log.log_position()).last

    def count(self) -> int:
        return len(self._streams)

    # Following the log.

    def appended(self, events: Sequence[Event]) -> None:
        """The events of a transaction this server committed, in order (the store's listener).

        They are offered at once when they follow the last one offered;
        otherwise another node appended in between, and the log is read.
        """
        if self._reader is None and events and events[0].sequence == self.head + 1:
            self._offer(events)
        else:
            self.wake()

    def wake(self) -> None:
        """Something was appended (elsewhere): read the log after the last event offered."""
        self._unread = True
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="event-log")

    async def _read(self) -> None:
        try:
            while self._unread:
                self._unread = False
                try:
                    await self._read_page()
                except Exception as error:  # noqa: BLE001 - the database is away: read again
                    log.warning("the event log cannot be read yet: %s", error)
                    self._unread = True
                    await asyncio.sleep(RETRY_PAUSE)
        finally:
            self._reader = None

    async def _read_page(self) -> None:
        """Offer the next page of the log; with no stream open, only move to its end."""
        if not self._streams:
            self.head = max(self.head, (await self.log.log_position()).last)
            return
        page = await self.log.read_events(self.head, self.page)
        self._offer(page.events)
        self.head = max(self.head, page.through)
        self._unread = self._unread or len(page.events) == self.page

    def _offer(self, events: Sequence[Event]) -> None:
        for event in events:
            if event.sequence <= self.head:
                continue
            for stream in self._streams:
                stream.offer(event)
            self.head = event.sequence

    # Opening and closing streams.

    async def open(self, selected: EventFilter, after: int | None) -> Opened:
        """A stream of the events that match ``selected``.

        Without ``after``: the current state first (read in one snapshot with
        the log's position), then every later event. With it: every event
        after that sequence number; CURSOR_EXPIRED if the log no longer keeps
        them, INVALID_ARGUMENT if the log has not reached it.
        """
        if len(self._streams) >= self._limits.watchers_total:
            raise errors.limit_exceeded(
                "watchers_total",
                f"the server already has {self._limits.watchers_total} open event streams",
                retry_after=1.0,
            )
        current: list[Session] | None = None
        if after is None:
            status = None if selected.status is None else status_from_text(selected.status)
            sessions, after = await self.log.current_state(status, selected.instance_id_prefix)
            current = [session for session in sessions if selected.shows(session)]
        else:
            _check_cursor(after, await self.log.log_position())
        stream = EventStream(self, selected, after)
        self._streams.add(stream)
        return Opened(stream, current, after)

    def close(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    def close_all(self, why: WatchClosed) -> None:
        for stream in self._streams:
            stream.close(why)
        self._streams.clear()

    async def stop(self) -> None:
        """Stop reading the log (the server is stopping)."""
        reader = self._reader
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def _check_cursor(after: int, position: LogPosition) -> None:
    if after < 0 or after > position.last:
        raise errors.invalid_argument(
            "after_sequence",
            f"after_sequence must be between 0 and {position.last}, the log's latest event; "
            f"got {after}",
        )
    if after < position.trimmed:
        raise errors.cursor_expired(after, position.trimmed)
