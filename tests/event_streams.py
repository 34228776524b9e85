"""Steps the event log's tests share: changes of every kind, and a reader that is cut off.

``churn`` makes sessions go through their life (created, paired, connected,
sending, receipts, a network drop, deleted), concurrently, through any node.
``CutReader`` follows ``WatchSessions`` and hangs up after a random number of
items, then resumes after the last event or checkpoint it received, on
whichever node it is given next.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sessionmanager.v1 import session_service_pb2 as pb
from sessionmanager.v1 import session_service_pb2_grpc, simulator_service_pb2_grpc
from sessionmanager.v1 import simulator_service_pb2 as sim

TIMEOUT = 15.0


@dataclass
class Node:
    """The stubs of one server (one node of several, or the only one)."""

    sessions: session_service_pb2_grpc.SessionServiceAsyncStub
    simulator: simulator_service_pb2_grpc.SimulatorServiceAsyncStub


async def live_session(node: Node, iid: str, rng: random.Random) -> None:
    """One session's life: every kind of session event and message event."""
    await node.sessions.CreateSession(pb.CreateSessionRequest(instance_id=iid))
    await node.sessions.RequestQR(pb.RequestQRRequest(instance_id=iid))
    await node.simulator.ScanQR(sim.ScanQRRequest(instance_id=iid, phone_number="+5491122334455"))
    for n in range(rng.randint(1, 3)):
        sent = await node.sessions.Send(
            pb.SendRequest(
                instance_id=iid, to="+5491100000000", text="hola", idempotency_key=f"{n}"
            )
        )
        delivered = sim.DeliverMessageRequest(instance_id=iid, message_id=sent.message_id)
        await node.simulator.DeliverMessage(delivered)
        if rng.random() < 0.5:
            read = sim.ReadMessageRequest(instance_id=iid, message_id=sent.message_id)
            await node.simulator.ReadMessage(read)
    await node.simulator.DropNetwork(sim.DropNetworkRequest(instance_id=iid))
    if rng.random() < 0.5:
        await node.sessions.DeleteSession(pb.DeleteSessionRequest(instance_id=iid))


async def churn(nodes: Sequence[Node], count: int, rng: random.Random, prefix: str = "s") -> None:
    """``count`` sessions live at once, each through a node chosen at random."""
    await asyncio.gather(
        *(live_session(rng.choice(nodes), f"{prefix}{n:03d}", rng) for n in range(count))
    )


@dataclass
class CutReader:
    """A reader of ``WatchSessions`` that hangs up at random points and resumes."""

    rng: random.Random
    request: pb.WatchSessionsRequest = field(default_factory=pb.WatchSessionsRequest)
    #: The sequence number of the last event or checkpoint received.
    cursor: int | None = None
    #: The sequence number of every event received, in order.
    events: list[int] = field(default_factory=list)
    #: Each event's type and resource, by sequence number.
    seen: dict[int, pb.Event] = field(default_factory=dict)
    connections: int = 0

    async def read(self, node: Node, done: Callable[[], bool], most: int = 40) -> None:
        """One connection: read up to a random number of items, or until ``done()``."""
        request = pb.WatchSessionsRequest()
        request.CopyFrom(self.request)
        if self.cursor is not None:
            request.after_sequence = self.cursor
        call = node.sessions.WatchSessions(request)
        self.connections += 1
        try:
            for _ in range(self.rng.randint(1, most)):
                if done():
                    return
                item = await asyncio.wait_for(call.read(), TIMEOUT)
                assert isinstance(item, pb.WatchSessionsResponse), item
                self._take(item)
        finally:
            call.cancel()

    def _take(self, item: pb.WatchSessionsResponse) -> None:
        kind = item.WhichOneof("item")
        if kind == "session":
            assert self.cursor is None, "a resumed stream sends no current state"
        elif kind == "checkpoint":
            self.cursor = item.checkpoint.sequence
        else:
            self.events.append(item.event.sequence)
            self.seen[item.event.sequence] = item.event
            self.cursor = item.event.sequence


async def next_item(stream: Any) -> pb.WatchSessionsResponse:
    """The next item a ``WatchSessions`` stream sends, within ``TIMEOUT`` seconds."""
    item = await asyncio.wait_for(stream.read(), TIMEOUT)
    assert isinstance(item, pb.WatchSessionsResponse), item
    return item
