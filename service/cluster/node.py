"""One node among several over one PostgreSQL database: its leases and its share of sessions.

Every ``tick`` (a quarter of the lease TTL) the node sends its heartbeat and
renews every lease it holds in one statement, on the database's clock. From
the moment that renewal was sent it counts, on its own ``CLOCK_BOOTTIME``
(which goes on counting while the machine is suspended), TTL minus a margin:
each renewed session's worker is told to end by then (``Engine.hold``, with
the lease's epoch) and, if no renewal succeeded in the meantime, the node
drops every session itself. A session the node loses is revoked in the engine
first (``Engine.revoke``): from that instant it neither reports nor restarts,
and its worker is ended at once. A node whose store cannot commit
(``CommitHealth``) stops renewing, so that the others take its sessions.

A new owner takes a lease only once it expired ``grace`` ago on the database's
clock and, so that a step of that clock cannot shorten the wait, once this
node itself has seen it expired for TTL + grace on its own clock: the old
owner's workers are gone before the new ones start.

Placement is rendezvous hashing over the live nodes: each tick the node takes
the free sessions it should own and hands over those a live node should own
instead, at most ``moves_per_second`` of them, so a node joining or leaving
moves only its share, staggered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.clock import boottime
from service.cluster import placement
from service.cluster.fence import LeaseFence
from service.domain import errors
from service.domain.sessions import SessionManager
from service.store import leases, postgres
from service.store.leases import NodeRow
from service.store.port import LeaseLost

log = logging.getLogger(__name__)

#: The share of the TTL kept as a margin: workers end this long before the lease does.
MARGIN = 0.25
#: Connections a node uses for routing and moves (renewals have one of their own).
POOL_SIZE = 4
#: How many times a renewal chosen as a deadlock's victim is run again within one round.
RENEW_ATTEMPTS = 3
#: The longest the watchdog sleeps at once: a timed wait stands still while the machine
#: is suspended, so the deadline is read again at least this often.
WATCH_SLICE = 0.5
#: A connection gone or broken (asyncpg's InternalClientError included), or the server's refusal.
_DATABASE_ERRORS = (*postgres.CONNECTION_ERRORS, asyncpg.PostgresError)


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """Who this node is and how it holds its leases."""

    node_id: str
    #: Where the other nodes reach this node's gRPC server.
    address: str
    lease_ttl: float = 15.0
    lease_grace: float = 5.0
    moves_per_second: float = 10.0

    @property
    def tick(self) -> float:
        return self.lease_ttl / 4


class CommitHealth(Protocol):
    """Whether the node's store can commit (its writer's connection, not the node's own):
    ``Store.commits_failing``, which health's probes turn False again once it can."""

    def commits_failing(self) -> bool:
        """True while the store's last transaction failed for the storage's sake."""


class NodeMetrics(Protocol):
    """What a node counts (``service.api.metrics``)."""

    def on_renewal(self, seconds: float) -> None: ...

    def on_move(self, direction: str) -> None: ...

    def on_fencing_rejection(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Local:
    """This node owns the session: run the command here."""


@dataclass(frozen=True, slots=True)
class Remote:
    """Another node owns the session (or should): forward the command to ``address``."""

    address: str


Route = Local | Remote
LOCAL = Local()


@dataclass
class LeaseBook:
    """The leases this node holds, by instance_id: what its writes' fence checks."""

    owner: str
    on_rejected: Callable[[str], None]
    epochs: dict[str, int] = field(default_factory=dict)

    def token(self, instance_id: str) -> tuple[str, int]:
        epoch = self.epochs.get(instance_id)
        if epoch is None:
            raise LeaseLost(instance_id, "this node holds no lease on it")
        return self.owner, epoch

    def rejected(self, instance_id: str) -> None:
        self.on_rejected(instance_id)

    def hold(self, instance_id: str, epoch: int) -> None:
        self.epochs[instance_id] = epoch

    def drop(self, instance_id: str) -> int | None:
        return self.epochs.pop(instance_id, None)


class Node:
    """This node's membership, leases and share of the sessions."""

    def __init__(
        self,
        settings: NodeSettings,
        store: postgres.Store,
        manager: SessionManager,
        metrics: NodeMetrics | None = None,
        commit_health: CommitHealth | None = None,
    ) -> None:
        self.settings = settings
        self.incarnation = secrets.token_hex(4)
        self.owner = leases.owner_name(settings.node_id, self.incarnation)
        self._store = store
        self._manager = manager
        self._metrics = metrics
        #: Whether the store can commit; a node that cannot renews nothing.
        self.commit_health = commit_health
        self._commits_failing = False
        self.book = LeaseBook(self.owner, self._rejected)
        store.fence = LeaseFence(self.book)
        self._pool: asyncpg.Pool | None = None
        self._beat: asyncpg.Pool | None = None
        self.live: list[NodeRow] = []
        #: Until when (``boottime()``) this node may act on its leases; None before the first
        #: renewal.
        self.deadline: float | None = None
        #: Whether the last renewal reached the database (health reports it).
        self.connected = False
        self._locks: dict[str, asyncio.Lock] = {}
        #: Leases dropped past the deadline: freed (if still ours) once the database answers.
        self._dropped: dict[str, int] = {}
        self._budget = 0.0
        #: Sessions being taken or handed over by a round's move.
        self._moving: set[str] = set()
        #: Leases of other owners this node saw expired: the owner, and since when (boottime).
        self._sightings: dict[str, tuple[str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._renewed = asyncio.Event()
        self.on_health: Callable[[bool], None] = lambda serving: None

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    # Life cycle.

    async def start(self) -> None:
        """Join the cluster and take this node's share of the sessions."""
        self._pool = await self._connections(POOL_SIZE)
        # Renewals have a connection of their own: routing and moves never queue ahead of them.
        self._beat = await self._connections(1)
        async with self._using(self._pool) as db:
            await leases.join(db, self.node_id, self.incarnation, self.settings.address)
        log.info("joined as node %s (%s)", self.node_id, self.settings.address)
        await self.tick()
        self._loop = asyncio.create_task(self._run(), name="node-leases")
        self._watchdog = asyncio.create_task(self._guard(), name="node-watchdog")

    async def _connections(self, size: int) -> asyncpg.Pool:
        idle = keepalive_idle(self.settings.lease_ttl)
        return await asyncpg.create_pool(
            self._store.url,
            min_size=1,
            max_size=size,
            # A connection that cannot be made within a round (a route still dropping
            # packets) is given up, so the next round tries a new one.
            timeout=max(1.0, self.settings.lease_ttl / 2),
            command_timeout=self.settings.lease_ttl / 2,
            init=functools.partial(postgres.keep_alive, idle=idle),
            server_settings={
                "application_name": f"session-manager {self.node_id}",
                **postgres.stall_settings(self._store.stall_limit),
                **postgres.keepalive_settings(idle),
            },
        )

    @contextlib.asynccontextmanager
    async def _using(
        self, pool: asyncpg.Pool, within: float | None = None
    ) -> AsyncIterator[PoolConnectionProxy]:
        """A connection of ``pool``; one that fails as a connection (gone, or hung past its
        timeout) is ended, and its siblings are replaced as they are next taken: whatever cut
        it off (a route dropping packets) most likely cut them off too."""
        async with pool.acquire(timeout=within) as db:
            try:
                yield db
            except postgres.CONNECTION_ERRORS:
                postgres.end_pooled(db)
                await pool.expire_connections()
                raise

    async def stop(self) -> None:
        """Hand every session over and leave, so the other nodes take them at once."""
        for task in (self._loop, self._watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._pool is None:
            return
        await asyncio.gather(*self._tasks, return_exceptions=True)  # moves under way finish
        await asyncio.gather(
            *(self._hand_over_quietly(instance_id) for instance_id in list(self.book.epochs))
        )
        with contextlib.suppress(*_DATABASE_ERRORS):
            async with self._using(self._pool) as db:
                await leases.leave(db, self.node_id, self.incarnation)
        self._pool.terminate()
        if self._beat is not None:
            self._beat.terminate()

    async def _hand_over_quietly(self, instance_id: str) -> None:
        with contextlib.suppress(*_DATABASE_ERRORS):
            await self.hand_over(instance_id)

    async def _run(self) -> None:
        while True:
            # While the store cannot commit, rounds come often: the node renews, and takes
            # its sessions back, as soon as it can commit again.
            pause = WATCH_SLICE if self._commits_failing else self.settings.tick
            await asyncio.sleep(min(pause, self.settings.tick))
            try:
                await self.tick()
            except Exception:
                log.exception("the node's lease round failed")

    async def _guard(self) -> None:
        """Drop every session once the leases may have run out without a renewal."""
        while True:
            deadline = self.deadline
            if deadline is None or not self.book.epochs:
                self._renewed.clear()
                await self._renewed.wait()
                continue
            remaining = deadline - boottime()
            if remaining > 0:
                self._renewed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._renewed.wait(), min(remaining, WATCH_SLICE))
                continue
            log.error(
                "could not renew the leases in time: dropping %d sessions", len(self.book.epochs)
            )
            await self._drop_all("its lease could not be renewed in time")

    # One round: heartbeat and renewals, then placement.

    async def tick(self) -> None:
        sent = boottime()
        if self.deadline is not None and sent >= self.deadline:
            # Frozen or cut off past the deadline: the workers ended by themselves.
            await self._drop_all("its lease could not be renewed in time")
        if self._cannot_commit():
            self._set_connected(False)
            return
        held = dict(self.book.epochs)
        try:
            renewed, live = await asyncio.wait_for(self._renew(held), self.settings.lease_ttl / 2)
        except (*_DATABASE_ERRORS, TimeoutError) as error:
            self._set_connected(False)
            log.warning("cannot renew the leases: %s", error or "no answer in time")
            return
        self._set_connected(True)
        if self.deadline is not None and boottime() >= self.deadline:
            # The renewal came too late: the workers have already ended themselves, so the
            # sessions are given back and taken again (and reconnected) like any others.
            await self._drop_all("its lease was renewed only after its deadline")
            return
        if not any(node.owner == self.owner for node in live):
            # A newer start of this node id took its row: this process is stale.
            await self._drop_all("another process started as this node")
            return
        self.deadline = sent + self.settings.lease_ttl * (1 - MARGIN)
        for instance_id, epoch in renewed.items():
            if self.book.epochs.get(instance_id) == epoch:  # not lost meanwhile
                self._manager.engine.hold(instance_id, self.deadline, epoch)
        self._renewed.set()
        if self._metrics is not None:
            self._metrics.on_renewal(boottime() - sent)
        for instance_id, epoch in held.items():
            if instance_id not in renewed and self.book.epochs.get(instance_id) == epoch:
                self._manager.engine.revoke(instance_id)  # at once; the rest under its lock
                self._spawn(self.lose(instance_id, "its lease was not renewed"))
        self.live = live
        await self._rebalance()

    def _cannot_commit(self) -> bool:
        """Whether the store cannot commit now: then the node renews nothing, so that its
        leases run out and the nodes that can commit take its sessions."""
        failing = self.commit_health is not None and self.commit_health.commits_failing()
        if failing != self._commits_failing:
            self._commits_failing = failing
            if failing:
                log.error("the store cannot commit: this node stops renewing its leases")
            else:
                log.warning("the store commits again: this node renews its leases again")
        return failing

    async def _renew(self, held: dict[str, int]) -> tuple[dict[str, int], list[NodeRow]]:
        assert self._beat is not None
        async with self._using(self._beat) as db:
            for instance_id, epoch in list(self._dropped.items()):
                await leases.release(db, instance_id, self.owner, epoch)
                del self._dropped[instance_id]
            renewed = await self._renew_on(db, held)
            live = await leases.live_nodes(db, self.settings.lease_ttl)
        return renewed, live

    async def _renew_on(self, db: leases.Db, held: dict[str, int]) -> dict[str, int]:
        """Renew; PostgreSQL may pick the renewal as a deadlock's victim against this node's
        own writes (they share-lock lease rows in their order): then it is simply run again."""
        for attempt in range(RENEW_ATTEMPTS):
            try:
                return await leases.renew(db, self.owner, held, self.settings.lease_ttl)
            except asyncpg.DeadlockDetectedError:
                if attempt == RENEW_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_health(connected)

    async def _rebalance(self) -> None:
        """Start this round's moves; they run beside the next renewals, never holding them up."""
        assert self._pool is not None
        async with self._using(self._pool) as db:
            view = await leases.placement_view(db, self.settings.lease_grace)
        nodes = [node.node_id for node in self.live]
        self._budget = min(
            self._budget + self.settings.moves_per_second * self.settings.tick,
            max(1.0, self.settings.moves_per_second * self.settings.tick),
        )
        for entry in view:
            if not entry.free:  # renewed, re-taken, or the database's clock went back
                self._sightings.pop(entry.instance_id, None)
        for entry in view:
            if self._budget < 1:
                return
            instance_id = entry.instance_id
            if instance_id in self._moving:
                continue
            winner = placement.owner_of(instance_id, nodes)
            held = instance_id in self.book.epochs
            if held and winner not in (None, self.node_id):
                self._move(instance_id, self.hand_over(instance_id))
            elif not held and winner == self.node_id and entry.free:
                self._move(instance_id, self.take(instance_id))

    def _move(self, instance_id: str, move: Coroutine[Any, Any, object]) -> None:
        self._budget -= 1
        self._moving.add(instance_id)

        async def run() -> None:
            try:
                await move
            except Exception as error:  # noqa: BLE001 - the next round tries again
                log.warning("moving session %s failed: %s", instance_id, error)
            finally:
                self._moving.discard(instance_id)

        self._spawn(run())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Taking, handing over, losing.

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    def session_lock(self, instance_id: str) -> asyncio.Lock:
        """Held while the session's lease is taken, handed over or freed (and by creations)."""
        return self._lock(instance_id)

    def may_act(self) -> bool:
        return self.deadline is not None and boottime() < self.deadline

    def _waited_out(self, instance_id: str, current: leases.Route) -> bool:
        """Whether this node has itself seen the lease expired for TTL + grace, on its own clock.

        The database's clock says when a lease expired, but a step of that
        clock must not shorten the wait: the old owner ends its workers on its
        own clock, at most 75 % of the TTL after its last renewal, which came
        before this node first saw the lease expired. A lease its owner gave
        back (no owner), or this node's own, needs no wait: its worker stopped first.
        """
        owner = current.owner
        if owner is None or owner == self.owner or current.valid:
            self._sightings.pop(instance_id, None)
            return owner is None or owner == self.owner
        now = boottime()
        seen_owner, since = self._sightings.setdefault(instance_id, (owner, now))
        if seen_owner != owner:
            self._sightings[instance_id] = (owner, now)
            return False
        return now - since >= self.settings.lease_ttl + self.settings.lease_grace

    async def take(self, instance_id: str) -> bool:
        """Take the session's lease if it is free, and the session with it; whether it is ours."""
        assert self._pool is not None
        async with self._lock(instance_id):
            if instance_id in self.book.epochs:
                return True
            if not self.may_act():
                return False
            try:
                async with self._using(self._pool, self.settings.lease_ttl / 2) as db:
                    if not self._waited_out(instance_id, await leases.route(db, instance_id)):
                        return False
                    epoch = await leases.acquire(
                        db,
                        instance_id,
                        self.owner,
                        self.settings.lease_ttl,
                        self.settings.lease_grace,
                    )
            except asyncpg.LockNotAvailableError:  # a stalled owner's write still holds the row
                log.warning("could not take session %s yet: its lease row is locked", instance_id)
                return False
            except (OSError, TimeoutError, asyncpg.InterfaceError) as error:
                raise postgres.DatabaseUnreachable(
                    f"cannot take session {instance_id!r}: {error or 'no answer in time'}"
                ) from error
            if epoch is None:
                return False
            if not self.may_act():  # the deadline passed while it was taken: give it back
                self._dropped[instance_id] = epoch
                return False
            assert self.deadline is not None
            self._sightings.pop(instance_id, None)
            self.book.hold(instance_id, epoch)
            self._manager.engine.hold(instance_id, self.deadline, epoch)  # before it restores
            try:
                session = await self._store.get_session(instance_id)
                if session is not None:
                    await self._manager.adopt(session)
                if not self.may_act():
                    raise postgres.DatabaseUnreachable(
                        f"this node's lease ran out while it took session {instance_id!r}"
                    )
            except BaseException:  # given back (the next round frees it), and the caller told why
                self.book.drop(instance_id)
                self._manager.engine.revoke(instance_id)
                self._dropped[instance_id] = epoch
                await self._manager.release(instance_id)
                raise
            if session is not None:
                log.info("took over session %s (epoch %d)", instance_id, epoch)
                if self._metrics is not None:
                    self._metrics.on_move("in")
            return True

    async def hand_over(self, instance_id: str) -> None:
        """Stop the session here and free its lease for the node that should own it."""
        assert self._pool is not None
        async with self._lock(instance_id):
            epoch = self.book.epochs.get(instance_id)
            if epoch is None:
                return
            await self._manager.release(instance_id)
            self.book.drop(instance_id)
            self._manager.engine.revoke(instance_id)  # its worker stopped: this only lets go
            await self._release_lease(instance_id, epoch)
            log.info("handed session %s over", instance_id)
            if self._metrics is not None:
                self._metrics.on_move("out")

    async def forget(self, instance_id: str) -> None:
        """The session was deleted here: free its lease (its epoch stays for the next one).

        The caller holds ``session_lock``, so that no creation of the same
        instance_id runs here between the deletion and this.
        """
        epoch = self.book.drop(instance_id)
        if epoch is not None:
            self._manager.engine.revoke(instance_id)  # logged out already: this only lets go
            await self._release_lease(instance_id, epoch)

    async def _release_lease(self, instance_id: str, epoch: int) -> None:
        """Free a lease in the database; if that fails, the next round frees it."""
        assert self._pool is not None
        try:
            async with self._using(self._pool, self.settings.tick) as db:
                await leases.release(db, instance_id, self.owner, epoch)
        except (*_DATABASE_ERRORS, TimeoutError) as error:
            log.warning("could not free the lease of %s now: %s", instance_id, error)
            self._dropped[instance_id] = epoch

    async def lose(self, instance_id: str, why: str) -> None:
        """The lease is gone (another node may own the session): stop it here, write nothing.

        The engine is told at once, before anything waits: from then on the
        session neither reports nor restarts, and its worker is ended. The
        database is asked to free the lease too, should it still be this node's.
        """
        if instance_id in self.book.epochs:
            self._manager.engine.revoke(instance_id)
        async with self._lock(instance_id):  # a take of the same session waits for this
            epoch = self.book.drop(instance_id)
            if epoch is None:
                return
            self._dropped.setdefault(instance_id, epoch)
            log.warning("lost session %s: %s", instance_id, why)
            await self._manager.release(instance_id)

    async def _drop_all(self, why: str) -> None:
        """Drop every session; the next round that reaches the database frees their leases."""
        self.deadline = None
        self._dropped.update(self.book.epochs)
        for instance_id in self.book.epochs:
            self._manager.engine.revoke(instance_id)
        await asyncio.gather(
            *(self.lose(instance_id, why) for instance_id in list(self.book.epochs))
        )

    def _rejected(self, instance_id: str) -> None:
        if self._metrics is not None:
            self._metrics.on_fencing_rejection()
        if self.book.drop(instance_id) is None:  # at once: a retried command routes elsewhere
            return
        self._manager.engine.revoke(instance_id)
        log.warning("lost session %s: the database refused a stale write", instance_id)
        self._spawn(self._release_locked(instance_id))

    async def _release_locked(self, instance_id: str) -> None:
        async with self._lock(instance_id):
            if instance_id not in self.book.epochs:  # not taken again meanwhile
                await self._manager.release(instance_id)

    # Routing a command.

    async def route(self, instance_id: str, *, creating: bool = False) -> Route:
        """Where a command for ``instance_id`` runs: here (the lease is taken if due) or there.

        SESSION_NOT_FOUND for a session that does not exist, unless it is being
        created (its lease is taken first, so that its insert is fenced too).
        """
        assert self._pool is not None
        lock = self._locks.get(instance_id)
        if lock is not None and lock.locked():  # a take-over or hand-over is under way
            async with lock:
                pass
        if instance_id in self.book.epochs:
            if not self.may_act():  # past its deadline its workers are gone: it acts on nothing
                raise errors.session_moving(instance_id, "is held by a node that lost its lease")
            return LOCAL
        if not creating and await self._store.get_session(instance_id) is None:
            raise errors.session_not_found(instance_id)
        try:
            async with self._using(self._pool, self.settings.lease_ttl / 2) as db:
                current = await leases.route(db, instance_id)
        except (*_DATABASE_ERRORS, TimeoutError) as error:
            raise postgres.DatabaseUnreachable(
                f"cannot locate session {instance_id!r}: {error or 'no answer in time'}"
            ) from error
        if current.valid and current.owner is not None and current.owner != self.owner:
            if current.address is None:
                raise errors.session_moving(instance_id, "is owned by a node that left")
            return Remote(current.address)
        winner = placement.owner_of(instance_id, [node.node_id for node in self.live])
        if winner is None or winner == self.node_id or current.owner == self.owner:
            # Shielded: a caller that gives up must not leave a lease taken but unrecorded.
            if await asyncio.shield(asyncio.ensure_future(self.take(instance_id))):
                return LOCAL
            raise errors.session_moving(instance_id, "is waiting for its previous owner's lease")
        address = next(node.address for node in self.live if node.node_id == winner)
        return Remote(address)


def keepalive_idle(lease_ttl: float) -> int:
    """Seconds a node's connection may stay silent before TCP probes it: a renewal round."""
    return max(1, math.ceil(lease_ttl / 4))
