"""What the transports (gRPC, HTTP) ask of the sessions, whoever answers.

On one node ``SessionManager`` answers everything itself. With several nodes
``service.cluster.routing.ClusterSessions`` answers the same calls: reads from
the shared store, commands where their session's owner is.
"""

from __future__ import annotations

from typing import Protocol

from service.domain.contract import Status
from service.domain.event_stream import EventStream, Opened
from service.domain.events import EventFilter
from service.domain.sending import SendResult
from service.domain.states import Session, SessionEvent, SessionRef
from service.domain.watch import Watcher
from service.store.messages import Message


class Sessions(Protocol):
    async def get(self, instance_id: str) -> Session: ...

    async def ref(self, instance_id: str) -> SessionRef: ...

    async def list(
        self, page_size: int, after: str, status: Status | None
    ) -> tuple[list[Session], str | None]: ...

    async def watch(self, instance_id: str) -> Watcher[Session]: ...

    def unwatch(self, instance_id: str, watcher: Watcher[Session]) -> None: ...

    async def watch_events(self, selected: EventFilter, after: int | None) -> Opened: ...

    def unwatch_events(self, stream: EventStream) -> None: ...

    async def get_message(self, instance_id: str, message_id: str) -> Message: ...

    async def create(self, instance_id: str) -> Session: ...

    async def delete(self, instance_id: str) -> None: ...

    async def request_qr(self, instance_id: str) -> Session: ...

    async def pair_phone(self, instance_id: str, phone_number: str) -> tuple[str, Session]: ...

    async def send(
        self, instance_id: str, to: str, text: str, idempotency_key: str | None
    ) -> SendResult: ...

    async def disconnect(self, instance_id: str) -> Session: ...

    async def report_current(self, instance_id: str, event: SessionEvent) -> Session: ...

    def status_counts(self) -> dict[str, int]: ...

    def watcher_count(self) -> int: ...

    def close_watches(self) -> None: ...
