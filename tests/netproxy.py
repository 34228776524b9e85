"""A TCP proxy between one node and PostgreSQL that can cut the network and restore it.

``NetProxy`` listens on a free port of 127.0.0.1 and forwards every connection
to the upstream address. ``partition()`` is a real network partition, not a
reset: from that moment no byte crosses in either direction, the connections
stay open and hang (the kernel's buffers fill, writers block, readers wait),
and new connections are accepted and hang too, as a SYN answered by nobody
behind a firewall would leave a client waiting. ``heal()`` closes every hung
connection, as a peer's TCP keepalive would in the end, and forwards again.

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
CALL_TIMEOUT = 10.0

T = TypeVar("T")


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side, the upstream side (once open), the pumps."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def freeze(self) -> None:
        """Stop moving bytes; both sockets stay open."""
        for pump in self.pumps:
            pump.cancel()

    def close(self) -> None:
        self.freeze()
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()


class NetProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` with a switch for a network partition."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._partitioned = False

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
        return self._partitioned

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy (hung ones included)."""
        return self._call(self._count())

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        """Stop forwarding, both ways, on every open and every new connection; keep them open."""
        self._call(self._partition())

    def heal(self) -> None:
        """Close the connections the partition hung, then forward new ones again."""
        self._call(self._heal())

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

    async def _count(self) -> int:
        return len(self._links)

    async def _partition(self) -> None:
        self._partitioned = True
        for link in self._links:
            link.freeze()

    async def _heal(self) -> None:
        for link in list(self._links):
            link.close()
        self._links.clear()
        self._partitioned = False

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._heal()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        if self._partitioned:
            return  # accepted, never answered: it hangs until heal() closes it
        try:
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._drop(link)
            return
        if self._partitioned:  # cut while the upstream connection was being opened
            return
        link.pumps = [
            asyncio.create_task(self._pump(reader, link.upstream, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy ``source`` to ``sink`` until either side ends, then close the connection."""
        with contextlib.suppress(OSError):
            while chunk := await source.read(CHUNK):
                sink.write(chunk)
                await sink.drain()
        self._drop(link)

    def _drop(self, link: _Link) -> None:
        link.close()
        self._links.discard(link)
