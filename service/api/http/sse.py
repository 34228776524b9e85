"""A session's live events as Server-Sent Events.

The stream is a ``WatchSession`` over HTTP: the same bounded, coalescing
watcher, so a slow reader skips to the latest state and never holds anybody
back. It opens with ``retry: 2000``, sends the current state, then every
committed change in revision order (``id:`` is the revision), a comment line
while idle, and a final ``end`` event when the session is deleted or the
server stops. A reconnecting ``EventSource`` simply opens a new watch and gets
the current state again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.http.payloads import encode, session_bytes
from service.domain import errors
from service.domain.states import Session
from service.domain.watch import WatchClosed, Watcher

RETRY = b"retry: 2000\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def session_event(session: Session) -> bytes:
    return b"id: %d\nevent: session\ndata: %s\n\n" % (session.revision, session_bytes(session))


def end_event(closed: WatchClosed) -> bytes:
    data = {"reason": "deleted" if closed.deleted else "shutdown", "message": closed.why}
    return b"event: end\ndata: %s\n\n" % encode(data)


async def _events(watcher: Watcher[Session], keepalive: float) -> AsyncIterator[bytes]:
    yield RETRY
    while True:
        try:
            # Cancelling next() loses nothing: a state leaves the queue only when returned.
            async with asyncio.timeout(keepalive):
                session = await watcher.next()
        except TimeoutError:
            yield KEEP_ALIVE
            continue
        except WatchClosed as closed:
            yield end_event(closed)
            return
        yield session_event(session)


class StreamShares:
    """Each client's share of a session's event streams, so no client takes them all.

    A session has a limit of watchers for everybody, gRPC included; one client (a
    token from one address) may hold at most ``share`` of them at once.
    """

    def __init__(self, share: int) -> None:
        self.share = share
        self._open: Counter[tuple[str, str]] = Counter()

    def take(self, client: str, instance_id: str) -> Callable[[], None]:
        """Count one more stream of ``client`` on ``instance_id``; what gives it back.

        Raises LIMIT_EXCEEDED (429, ``details.limit = streams_per_client``) past the share.
        """
        key = (client, instance_id)
        if self._open[key] >= self.share:
            raise errors.limit_exceeded(
                "streams_per_client",
                f"this client already holds {self.share} event streams of session "
                f"{instance_id!r}; close one first",
                retry_after=1.0,
                instance_id=instance_id,
            )
        self._open[key] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._open[key] -= 1
                if self._open[key] <= 0:
                    del self._open[key]

        return give_back


class SessionEventStream(StreamingResponse):
    """An event stream that releases its watcher however the response ends."""

    def __init__(
        self, watcher: Watcher[Session], release: Callable[[], None], keepalive: float
    ) -> None:
        super().__init__(
            _events(watcher, keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
