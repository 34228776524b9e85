"""What every HTTP answer goes through first: the Host check and the safety headers.

A page that rebinds its own DNS name to 127.0.0.1 is, to the browser, the
same origin as the service, and could read and change everything. Its
requests still name its own host, so the service answers only to the names
it is reached by: ``localhost``, IP addresses (a page's origin can only be
such an address if the service itself served it) and ``--http-allowed-hosts``.
Any other ``Host`` gets 400 ``INVALID_ARGUMENT`` (``details.field = host``)
before anything else runs, so nothing (a redirect either) is built from it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.http.errors import error_response, invalid

log = logging.getLogger("service.api.http")

#: Host names every server answers to.
LOOPBACK_NAMES = ("localhost",)
#: One year, in seconds: how long a browser keeps to HTTPS once it saw the service over it.
HSTS_SECONDS = 365 * 24 * 3600
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


@dataclass(frozen=True)
class AllowedHosts:
    """The host names the service answers to; ``*.example`` stands for every subdomain."""

    names: frozenset[str]
    suffixes: tuple[str, ...]

    @classmethod
    def of(cls, configured: Iterable[str]) -> AllowedHosts:
        names = {name.lower().rstrip(".") for name in (*LOOPBACK_NAMES, *configured)}
        suffixes = tuple(sorted(name[1:] for name in names if name.startswith("*.")))
        return cls(frozenset(name for name in names if not name.startswith("*.")), suffixes)

    def permit(self, header: str | None) -> bool:
        """Whether a ``Host`` header names this service (any port)."""
        match = _HOST_HEADER.fullmatch(header or "")
        if match is None:
            return False
        host = match[1].strip("[]").lower().rstrip(".")
        return _is_ip_address(host) or host in self.names or host.endswith(self.suffixes)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheck:
    """Refuses, with the contract's error body, a request whose Host is not allowed."""

    def __init__(self, app: ASGIApp, allowed: AllowedHosts) -> None:
        self._app = app
        self._allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if self._allowed.permit(host):
            await self._app(scope, receive, send)
            return
        failure = invalid(
            "host",
            f"this service does not answer to the host {host!r}; "
            "the names it answers to are set by --http-allowed-hosts",
        )
        log.info("%s %s: 400 INVALID_ARGUMENT: unknown host", scope["method"], scope["path"])
        await error_response(failure)(scope, receive, send)


class SafetyHeaders:
    """Every answer: ``nosniff``, ``Cache-Control: no-store`` unless it says otherwise, and
    ``Strict-Transport-Security`` over HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Cache-Control", "no-store")
                if https:
                    headers.setdefault("Strict-Transport-Security", f"max-age={HSTS_SECONDS}")
            await send(message)

        await self._app(scope, receive, sending)
