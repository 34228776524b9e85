"""Nodes and session leases in PostgreSQL: the SQL behind running several nodes.

Every decision about time is the database's: a lease is taken, renewed and
judged expired against ``now()`` on the server, never against a node's clock.
A lease is taken only by a conditional ``INSERT … ON CONFLICT DO UPDATE …
WHERE`` that raises its epoch, so two nodes can never both take it; it is
renewed only by its owner while it is still valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy

#: A connection of its own or one lent by a pool.
Db = asyncpg.Connection | PoolConnectionProxy


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node that sent a heartbeat within the lease TTL."""

    node_id: str
    incarnation: str
    address: str

    @property
    def owner(self) -> str:
        return owner_name(self.node_id, self.incarnation)


@dataclass(frozen=True, slots=True)
class SessionLease:
    """A stored session and the state of its lease, as the placement sees them."""

    instance_id: str
    #: The current owner (``node/incarnation``), or None when nobody holds the lease.
    owner: str | None
    #: Whether the owner's lease still runs.
    valid: bool
    #: Whether a new owner may take it now (free, or expired for longer than the grace).
    free: bool


@dataclass(frozen=True, slots=True)
class Route:
    """Where a session's commands go: its owner's address while its lease runs."""

    owner: str | None
    address: str | None
    valid: bool


def owner_name(node_id: str, incarnation: str) -> str:
    return f"{node_id}/{incarnation}"


async def join(db: Db, node_id: str, incarnation: str, address: str) -> None:
    """Announce this node (a new incarnation replaces the row of the node's previous one)."""
    await db.execute(
        "INSERT INTO nodes (node_id, incarnation, address) VALUES ($1, $2, $3) "
        "ON CONFLICT (node_id) DO UPDATE SET incarnation = $2, address = $3, "
        "started_at = now(), heartbeat_at = now()",
        node_id,
        incarnation,
        address,
    )


async def leave(db: Db, node_id: str, incarnation: str) -> None:
    """Withdraw this node at a clean stop, so the others take its share at once."""
    await db.execute(
        "DELETE FROM nodes WHERE node_id = $1 AND incarnation = $2", node_id, incarnation
    )


async def renew(db: Db, owner: str, held: dict[str, int], ttl: float) -> dict[str, int]:
    """Send the heartbeat and extend the leases of ``held`` (instance_id: epoch) still valid.

    Returns the ones extended. A lease that ran out is not extended: it may
    already be another node's, and so is one whose epoch moved on.
    """
    node_id, _, incarnation = owner.partition("/")
    async with db.transaction():
        beat = await db.execute(
            "UPDATE nodes SET heartbeat_at = now() WHERE node_id = $1 AND incarnation = $2",
            node_id,
            incarnation,
        )
        if beat.endswith(" 0"):  # our row was replaced by a newer incarnation of this node
            return {}
        rows = await db.fetch(
            "UPDATE leases AS l SET lease_until = now() + make_interval(secs => $2) "
            "FROM unnest($3::text[], $4::bigint[]) AS h (instance_id, epoch) "
            "WHERE l.instance_id = h.instance_id AND l.epoch = h.epoch "
            "AND l.owner = $1 AND l.lease_until > now() RETURNING l.instance_id, l.epoch",
            owner,
            ttl,
            list(held),
            list(held.values()),
        )
    return {row["instance_id"]: row["epoch"] for row in rows}


async def live_nodes(db: Db, ttl: float) -> list[NodeRow]:
    """The nodes whose last heartbeat is younger than ``ttl``."""
    rows = await db.fetch(
        "SELECT node_id, incarnation, address FROM nodes "
        "WHERE heartbeat_at > now() - make_interval(secs => $1) ORDER BY node_id",
        ttl,
    )
    return [NodeRow(row["node_id"], row["incarnation"], row["address"]) for row in rows]


async def placement_view(db: Db, grace: float) -> list[SessionLease]:
    """Every stored session with the state of its lease."""
    rows = await db.fetch(
        "SELECT s.instance_id, l.owner, coalesce(l.lease_until > now(), false) AS valid, "
        "(l.instance_id IS NULL OR l.owner IS NULL "
        " OR l.lease_until + make_interval(secs => $1) < now()) AS free "
        "FROM ll_whatsapp_qr_sessions s LEFT JOIN leases l USING (instance_id)",
        grace,
    )
    return [
        SessionLease(row["instance_id"], row["owner"], row["valid"], row["free"]) for row in rows
    ]


async def acquire(db: Db, instance_id: str, owner: str, ttl: float, grace: float) -> int | None:
    """Take the lease if nobody holds it (or its lease ran out ``grace`` ago); the new epoch."""
    epoch: int | None = await db.fetchval(
        "INSERT INTO leases AS l (instance_id, owner, epoch, lease_until) "
        "VALUES ($1, $2, 1, now() + make_interval(secs => $3)) "
        "ON CONFLICT (instance_id) DO UPDATE "
        "SET owner = excluded.owner, epoch = l.epoch + 1, lease_until = excluded.lease_until "
        "WHERE l.owner IS NULL OR l.lease_until + make_interval(secs => $4) < now() "
        "RETURNING epoch",
        instance_id,
        owner,
        ttl,
        grace,
    )
    return epoch


async def release(db: Db, instance_id: str, owner: str, epoch: int) -> bool:
    """Hand the lease back (its worker has stopped): the next owner need not wait."""
    status = await db.execute(
        "UPDATE leases SET owner = NULL, lease_until = now() "
        "WHERE instance_id = $1 AND owner = $2 AND epoch = $3",
        instance_id,
        owner,
        epoch,
    )
    return not status.endswith(" 0")


async def route(db: Db, instance_id: str) -> Route:
    """Who owns the session now, and where that node listens."""
    row = await db.fetchrow(
        "SELECT l.owner, n.address, l.lease_until > now() AS valid FROM leases l "
        "LEFT JOIN nodes n ON l.owner = n.node_id || '/' || n.incarnation "
        "WHERE l.instance_id = $1",
        instance_id,
    )
    if row is None:
        return Route(None, None, False)
    return Route(row["owner"], row["address"], bool(row["valid"]))
