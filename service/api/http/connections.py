"""HTTP connections kept within bounds: a deadline for each request head, and a cap.

uvicorn 0.54 times out only a keep-alive connection that stays silent after a
response; a connection that sends nothing, or its headers a byte at a time,
stays open for good, and nothing limits how many there are. Every one holds a
file descriptor, and when they run out gRPC, Central Hub's path, fails with
them. So the HTTP protocol is uvicorn's h11 protocol plus two rules:

- **A deadline for each request head.** From the moment a connection waits
  for a request (it opened, or its last response ended) the whole head must
  arrive within ``--http-read-timeout``, however it trickles in; else the
  connection is closed. (The body has its own deadline, in the app: a
  handler reads it.)
- **A cap.** At most ``limit`` connections are open. One more first takes the
  place of the connection that has waited longest for a request (an idle or
  trickling one, never one whose request is being served); when every
  connection is serving, the newcomer gets 503 ``LIMIT_EXCEEDED``
  (``details.limit = http_connections``, ``Retry-After: 1``) and is closed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.api.http.payloads import encode, error_json
from service.domain import errors

log = logging.getLogger("service.api.http")

#: How often a refusal or a failed accept is logged, at most (with the count since).
REPORT_SECONDS = 60.0


class Occasional:
    """An event that is counted every time and logged at most once per interval."""

    def __init__(self, message: str, interval: float = REPORT_SECONDS) -> None:
        self._message = message
        self._interval = interval
        self._count = 0
        self._logged_at: float | None = None

    def happened(self, *args: object) -> None:
        """Count it; log a warning with the count if the last one is an interval old."""
        self._count += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self._interval:
            log.warning(self._message + " (%d since the last report)", *args, self._count)
            self._logged_at = now
            self._count = 0


class ConnectionBudget:
    """The connections one HTTP server holds, and which of them wait for a request."""

    def __init__(self, limit: int, read_timeout: float) -> None:
        self.limit = limit
        self.read_timeout = read_timeout
        self._open: set[BoundedH11Protocol] = set()
        # Insertion order is waiting order: the first has waited longest.
        self._waiting: dict[BoundedH11Protocol, None] = {}
        self._refusals = Occasional("HTTP connection refused: all %d are serving requests")

    def admit(self, connection: BoundedH11Protocol) -> bool:
        """Make room for ``connection``, evicting the longest waiter if needed; False if full."""
        if len(self._open) >= self.limit:
            longest = next(iter(self._waiting), None)
            if longest is None:
                self._refusals.happened(self.limit)
                return False
            longest.evict()
        self._open.add(connection)
        return True

    def waits(self, connection: BoundedH11Protocol) -> None:
        self._waiting.pop(connection, None)
        self._waiting[connection] = None

    def serves(self, connection: BoundedH11Protocol) -> None:
        self._waiting.pop(connection, None)

    def release(self, connection: BoundedH11Protocol) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def refusal(self) -> bytes:
        """The whole 503 answer of a connection past the cap, as sent on the wire."""
        error = errors.limit_exceeded(
            "http_connections",
            f"the server is serving its limit of {self.limit} HTTP connections; retry shortly",
            retry_after=1.0,
        )
        body = encode(error_json(error))
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "retry-after: 1\r\n"
            "x-content-type-options: nosniff\r\n"
            "cache-control: no-store\r\n"
            "connection: close\r\n\r\n"
        )
        return head.encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, within the budget of its server (see the module)."""

    budget: ClassVar[ConnectionBudget]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.budget.admit(self):
            transport.write(self.budget.refusal())
            transport.close()
            return
        self._follow_requests()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        self.budget.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_requests()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_requests()

    def evict(self) -> None:
        """Close this connection now to make room: it waits for a request that is not coming."""
        self._stop_deadline()
        self.budget.release(self)
        self.transport.close()

    def _follow_requests(self) -> None:
        """Run the deadline while the connection waits for a request head, not while serving."""
        if self.transport.is_closing():
            self._stop_deadline()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_deadline()
            self.budget.serves(self)
            return
        if self._deadline is None or self._deadline_cycle is not self.cycle:
            self._stop_deadline()  # a new wait, after a response: a new deadline
            self._deadline = self.loop.call_later(self.budget.read_timeout, self._expire)
            self._deadline_cycle = self.cycle
            self.budget.waits(self)

    def _expire(self) -> None:
        self._deadline = None
        self.budget.release(self)
        self.transport.close()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def bounded_protocol(budget: ConnectionBudget) -> type[BoundedH11Protocol]:
    """The protocol class uvicorn makes each connection of one server with."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"budget": budget})


_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def report_accept_failures_occasionally(loop: asyncio.AbstractEventLoop) -> None:
    """Log running out of file descriptors once per interval, not once per failed accept.

    asyncio reports each failed accept to the loop's exception handler, which logs it
    with a traceback; the other reports go on to the handler that was there before.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "reports_accept_failures", False):
        return
    failures = Occasional("out of file descriptors: a connection could not be accepted")

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in _OUT_OF_DESCRIPTORS:
            failures.happened()
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handle.reports_accept_failures = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handle)
