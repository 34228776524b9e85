"""Fan-out of committed session states to watchers.

Each watcher has a small bounded queue of references to immutable states.
Publishing never waits for a watcher: when a watcher's queue is full it is
cleared and only the latest state is kept, so a slow reader skips to the
latest state, costs bounded memory and never holds back anybody else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_BUFFER = 16


class WatchClosed(Exception):
    """The watched stream ended: the session was deleted or the server is stopping."""

    def __init__(self, why: str, *, deleted: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.deleted = deleted


class Watcher(Generic[T]):
    __slots__ = ("_closed", "_items", "_limit", "_ready", "latest")

    def __init__(self, limit: int, first: T) -> None:
        self._items: deque[T] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self._closed: WatchClosed | None = None
        #: The last item pushed: the state this watcher is at (or will be, once drained).
        self.latest = first
        self.push(first)

    def push(self, item: T) -> None:
        if len(self._items) >= self._limit:
            self._items.clear()  # skip intermediate states, keep order and the latest
        self._items.append(item)
        self.latest = item
        self._ready.set()

    def close(self, why: WatchClosed) -> None:
        self._closed = why
        self._ready.set()

    async def next(self) -> T:
        """The next state, in publish order; raises WatchClosed once closed and drained."""
        while not self._items:
            if self._closed is not None:
                raise self._closed
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class WatchHub(Generic[T]):
    def __init__(self, buffer: int = DEFAULT_BUFFER) -> None:
        self._buffer = buffer
        self._watchers: dict[str, set[Watcher[T]]] = {}
        self._total = 0

    def subscribe(self, key: str, current: T) -> Watcher[T]:
        watcher: Watcher[T] = Watcher(self._buffer, current)
        self._watchers.setdefault(key, set()).add(watcher)
        self._total += 1
        return watcher

    def unsubscribe(self, key: str, watcher: Watcher[T]) -> None:
        watchers = self._watchers.get(key)
        if watchers is not None and watcher in watchers:
            watchers.discard(watcher)
            self._total -= 1
            if not watchers:
                del self._watchers[key]

    def publish(self, key: str, item: T) -> None:
        for watcher in self._watchers.get(key, ()):
            watcher.push(item)

    def publish_if(self, key: str, item: T, newer: Callable[[T, T], bool]) -> None:
        """Hand ``item`` to each watcher of ``key`` for which it is ``newer`` than its latest."""
        for watcher in self._watchers.get(key, ()):
            if newer(item, watcher.latest):
                watcher.push(item)

    def close_where(self, key: str, which: Callable[[T], bool], why: WatchClosed) -> None:
        """End the watchers of ``key`` whose latest item matches ``which``."""
        for watcher in list(self._watchers.get(key, ())):
            if which(watcher.latest):
                self.unsubscribe(key, watcher)
                watcher.close(why)

    def close(self, key: str, why: WatchClosed) -> None:
        watchers = self._watchers.pop(key, set())
        self._total -= len(watchers)
        for watcher in watchers:
            watcher.close(why)

    def close_all(self, why: WatchClosed) -> None:
        for key in list(self._watchers):
            self.close(key, why)

    def count(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._watchers.get(key, ()))
        return self._total
