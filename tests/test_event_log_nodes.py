"""The event log across three nodes over one PostgreSQL database (in this process).

Sessions live through every node at once (commands forwarded to their
owners); a reader follows ``WatchSessions`` on one node, hangs up at random
points and resumes after its cursor on another node: it sees every event of
the log exactly once, in commit order, whichever node wrote it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from service.config import Settings
from sessionmanager.v1 import session_service_pb2 as pb
from tests.event_streams import CutReader, Node, churn
from tests.flows import eventually
from tests.test_cluster_nodes import NODES, Member, join, node_settings


@pytest.fixture
async def members(
    settings: Settings, postgres_url: str, tmp_path: Path
) -> AsyncIterator[dict[str, Member]]:
    """Three nodes with leases long enough for a loaded machine: this is about the log."""
    started: dict[str, Member] = {}
    try:
        for node_id in NODES:
            configured = node_settings(settings, postgres_url, node_id, tmp_path)
            started[node_id] = await join(replace(configured, lease_ttl=8.0, lease_grace=1.0))
        for member in started.values():
            node = member.running.cluster.node  # type: ignore[union-attr]
            await eventually(lambda node=node: len(node.live) == len(NODES))  # type: ignore[misc]
        yield started
    finally:
        for member in started.values():
            await member.stop()


def nodes_of(started: dict[str, Member]) -> list[Node]:
    return [Node(member.sessions, member.simulator) for member in started.values()]


async def test_a_stream_resumed_on_any_node_sees_every_event_once_in_order(
    members: dict[str, Member],
) -> None:
    rng = random.Random(2026)
    nodes = nodes_of(members)
    for member in members.values():  # small queues: readers fall behind and read the log
        member.running.manager.events.buffer = 4
    reader = CutReader(rng)
    while reader.cursor is None:
        await reader.read(rng.choice(nodes), lambda: reader.cursor is not None)
    start = reader.cursor
    writer = asyncio.create_task(churn(nodes, 8, rng, prefix="n"))

    async def follow() -> None:
        while True:
            await reader.read(rng.choice(nodes), lambda: False)

    following = asyncio.create_task(follow())
    try:
        await writer
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
    store = next(iter(members.values())).running.store
    log = await store.read_events(start, 10_000)
    expected = [event.sequence for event in log.events]
    while reader.events[-1:] != expected[-1:]:
        await reader.read(rng.choice(nodes), lambda: reader.events[-1:] == expected[-1:])
    assert reader.events == expected
    assert len(expected) > 30
    # Each event carries what the log holds for it, whichever node served it.
    by_sequence = {event.sequence: event for event in log.events}
    for sequence, received in reader.seen.items():
        stored = by_sequence[sequence]
        assert (received.id, received.type) == (
            stored.id,
            pb.EventType.Value("EVENT_TYPE_" + stored.type.replace(".", "_").upper()),
        )
    print(f"{len(expected)} events over {reader.connections} connections to 3 nodes")
