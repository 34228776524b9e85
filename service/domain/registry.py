"""The sessions the server holds, and the one path by which any of them changes.

Every change goes the same way: under the session's lock, the state machine
decides, the store commits, and only then the new state is kept, watchers hear
of it, the commit's listeners run and its effect on the outside world (a
logout) follows. A change, once started, finishes even if its caller goes away
(it runs shielded). Each incarnation of a session has its own cell: creating,
deleting and recreating an ``instance_id`` never mix.

A commit whose answer was lost and could not be settled (``CommitUnknown``)
leaves its cell in doubt: before anything else is done with the session, the
stored row is read again and adopted, and if it is the state that commit
would have stored, its listeners and its effect run then. The same happens in
the background as soon as the database answers, and whenever the store says
the row is not at the revision this node holds (``StaleRevision``). No
session needs a restart to accept changes again.
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
from service.domain.cell import Doubt, Effect, SessionCell
from service.domain.contract import ERROR, Status, qr_status_text, status_text
from service.domain.limits import Limits
from service.domain.states import Session, SessionRef
from service.domain.watch import WatchClosed, WatchHub
from service.store import failures
from service.store.failures import CommitUnknown
from service.store.port import StaleRevision, Store
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Runs after each commit: the cell, the committed state and the event that made it.
CommitListener = Callable[[SessionCell, Session, states.Event], None]
#: Seconds between attempts to read a session whose last commit is in doubt.
RESYNC_PAUSE = (0.2, 5.0)


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
        if cell is not None and cell.live and cell.session != session:
            cell.gone = True  # what this node held is older than what is stored
            cell.stop_timer()
            cell = None
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

    async def settled(self, instance_id: str) -> SessionCell:
        """The live cell of ``instance_id``, its stored row read again first if in doubt."""
        cell = self.cell(instance_id)
        if cell.arrival is not None and not cell.arrival.is_set():
            await cell.arrival.wait()
            cell = self.cell(instance_id)
        if cell.doubt is not None:
            async with cell.lock:
                await self._settle(cell)
            cell = self.cell(instance_id)
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
            # Another creation is being committed (or settled): its outcome decides.
            assert existing.creation is not None
            with contextlib.suppress(Exception):
                await asyncio.shield(existing.creation)
        self._moved.discard(instance_id)
        # Registered at once, so that a second creation waits for this one's commit.
        cell = self._cells[instance_id] = SessionCell(instance_id, self._limits)
        cell.creation = self.spawn(self._create(cell), quiet=True)
        return await asyncio.shield(cell.creation)

    async def _create(self, cell: SessionCell) -> Session:
        session = states.new_session(cell.instance_id, self._clock.now())
        try:
            row_id = await self._store.insert_session(session)
        except CommitUnknown:
            # A creation meanwhile waits until the stored row says whether it exists.
            cell.creation = self.spawn(self._settle_creation(cell))
            raise
        except BaseException:
            cell.gone = True
            self._forget(cell)
            raise
        cell.session = dataclasses.replace(session, id=row_id)
        log.info("created", extra={"instance_id": cell.instance_id})
        return cell.session

    async def _settle_creation(self, cell: SessionCell) -> Session:
        """Read the row of a creation whose commit is in doubt until the database answers."""
        row = await self._read_until_answered(cell.instance_id)
        if row is None:
            cell.gone = True
            self._forget(cell)
            raise errors.session_not_found(cell.instance_id)
        cell.session = row
        log.warning("a creation whose answer was lost had landed", extra=_about(cell))
        return row

    async def delete(self, instance_id: str, effect: Effect | None = None) -> SessionCell:
        """Commit the deletion, then run ``effect``; returns the gone cell."""
        cell = self.cell(instance_id)
        return await self.shielded(self._delete(cell, effect))

    async def _delete(self, cell: SessionCell, effect: Effect | None) -> SessionCell:
        async with cell.lock:
            await self._settle(cell)
            session = cell.current
            try:
                await self._store.delete_session(session.ref, self._clock.now())
            except CommitUnknown:
                self._doubt(cell, Doubt(None, None, effect))
                raise
            self._deleted(cell)
        if effect is not None:
            await effect(session)
        return cell

    def _deleted(self, cell: SessionCell) -> None:
        cell.gone = True
        self._forget(cell)
        cell.stop_timer()
        self.hub.close(
            cell.instance_id,
            WatchClosed(f"session {cell.instance_id!r} was deleted", deleted=True),
        )
        log.info("deleted", extra=_about(cell))

    def _forget(self, cell: SessionCell) -> None:
        if self._cells.get(cell.instance_id) is cell:
            del self._cells[cell.instance_id]

    async def apply(
        self,
        cell: SessionCell,
        event: states.Event,
        *,
        check: Callable[[SessionCell], None] | None = None,
        effect: Effect | None = None,
    ) -> Session:
        """Commit ``event`` on ``cell``, then run ``effect``; returns the session as committed.

        ``check`` runs under the lock before the state machine, to refuse the
        change on what only the cell knows. ``effect`` runs only if the event
        changed the session, once the change is committed (later, if its
        commit was in doubt and turns out to have landed).
        """
        return await self.shielded(self._apply_then(cell, event, check, effect))

    async def _apply_then(
        self,
        cell: SessionCell,
        event: states.Event,
        check: Callable[[SessionCell], None] | None,
        effect: Effect | None,
    ) -> Session:
        async with cell.lock:
            await self._settle(cell)
            try:
                updated = await self._commit(cell, event, check, effect)
            except StaleRevision:
                # This node held an older row than the stored one: adopt it, decide again.
                log.warning(
                    "the stored row is newer than this node's: read again", extra=_about(cell)
                )
                await self._resync(cell)
                updated = await self._commit(cell, event, check, effect)
        if updated is None:
            return cell.current
        if effect is not None:
            await effect(updated)
        return updated

    async def _commit(
        self,
        cell: SessionCell,
        event: states.Event,
        check: Callable[[SessionCell], None] | None,
        effect: Effect | None,
    ) -> Session | None:
        """Decide and commit under the lock; the committed state, None if nothing changed."""
        current = cell.current
        if check is not None:
            check(cell)
        updated = states.apply(current, event, self._clock.now())
        if updated is None:
            return None
        try:
            await self._store.update_session(updated, previous=current.status)
        except CommitUnknown:
            self._doubt(cell, Doubt(event, updated, effect))
            raise
        self._committed(cell, updated, event)
        return updated

    def _committed(self, cell: SessionCell, updated: Session, event: states.Event) -> None:
        cell.session = updated
        self.hub.publish(cell.instance_id, updated)
        for listener in self._listeners:
            listener(cell, updated, event)
        _log_commit(updated, event)

    # Commits in doubt.

    def _doubt(self, cell: SessionCell, doubt: Doubt) -> None:
        """The commit of ``doubt`` may have landed: read the row again as soon as it can be."""
        cell.doubt = doubt
        log.warning(
            "the answer to a commit was lost: the session will be read again", extra=_about(cell)
        )
        self.spawn(self._settle_soon(cell))

    async def _settle_soon(self, cell: SessionCell) -> None:
        pause, longest = RESYNC_PAUSE
        while cell.doubt is not None and not cell.gone:
            try:
                async with cell.lock:
                    await self._settle(cell)
                return
            except Exception as error:  # noqa: BLE001 - the database is still away: try again
                log.info("the session cannot be read again yet: %s", error, extra=_about(cell))
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)

    async def _settle(self, cell: SessionCell) -> None:
        """Under the lock: if a commit of this cell is in doubt, adopt the stored row."""
        if cell.doubt is not None and not cell.gone:
            await self._resync(cell)

    async def _resync(self, cell: SessionCell) -> None:
        """Under the lock: adopt the stored row, and finish what a commit that landed began."""
        row = await self._store.get_session(cell.instance_id)
        doubt, cell.doubt = cell.doubt, None
        held = cell.current
        if row is None or row.id != held.id:  # a deletion in doubt landed
            self._deleted(cell)
            if doubt is not None and doubt.effect is not None:
                self.spawn(doubt.effect(held))
            return
        if row.revision <= held.revision:  # the commit in doubt did not land
            return
        if doubt is not None and doubt.event is not None and doubt.updated == row:
            log.warning("a commit whose answer was lost had landed", extra=_about(cell))
            self._committed(cell, row, doubt.event)
            if doubt.effect is not None:
                self.spawn(doubt.effect(row))
            return
        log.warning(
            "adopted the stored revision %d over revision %d",
            row.revision,
            held.revision,
            extra=_about(cell),
        )
        cell.session = row
        self.hub.publish(cell.instance_id, row)

    async def _read_until_answered(self, instance_id: str) -> Session | None:
        pause, longest = RESYNC_PAUSE
        while True:
            try:
                return await self._store.get_session(instance_id)
            except Exception as error:  # noqa: BLE001 - the database is still away: try again
                log.info("cannot read %s yet: %s", instance_id, error)
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)

    # Tasks that must finish, and background ones.

    async def shielded(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run to the end even if the caller is cancelled, so no commit is half done.

        Its failure is the caller's to report.
        """
        return await asyncio.shield(self.spawn(coroutine, quiet=True))

    def spawn(self, coroutine: Coroutine[Any, Any, T], *, quiet: bool = False) -> asyncio.Task[T]:
        """Run ``coroutine`` in the background; its failure is logged unless ``quiet``."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if not quiet:
            task.add_done_callback(_log_failure)
        return task

    async def close(self) -> None:
        for cell in self._cells.values():
            cell.stop_timer()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is None or isinstance(error, errors.ContractError):
        return
    if failures.cause_of(error) is not None:  # the operator's to act on: one line
        log.error("a change could not be stored: %s", error)
    else:
        log.error("background task failed: %s", error, exc_info=error)


def _about(cell: SessionCell) -> dict[str, str]:
    return {"instance_id": cell.instance_id}


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
