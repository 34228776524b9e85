"""A TCP proxy between one node and PostgreSQL that can cut the network, and restore it.

``NetProxy`` listens on a free port of 127.0.0.1 and forwards every connection
to the upstream address. Its faults:

- ``partition()`` is a real network partition, not a reset: from that moment
  no byte crosses in either direction, the connections stay open and hang
  (what either side sends is held, up to a bound past which the proxy stops
  reading and the sender's socket fills), and new connections are accepted and
  hang too. Two ways out: ``heal()`` closes every connection the partition
  hung, as a peer's TCP keepalive would in the end, and forwards new ones
  again; ``resume()`` delivers what was held, in order, on the same
  connections, and goes on forwarding: a stall short enough for TCP to ride it
  out, where a request sent before it reaches the other side late.
- ``blackhole(reopen_after)`` is a partition that nobody heals for the
  connections it caught: they stay open on both sides and never carry another
  byte (PostgreSQL keeps their backends, and what those hold, until the proxy
  closes), while connections opened ``reopen_after`` seconds later are
  forwarded as usual: a route that came back, with the old sockets still
  believing in each other.
- ``lose_next_commit_reply(application, containing)`` forwards the next
  ``COMMIT`` a connection named ``application`` sends (of a transaction that
  ran a statement containing ``containing``, if given), then drops the
  server's reply to it and closes both sides: the commit lands, its
  acknowledgement never does.

The proxy reads the PostgreSQL frontend protocol only as far as these need:
the startup message (its ``application_name``), each typed message's tag,
and the SQL text of a simple query, of a parse, and of the prepared statement
a bind names.

The proxy runs its own event loop in a thread of its own, so that a test
which blocks its loop (a ``subprocess.wait``, a slow fixture) never stalls the
database traffic of the nodes and never partitions them by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024
HOLD_LIMIT = 256 * 1024  # bytes held per connection and direction before the proxy stops reading
CALL_TIMEOUT = 10.0
#: Protocol codes of the untyped messages a client may open a connection with.
_STARTUP_V3 = 196608
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_COMMIT = re.compile(rb"^\s*(COMMIT|END)\b", re.IGNORECASE)
_TRANSACTION_END = re.compile(rb"^\s*(COMMIT|END|ROLLBACK|ABORT)\b", re.IGNORECASE)

T = TypeVar("T")


@dataclass(eq=False)
class _Direction:
    """One direction of a connection: where its bytes go, and what a stall holds of them."""

    sink: asyncio.StreamWriter
    held: list[bytes] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        return sum(map(len, self.held))

    def flush(self) -> None:
        for chunk in self.held:
            self.sink.write(chunk)
        self.held.clear()


class _ClientMessages:
    """Follows what a client sends: its startup parameters, then each typed message."""

    def __init__(self) -> None:
        self.parameters: dict[str, str] = {}
        self._buffer = b""
        self._started = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        """The complete typed messages ``chunk`` ends, as (tag, body)."""
        self._buffer += chunk
        messages: list[tuple[bytes, bytes]] = []
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    return messages
                (length,) = struct.unpack("!i", self._buffer[:4])
                if len(self._buffer) < length:
                    return messages
                (code,) = struct.unpack("!i", self._buffer[4:8])
                body, self._buffer = self._buffer[8:length], self._buffer[length:]
                if code == _STARTUP_V3:
                    self._started = True
                    words = body.split(b"\x00")
                    self.parameters = {
                        key.decode(errors="replace"): value.decode(errors="replace")
                        for key, value in zip(words[0::2], words[1::2], strict=False)
                        if key
                    }
                elif code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    return messages  # a cancel request: the connection ends with it
                continue
            if len(self._buffer) < 5:
                return messages
            (length,) = struct.unpack("!i", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                return messages
            tag, body = self._buffer[:1], self._buffer[5 : 1 + length]
            self._buffer = self._buffer[1 + length :]
            messages.append((tag, body))


class _Statements:
    """The SQL a client runs, message by message: simple queries, parses, and binds of
    statements parsed earlier (asyncpg prepares a statement once and binds it again)."""

    def __init__(self) -> None:
        self._prepared: dict[bytes, bytes] = {}

    def sql(self, tag: bytes, body: bytes) -> bytes | None:
        """The SQL a message runs (or prepares), if it is one that does."""
        if tag == b"Q":
            return body
        if tag == b"P":  # statement name, then the query
            name, _, rest = body.partition(b"\x00")
            query = rest.partition(b"\x00")[0]
            self._prepared[name] = query
            return query
        if tag == b"B":  # portal name, then the statement name
            _, _, rest = body.partition(b"\x00")
            return self._prepared.get(rest.partition(b"\x00")[0])
        return None


@dataclass(eq=False)
class _Link:
    """One proxied connection: both directions, the tasks that pump them, its own switch."""

    to_upstream: _Direction
    to_client: _Direction
    forwarding: asyncio.Event
    client: _ClientMessages = field(default_factory=_ClientMessages)
    statements: _Statements = field(default_factory=_Statements)
    #: The transaction under way ran a statement the armed COMMIT fault waits for.
    touched: bool = False
    #: The client's COMMIT went upstream: its reply is to be dropped, and the link closed.
    doomed: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        for direction in (self.to_upstream, self.to_client):
            direction.held.clear()
            direction.sink.close()


class NetProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` with switches for network faults."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        #: Whether a new connection is forwarded (set) or hangs like the open ones (clear).
        self._forwarding: asyncio.Event | None = None
        self._reopen: asyncio.TimerHandle | None = None
        #: Connections a blackhole caught: they never carry another byte.
        self._swallowed: set[_Link] = set()
        #: The application whose next COMMIT loses its reply, and what its transaction must
        #: have run; None when not armed.
        self._commit_victim: tuple[str, bytes] | None = None
        self._commits_lost = 0

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
        """Whether new connections hang (a partition, or a blackhole not yet reopened)."""
        return self._forwarding is not None and not self._forwarding.is_set()

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy (hung ones included)."""
        return self._call(self._count())

    @property
    def swallowed(self) -> int:
        """How many connections a blackhole caught are still open (on both sides)."""
        return self._call(self._count_swallowed())

    @property
    def held_from_clients(self) -> int:
        """How many bytes the clients sent that a stall holds back from the upstream."""
        return self._call(self._held_from_clients())

    @property
    def commits_lost(self) -> int:
        """How many COMMIT replies the proxy dropped (``lose_next_commit_reply``)."""
        return self._call(self._lost())

    def start(self) -> None:
        self._thread.start()
        self._server = self._call(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        """Stop forwarding, both ways, on every open and every new connection; keep them open."""
        self._call(self._partition())

    def heal(self) -> None:
        """Close the connections a partition or blackhole hung, then forward new ones again."""
        self._call(self._heal())

    def resume(self) -> None:
        """Deliver what the partition held, in order, and forward again on the same connections."""
        self._call(self._resume())

    def blackhole(self, reopen_after: float | None = None) -> None:
        """Stop forwarding on every open connection for good, keeping both sides open; new
        connections hang too, until ``reopen_after`` seconds from now (never if None), after
        which new ones are forwarded again."""
        self._call(self._blackhole(reopen_after))

    def lose_next_commit_reply(self, application: str, containing: bytes = b"") -> None:
        """Forward the next COMMIT of a connection whose ``application_name`` is
        ``application`` (of a transaction that ran a statement containing ``containing``),
        drop the server's reply to it, and close that connection."""
        self._call(self._arm(application, containing))

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

    async def _count_swallowed(self) -> int:
        return len(self._swallowed & self._links)

    async def _lost(self) -> int:
        return self._commits_lost

    async def _held_from_clients(self) -> int:
        return sum(link.to_upstream.held_bytes for link in self._links)

    async def _partition(self) -> None:
        assert self._forwarding is not None
        self._cancel_reopen()
        self._forwarding.clear()
        for link in self._links:
            link.forwarding.clear()

    async def _heal(self) -> None:
        assert self._forwarding is not None
        self._cancel_reopen()
        for link in list(self._links):
            if not link.forwarding.is_set():
                self._drop(link)
        self._swallowed.clear()
        self._forwarding.set()

    async def _resume(self) -> None:
        assert self._forwarding is not None
        self._cancel_reopen()
        for link in self._links - self._swallowed:
            link.to_upstream.flush()
            link.to_client.flush()
            link.forwarding.set()  # no await since the flush: nothing overtakes what was held
        self._forwarding.set()

    async def _blackhole(self, reopen_after: float | None) -> None:
        await self._partition()
        self._swallowed |= self._links
        if reopen_after is not None:
            self._reopen = self._loop.call_later(reopen_after, self._reopen_new)

    def _reopen_new(self) -> None:
        """New connections are forwarded again; those opened during the blackhole stay lost."""
        assert self._forwarding is not None
        self._reopen = None
        self._swallowed |= {link for link in self._links if not link.forwarding.is_set()}
        self._forwarding.set()

    def _cancel_reopen(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None

    async def _arm(self, application: str, containing: bytes) -> None:
        self._commit_victim = (application, containing)
        for link in self._links:
            link.touched = False  # only what runs from now on counts

    async def _close(self) -> None:
        self._cancel_reopen()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._drop(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The upstream connection opens even while new connections hang: the client cannot
        # tell, since not one byte of it is forwarded until the proxy forwards it again.
        assert self._forwarding is not None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        forwarding = asyncio.Event()
        if self._forwarding.is_set():
            forwarding.set()
        link = _Link(_Direction(up_writer), _Direction(writer), forwarding)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(reader, link.to_upstream, link, upstream=True)),
            asyncio.create_task(self._pump(up_reader, link.to_client, link, upstream=False)),
        ]

    async def _pump(
        self, source: asyncio.StreamReader, direction: _Direction, link: _Link, *, upstream: bool
    ) -> None:
        """Copy ``source`` one way until either side ends, then close the connection."""
        with contextlib.suppress(OSError):
            while chunk := await source.read(CHUNK):
                if upstream:
                    self._watch_commit(link, chunk)
                if not link.forwarding.is_set():
                    direction.held.append(chunk)
                    if direction.held_bytes >= HOLD_LIMIT:
                        await link.forwarding.wait()  # stop reading: the sender's socket fills
                    continue
                if not upstream and link.doomed:  # the reply to the COMMIT: it never arrives
                    self._commits_lost += 1
                    break
                direction.sink.write(chunk)
                await direction.sink.drain()
        if link in self._swallowed:
            return  # one side gave up; the other never hears of it (until heal or close)
        self._drop(link)

    def _watch_commit(self, link: _Link, chunk: bytes) -> None:
        """Doom the link if ``chunk`` carries the COMMIT the proxy waits for."""
        for tag, body in link.client.feed(chunk):
            sql = link.statements.sql(tag, body)
            victim = self._commit_victim
            if sql is None or victim is None:
                continue
            application, containing = victim
            if link.client.parameters.get("application_name") != application:
                continue
            if containing in sql:
                link.touched = True
            if _COMMIT.match(sql) and link.touched:
                self._commit_victim = None
                link.doomed = True  # before the COMMIT goes: its reply cannot come first
            elif _TRANSACTION_END.match(sql):
                link.touched = False

    def _drop(self, link: _Link) -> None:
        link.close()
        self._links.discard(link)
        self._swallowed.discard(link)
