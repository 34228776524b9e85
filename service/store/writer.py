"""The one writer both stores share: one queue, served in call order, committed in groups.

Every operation, read or write, waits in one queue. One task takes what has
arrived (up to 512 operations) and hands it to the store as one transaction
(group commit); each caller gets its result only once that transaction is
committed. When a group fails, each operation is run again alone, so that
only the one that failed fails, unless the store says the failure is not an
operation's own (a connection that is gone fails the whole group).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

C = TypeVar("C")
T = TypeVar("T")

MAX_GROUP = 512


@dataclass(slots=True)
class _Job(Generic[C]):
    operation: Callable[[C], Awaitable[Any]]
    done: asyncio.Future[Any]


class Writer(Generic[C]):
    """The queue of one store whose transactions take a connection of type ``C``."""

    def __init__(
        self,
        transaction: Callable[[list[Callable[[C], Awaitable[Any]]]], Awaitable[list[Any]]],
        *,
        retry_alone: Callable[[Exception], bool] = lambda error: True,
    ) -> None:
        """``transaction`` runs the operations in one transaction and returns their results."""
        self._transaction = transaction
        self._retry_alone = retry_alone
        self._queue: asyncio.Queue[_Job[C] | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._serve(), name="store-writer")

    async def run(self, operation: Callable[[C], Awaitable[T]]) -> T:
        """Run ``operation`` in the next transaction; return once it is committed."""
        if self._task.done():
            raise RuntimeError("the store is closed")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(operation, done))
        return await done

    async def close(self) -> None:
        """Commit every operation queued so far, then stop taking more."""
        await self._queue.put(None)
        await self._task

    async def _serve(self) -> None:
        closing = False
        while not closing:
            first = await self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP and not self._queue.empty():
                job = self._queue.get_nowait()
                if job is None:
                    closing = True
                    break
                group.append(job)
            await self._commit(group)

    async def _commit(self, group: list[_Job[C]]) -> None:
        try:
            results = await self._transaction([job.operation for job in group])
        except Exception as error:  # noqa: BLE001 - handed to the callers
            if len(group) > 1 and self._retry_alone(error):
                # One operation failed: run each alone so that only that one fails.
                for job in group:
                    await self._commit([job])
                return
            for job in group:
                if not job.done.done():
                    job.done.set_exception(error)
            return
        for job, result in zip(group, results, strict=True):
            if not job.done.done():
                job.done.set_result(result)
