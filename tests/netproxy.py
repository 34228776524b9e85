"""A TCP proxy between one node and PostgreSQL that can cut the network and restore it.

``NetProxy`` listens on a free port of 127.0.0.1 and forwards every connection
to the upstream address. ``partition()`` is a real network partition, not a
reset: from that moment no byte crosses in either direction, the connections
stay open and hang (what either side sends is held, up to a bound past which
the proxy stops reading and the sender's socket fills), and new connections
are accepted and hang too. Two ways out:

- ``heal()`` closes every connection the partition hung, as a peer's TCP
  keepalive would in the end, and forwards new ones again;
- ``resume()`` delivers what was held, in order, on the same connections, and
  goes on forwarding: a stall short enough for TCP to ride it out, where a
  request sent before it reaches the other side late.

The proxy runs its own event loop in a thread of its own, so that a test
which blocks its loop (a ``subprocess.wait``, a slow fixture) never stalls the
database traffic of the nodes and never partitions them by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024
HOLD_LIMIT = 256 * 1024  # bytes held per connection and direction before the proxy stops reading
CALL_TIMEOUT = 10.0

T = TypeVar("T")


@dataclass(eq=False)
class _Direction:
    """One direction of a connection: where its bytes go, and what a partition holds of them."""

    sink: asyncio.StreamWriter
    held: list[bytes] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        return sum(map(len, self.held))

    def flush(self) -> None:
        for chunk in self.held:
            self.sink.write(chunk)
        self.held.clear()


@dataclass(eq=False)
class _Link:
    """One proxied connection: both directions and the tasks that pump them."""

    to_upstream: _Direction
    to_client: _Direction
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        for direction in (self.to_upstream, self.to_client):
            direction.held.clear()
            direction.sink.close()


class NetProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` with a switch for a network partition."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._forwarding: asyncio.Event | None = None

    @classmethod
    def for_url(cls, url: str) -> NetProxy:
        """A started proxy to the host and port of a ``postgresql://`` URL."""
        parts = urlsplit(url)
        assert parts.hostname is not None, url
        proxy = cls(parts.hostname, parts.port or 5432)
        proxy.start()
        return proxy

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    @property
    def partitioned(self) -> bool:
        return self._forwarding is not None and not self._forwarding.is_set()

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy (hung ones included)."""
        return self._call(self._count())

    @property
    def held_from_clients(self) -> int:
        """How many bytes the clients sent that the partition holds back from the upstream."""
        return self._call(self._held_from_clients())

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        """Stop forwarding, both ways, on every open and every new connection; keep them open."""
        self._call(self._partition())

    def heal(self) -> None:
        """Close the connections the partition hung, then forward new ones again."""
        self._call(self._heal())

    def resume(self) -> None:
        """Deliver what the partition held, in order, and forward again on the same connections."""
        self._call(self._resume())

    def close(self) -> None:
        """Close the listener and every connection, then stop the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> NetProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the proxy's loop and return its result (bounded)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT)

    async def _listen(self) -> asyncio.Server:
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _count(self) -> int:
        return len(self._links)

    async def _held_from_clients(self) -> int:
        return sum(link.to_upstream.held_bytes for link in self._links)

    async def _partition(self) -> None:
        assert self._forwarding is not None
        self._forwarding.clear()

    async def _heal(self) -> None:
        assert self._forwarding is not None
        if not self._forwarding.is_set():
            for link in list(self._links):
                self._drop(link)
        self._forwarding.set()

    async def _resume(self) -> None:
        assert self._forwarding is not None
        for link in self._links:
            link.to_upstream.flush()
            link.to_client.flush()
        self._forwarding.set()  # no await since the flush: nothing overtakes what was held

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._drop(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The upstream connection opens even during a partition: the client cannot tell, since
        # not one byte of it is forwarded until the partition ends.
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        link = _Link(_Direction(up_writer), _Direction(writer))
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(reader, link.to_upstream, link)),
            asyncio.create_task(self._pump(up_reader, link.to_client, link)),
        ]

    async def _pump(self, source: asyncio.StreamReader, direction: _Direction, link: _Link) -> None:
        """Copy ``source`` one way until either side ends, then close the connection."""
        assert self._forwarding is not None
        with contextlib.suppress(OSError):
            while chunk := await source.read(CHUNK):
                if self._forwarding.is_set():
                    direction.sink.write(chunk)
                    await direction.sink.drain()
                    continue
                direction.held.append(chunk)
                if direction.held_bytes >= HOLD_LIMIT:
                    await self._forwarding.wait()  # stop reading: the sender's socket fills
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        link.close()
        self._links.discard(link)
