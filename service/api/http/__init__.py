"""The HTTP/JSON API, its Server-Sent Events and its OpenAPI document (seeds 003, 004).

A second transport over the same domain as gRPC: ``start_http`` builds the
app from the route table and serves it in the service's event loop.
"""

from __future__ import annotations

from service.api.auth import Tokens
from service.api.http.app import Options, build_app
from service.api.http.auth import Authenticator
from service.api.http.guard import AllowedHosts
from service.api.http.server import ConnectionLimits, HttpServer
from service.api.http.sse import StreamShares
from service.api.metrics import Metrics
from service.config import Settings
from service.domain.facade import Sessions

__all__ = ["HttpServer", "Options", "start_http"]


def start_http(
    settings: Settings,
    manager: Sessions,
    tokens: Tokens,
    metrics: Metrics | None,
    max_connections: int,
) -> tuple[HttpServer, Options]:
    """Serve the HTTP API on ``settings.http_address``; the options let ``stop`` drain it."""
    options = Options(
        auth=Authenticator(tokens, settings.cors_origin_list),
        keepalive=settings.sse_keepalive,
        cors_origins=settings.cors_origin_list,
        metrics=metrics,
        allowed_hosts=AllowedHosts.of(settings.http_allowed_host_list),
        read_timeout=settings.http_read_timeout,
        streams=StreamShares(stream_share(settings)),
    )
    server = HttpServer.start(
        build_app(manager, options),
        settings.http_address,
        grace=settings.shutdown_grace,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_client_ca=settings.tls_client_ca,
        limits=ConnectionLimits(
            read_timeout=settings.http_read_timeout,
            idle_timeout=settings.http_idle_timeout,
            max_connections=max_connections,
            forwarded_allow_ips=settings.forwarded_allow_ip_list,
        ),
    )
    return server, options


def stream_share(settings: Settings) -> int:
    """One client's share of a session's event streams: at most half of the session's limit."""
    return min(settings.http_streams_per_client, max(1, settings.max_watchers_per_session // 2))
