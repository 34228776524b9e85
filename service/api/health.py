"""Whether this server can serve: the one verdict gRPC health and ``GET /health`` report.

A server serves while its database accepts commits and, with several nodes,
while it reaches the database for its leases and its change feed. While
commits fail, the store is probed (a commit that changes no session) so that
health comes back by itself once the database does, even when no caller
writes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from service.store.port import Store

log = logging.getLogger(__name__)

#: Seconds between two looks at the conditions (and probes of a failing store).
INTERVAL = 0.5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Serving:
    """The serving verdict, kept up to date in the gRPC health service."""

    def __init__(
        self,
        health: health_aio.HealthServicer,
        services: Sequence[str],
        store: Store,
        more: Sequence[Callable[[], bool]] = (),
    ) -> None:
        self._health = health
        self._names = ("", *services)
        self._store = store
        self._more = more
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> bool:
        """The verdict now (``GET /health``)."""
        return self._store_ok() and all(condition() for condition in self._more)

    def _store_ok(self) -> bool:
        return not self._store.commits_failing()

    async def start(self) -> None:
        await self._publish()
        self._task = asyncio.create_task(self._follow(), name="health")

    async def stop(self) -> None:
        """Stop following (the server is shutting down: health says so by itself)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            if not self._store_ok():
                with contextlib.suppress(Exception):  # still failing: the verdict says so
                    await self._store.probe()
            await self._publish()

    async def _publish(self) -> None:
        serving = self()
        if serving == self._serving:
            return
        if self._serving is not None:
            if serving:
                log.info("serving again")
            else:
                log.error("not serving: the database does not accept commits, or is out of reach")
        self._serving = serving
        for name in self._names:
            await self._health.set(name, SERVING if serving else NOT_SERVING)
