"""uvicorn, embedded in the service's event loop.

The listening socket is bound here, before uvicorn starts, so the port is
known at once (port 0 in tests) and a busy address fails start-up with one
clear line. uvicorn installs no signal handlers (the service owns SIGTERM)
and logs through the service's logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp


class ListenError(OSError):
    """The HTTP address cannot be listened on (busy, or not an address)."""


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave signals alone: the service handles SIGTERM and SIGINT itself."""
        yield


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

    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        self._server = server
        self._socket = sock
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
    ) -> HttpServer:
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=math.ceil(grace),
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            ssl_ca_certs=str(tls_client_ca) if tls_client_ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        config.load()  # reads the TLS files now, so a bad one fails start-up
        sock = _bind(address)
        server = cls(_EmbeddedServer(config), sock)
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
