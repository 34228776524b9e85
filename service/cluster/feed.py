"""Watching a session from any node: committed changes arrive through LISTEN/NOTIFY.

Every committed insert, update or delete of a session row notifies the
``session_changes`` channel (a trigger, so no write can skip it) with the
committed row, and PostgreSQL delivers notifications in commit order. For a
session with watchers here, the feed hands each state to every watcher that
has not seen it yet: the same promise as on one node — the current state
first, then every change in order, a slow reader skipping to the latest. A
watcher never sees a revision go back. A row too large for a notification
comes without it, and the feed reads it from the database (which may skip to
a later revision, never back).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg

from service.domain import errors
from service.domain.limits import Limits, check_watchers
from service.domain.states import Session
from service.domain.watch import WatchClosed, Watcher, WatchHub
from service.store import postgres
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)

#: How long the feed waits before it tries to reach the database again.
RECONNECT_PAUSE = 1.0


def newer(candidate: Session, seen: Session) -> bool:
    return (candidate.id, candidate.revision) > (seen.id, seen.revision)


class Feed:
    """The watchers of this node, fed from the database's notifications."""

    def __init__(self, url: str, limits: Limits, buffer: int = 16) -> None:
        self._url = url
        self._limits = limits
        self.hub: WatchHub[Session] = WatchHub(buffer)
        self._db: asyncpg.Connection | None = None
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await self._listen()
        self._reader = asyncio.create_task(self._refresh_loop(), name="feed")

    async def _listen(self) -> None:
        db = await postgres.connect(self._url)
        await db.add_listener(postgres.CHANGES_CHANNEL, self._notified)
        db.add_termination_listener(self._terminated)
        self._db = db

    @property
    def connected(self) -> bool:
        return self._db is not None and not self._db.is_closed()

    def close_watches(self) -> None:
        self.hub.close_all(WatchClosed("the Session Manager is shutting down"))

    async def close(self) -> None:
        self._closing = True
        self.close_watches()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._db is not None:
            self._db.terminate()

    async def watch(self, instance_id: str, current: Session) -> Watcher[Session]:
        """A watcher that starts at ``current`` (read from the store) and follows every commit."""
        check_watchers(self._limits, self.hub.count(instance_id), self.hub.count(), instance_id)
        if not self.connected:
            raise errors.ContractError(
                session_pb2.ERROR_REASON_STORAGE_UNAVAILABLE,
                "this node cannot reach the database to follow the session; "
                "watch it on another node or retry",
                retry_after=RECONNECT_PAUSE,
                instance_id=instance_id,
                cause="unreachable",
            )
        watcher = self.hub.subscribe(instance_id, current)
        self._mark(instance_id)  # a commit between the read and the subscription is not missed
        return watcher

    def unwatch(self, instance_id: str, watcher: Watcher[Session]) -> None:
        self.hub.unsubscribe(instance_id, watcher)

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        change = json.loads(str(payload))
        instance_id = change["instance_id"]
        if not self.hub.count(instance_id):
            return
        if change["deleted"]:
            self.hub.close_where(
                instance_id,
                lambda seen: seen.id == change["id"],
                WatchClosed(f"session {instance_id!r} was deleted", deleted=True),
            )
        elif change["row"] is not None:
            self.hub.publish_if(instance_id, postgres.session_from_json(change["row"]), newer)
        else:
            self._mark(instance_id)

    def _mark(self, instance_id: str) -> None:
        self._dirty.add(instance_id)
        self._wake.set()

    def _terminated(self, connection: Any) -> None:
        if self._closing:
            return
        # Changes committed while the connection is down would never be heard of:
        # every watcher ends (UNAVAILABLE), and its client resumes with a fresh watch.
        log.error("the change feed lost its database connection; its watchers end")
        self.hub.close_all(WatchClosed("the node lost its database connection"))
        self._wake.set()

    async def _refresh_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.connected:
                await self._reconnect()
                continue
            dirty, self._dirty = self._dirty, set()
            for instance_id in dirty:
                if self.hub.count(instance_id):
                    await self._refresh(instance_id)

    async def _reconnect(self) -> None:
        try:
            await self._listen()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("the change feed cannot reconnect yet: %s", error)
            await asyncio.sleep(RECONNECT_PAUSE)
            self._wake.set()
        else:
            log.info("the change feed is connected again")

    async def _refresh(self, instance_id: str) -> None:
        assert self._db is not None
        try:
            session = await postgres.read_session(self._db, instance_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("the change feed could not read %s: %s", instance_id, error)
            return
        # A watcher of an incarnation that is gone (deleted before it subscribed) ends.
        self.hub.close_where(
            instance_id,
            lambda seen: session is None or seen.id != session.id,
            WatchClosed(f"session {instance_id!r} was deleted", deleted=True),
        )
        if session is not None:
            self.hub.publish_if(instance_id, session, newer)
