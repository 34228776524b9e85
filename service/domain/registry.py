"""The sessions the server holds, and the one path by which any of them changes.

Every change goes the same way: under the session's lock, the state machine
decides, the store commits, and only then the new state is kept, watchers hear
of it and the commit's listeners run. A change, once started, finishes even
if its caller goes away (it runs shielded). Each incarnation of a session has
its own cell: creating, deleting and recreating an ``instance_id`` never mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from service.clock import Clock
from service.domain import errors, states
from service.domain.cell import SessionCell
from service.domain.contract import ERROR, Status, qr_status_text, status_text
from service.domain.limits import Limits
from service.domain.states import Session, SessionRef
from service.domain.watch import WatchClosed, WatchHub
from service.store.port import LeaseLost, Store
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Runs after each commit: the cell, the committed state and the event that made it.
CommitListener = Callable[[SessionCell, Session, states.Event], None]


class Registry:
    """Every session's cell by ``instance_id``; commits, creates and deletes."""

    def __init__(self, store: Store, clock: Clock, hub: WatchHub[Session], limits: Limits):
        self._store = store
        self._clock = clock
        self.hub = hub
        self._limits = limits
        self._cells: dict[str, SessionCell] = {}
        #: Sessions handed to another node (several nodes): commands here are SESSION_MOVING.
        self._moved: set[str] = set()
        self._listeners: list[CommitListener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def on_commit(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    async def load(self) -> None:
        for session in await self._store.load_sessions():
            self.adopt(session)

    def adopt(self, session: Session) -> SessionCell:
        """Hold ``session`` from now on (loaded at start, or taken over from another node)."""
        self._moved.discard(session.instance_id)
        cell = self._cells.get(session.instance_id)
        if cell is None or not cell.live:
            cell = self._cells[session.instance_id] = SessionCell(
                session.instance_id, self._limits, session=session
            )
        return cell

    async def drop(self, instance_id: str) -> SessionCell | None:
        """Stop holding a session (it moves to another node); nothing is written."""
        cell = self._cells.get(instance_id)
        if cell is None:
            return None
        self._moved.add(instance_id)
        async with cell.lock:  # a commit under way finishes first
            cell.gone = cell.moved = True
            self._forget(cell)
            cell.stop_timer()
        return cell

    def holds(self, instance_id: str) -> bool:
        cell = self._cells.get(instance_id)
        return cell is not None and (cell.live or (cell.creation is not None and not cell.gone))

    # Reads.

    def cell(self, instance_id: str) -> SessionCell:
        """The live cell of ``instance_id``; SESSION_NOT_FOUND if there is none."""
        cell = self._cells.get(instance_id)
        if cell is None or not cell.live:
            if instance_id in self._moved:
                raise errors.session_moving(instance_id, "has moved to another node")
            raise errors.session_not_found(instance_id)
        return cell

    def cell_of(self, session: SessionRef) -> SessionCell:
        """The cell of that very incarnation; SESSION_NOT_FOUND once it was deleted."""
        cell = self.cell(session.instance_id)
        if cell.current.id != session.id:
            raise errors.session_not_found(session.instance_id)
        return cell

    def get(self, instance_id: str) -> Session:
        return self.cell(instance_id).current

    def sessions(self) -> Iterator[Session]:
        for cell in list(self._cells.values()):
            if cell.session is not None and not cell.gone:
                yield cell.session

    async def list(
        self, page_size: int, after: str, status: Status | None
    ) -> tuple[list[Session], str | None]:
        """One page ordered by instance_id, and the last instance_id if more may follow."""
        page = await self._store.list_sessions(after, page_size + 1, status)
        if len(page) > page_size:
            return page[:page_size], page[page_size - 1].instance_id
        return page, None

    # Changes.

    async def create(self, instance_id: str) -> Session:
        while (existing := self._cells.get(instance_id)) is not None:
            if existing.live:
                raise errors.ContractError(
                    session_pb2.ERROR_REASON_SESSION_ALREADY_EXISTS,
                    f"session {instance_id!r} already exists",
                    instance_id=instance_id,
                )
            # Another creation is being committed: its outcome decides.
            assert existing.creation is not None
            with contextlib.suppress(Exception):
                await asyncio.shield(existing.creation)
        self._moved.discard(instance_id)
        # Registered at once, so that a second creation waits for this one's commit.
        cell = self._cells[instance_id] = SessionCell(instance_id, self._limits)
        cell.creation = self.spawn(self._create(cell))
        try:
            return await asyncio.shield(cell.creation)
        except LeaseLost as lost:
            raise _moving(lost) from lost

    async def _create(self, cell: SessionCell) -> Session:
        session = states.new_session(cell.instance_id, self._clock.now())
        try:
            row_id = await self._store.insert_session(session)
        except BaseException:
            cell.gone = True
            self._forget(cell)
            raise
        cell.session = dataclasses.replace(session, id=row_id)
        log.info("created", extra={"instance_id": cell.instance_id})
        return cell.session

    async def delete(self, instance_id: str) -> SessionCell:
        """Commit the deletion; returns the gone cell, whose effects the caller completes."""
        cell = self.cell(instance_id)
        return await self.shielded(self._delete(cell))

    async def _delete(self, cell: SessionCell) -> SessionCell:
        async with cell.lock:
            session = cell.current
            await self._store.delete_session(session.ref)
            cell.gone = True
            self._forget(cell)
            cell.stop_timer()
            self.hub.close(
                cell.instance_id,
                WatchClosed(f"session {cell.instance_id!r} was deleted", deleted=True),
            )
        log.info("deleted", extra={"instance_id": cell.instance_id})
        return cell

    def _forget(self, cell: SessionCell) -> None:
        if self._cells.get(cell.instance_id) is cell:
            del self._cells[cell.instance_id]

    async def apply(
        self,
        cell: SessionCell,
        event: states.Event,
        *,
        check: Callable[[SessionCell], None] | None = None,
    ) -> Session:
        """Commit ``event`` on ``cell``; returns the session as committed.

        ``check`` runs under the lock before the state machine, to refuse the
        change on what only the cell knows.
        """
        return await self.shielded(self._apply(cell, event, check))

    async def _apply(
        self,
        cell: SessionCell,
        event: states.Event,
        check: Callable[[SessionCell], None] | None,
    ) -> Session:
        async with cell.lock:
            current = cell.current
            if check is not None:
                check(cell)
            updated = states.apply(current, event, self._clock.now())
            if updated is None:
                return current
            await self._store.update_session(updated)
            cell.session = updated
            self.hub.publish(cell.instance_id, updated)
            for listener in self._listeners:
                listener(cell, updated, event)
            _log_commit(updated, event)
            return updated

    # Tasks that must finish, and background ones.

    async def shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run to the end even if the caller is cancelled, so no commit is half done.

        A write the database refused because another node now owns the session
        is the contract's SESSION_MOVING: nothing was changed.
        """
        try:
            return await asyncio.shield(self.spawn(coroutine))
        except LeaseLost as lost:
            raise _moving(lost) from lost

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, LeaseLost):
            log.warning("%s", error)
        elif error is not None and not isinstance(error, errors.ContractError):
            log.error("background task failed", exc_info=error)

    async def close(self) -> None:
        for cell in self._cells.values():
            cell.stop_timer()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _moving(lost: LeaseLost) -> errors.ContractError:
    return errors.session_moving(lost.instance_id, "has moved to another node")


def _log_commit(session: Session, event: states.Event) -> None:
    extra = {"instance_id": session.instance_id}
    log.info(
        "%s -> %s / %s (revision %d)",
        type(event).__name__,
        status_text(session.status),
        qr_status_text(session.qr_status),
        session.revision,
        extra=extra,
    )
    if session.status == ERROR:
        log.warning(
            "error %s: %s", session.last_error_code, session.last_error_message, extra=extra
        )
