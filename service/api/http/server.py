"""uvicorn, embedded in the service's event loop.

The listening socket is bound here, before uvicorn starts, so the port is
known at once (port 0 in tests) and a busy address fails start-up with one
clear line. uvicorn installs no signal handlers (the service owns SIGTERM)
and logs through the service's logging. Each connection is bounded
(``connections``): a deadline for its request heads, an idle timeout, a cap
on how many are open; a TLS handshake gets the read timeout too.
``X-Forwarded-*`` headers are believed only from ``--forwarded-allow-ips``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from service.api.http.connections import (
    ConnectionBudget,
    bounded_protocol,
    report_accept_failures_occasionally,
)

#: The largest request head (request line and headers) a client may send.
MAX_HEAD_BYTES = 16 * 1024


class ListenError(OSError):
    """The HTTP address cannot be listened on (busy, or not an address)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """How long and how many HTTP connections may stay open."""

    #: Seconds for a request's head to arrive (and its body, and a TLS handshake).
    read_timeout: float = 10.0
    #: Seconds an idle keep-alive connection stays open.
    idle_timeout: float = 5.0
    #: Connections open at most.
    max_connections: int = 1000
    #: Proxies whose X-Forwarded-For and X-Forwarded-Proto are believed.
    forwarded_allow_ips: tuple[str, ...] = ()


class _EmbeddedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, handshake_timeout: float) -> None:
        super().__init__(config)
        self._handshake_timeout = handshake_timeout

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave signals alone: the service handles SIGTERM and SIGINT itself."""
        yield

    async def startup(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """uvicorn's start-up on the service's own sockets, with TLS handshakes bounded.

        uvicorn leaves asyncio's handshake timeout of 60 s, during which a client that
        opened TLS and says nothing holds its socket before any deadline of ours starts.
        """
        assert sockets is not None, "the service always binds the socket itself"
        await self.lifespan.startup()
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        loop = asyncio.get_running_loop()
        self.servers = [
            await loop.create_server(
                protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self._handshake_timeout if config.ssl else None,
            )
            for sock in sockets
        ]
        self.started = True


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, int(port)), family=family, backlog=2048)
    except (OSError, ValueError) as error:
        raise ListenError(f"could not listen for HTTP on {address!r}: {error}") from error


class HttpServer:
    """The HTTP listener; ``start`` binds and serves, ``close`` stops gracefully."""

    def __init__(
        self, server: uvicorn.Server, sock: socket.socket, budget: ConnectionBudget
    ) -> None:
        self._server = server
        self._socket = sock
        self.budget = budget
        self._task: asyncio.Task[None] | None = None
        self.port: int = sock.getsockname()[1]

    @classmethod
    def start(
        cls,
        app: ASGIApp,
        address: str,
        *,
        grace: float,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        limits: ConnectionLimits | None = None,
    ) -> HttpServer:
        limits = limits or ConnectionLimits()
        budget = ConnectionBudget(limits.max_connections, limits.read_timeout)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            http=bounded_protocol(budget),
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            timeout_keep_alive=max(1, math.ceil(limits.idle_timeout)),
            proxy_headers=bool(limits.forwarded_allow_ips),
            forwarded_allow_ips=list(limits.forwarded_allow_ips),
            timeout_graceful_shutdown=math.ceil(grace),
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            ssl_ca_certs=str(tls_client_ca) if tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        config.load()  # reads the TLS files now, so a bad one fails start-up
        sock = _bind(address)
        server = cls(_EmbeddedServer(config, limits.read_timeout), sock, budget)
        report_accept_failures_occasionally(asyncio.get_running_loop())
        server._task = asyncio.create_task(server._server.serve(sockets=[sock]))
        return server

    @property
    def tls(self) -> bool:
        return self._server.config.ssl is not None

    def stop_accepting(self) -> None:
        """Close the listener; requests under way go on until ``close``."""
        self._server.should_exit = True

    async def close(self) -> None:
        """Wait for open requests (streams end on their own) up to the grace, then cancel."""
        self.stop_accepting()
        if self._task is not None:
            await self._task
        self._socket.close()
