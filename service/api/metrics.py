"""Prometheus metrics: sessions by status, RPCs by method and code, HTTP requests
by route and status, watchers, QR codes issued, messages sent. Served over HTTP
when ``--metrics-address`` is set; beyond loopback, only to a caller with a token.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from service.api.auth import Tokens
from service.domain.contract import STATUS_TEXTS, message_status_text
from service.store.messages import Message

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:  # the stubs' generic class is not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class SessionCounts(Protocol):
    def status_counts(self) -> dict[str, int]: ...

    def watcher_count(self) -> int: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None
        self.rpcs = Counter(
            "sessionmanager_rpcs",
            "RPCs handled, by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "sessionmanager_rpc_duration_seconds",
            "Time to handle an RPC (a stream: its whole life), by method.",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300),
        )
        self.http_requests = Counter(
            "sessionmanager_http_requests",
            "HTTP requests handled, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "sessionmanager_http_request_duration_seconds",
            "Time to handle an HTTP request (an event stream: its whole life), by route.",
            ["route", "method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 300),
        )
        self.qr_codes = Counter(
            "sessionmanager_qr_codes", "QR codes issued to sessions.", registry=self.registry
        )
        self.messages = Counter(
            "sessionmanager_messages",
            "Messages handed to the engine, by outcome (sent, failed or unknown).",
            ["status"],
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "sessionmanager_worker_restarts",
            "Engine workers started again after a crash, a hang or a failed dial.",
            registry=self.registry,
        )

        # Several nodes (each node serves its own; the scraper labels them by target).
        self.lease_renew_seconds = Histogram(
            "sessionmanager_lease_renew_seconds",
            "Time for one heartbeat and renewal of every lease this node holds.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.session_moves = Counter(
            "sessionmanager_session_moves",
            "Sessions this node took over (in) or handed to another node (out).",
            ["direction"],
            registry=self.registry,
        )
        self.fencing_rejections = Counter(
            "sessionmanager_fencing_rejections",
            "Writes the database refused because this node's lease epoch was stale.",
            registry=self.registry,
        )

    def on_renewal(self, seconds: float) -> None:
        self.lease_renew_seconds.observe(seconds)

    def on_move(self, direction: str) -> None:
        self.session_moves.labels(direction).inc()

    def on_fencing_rejection(self) -> None:
        self.fencing_rejections.inc()

    def on_qr_code(self) -> None:
        self.qr_codes.inc()

    def on_message(self, message: Message) -> None:
        self.messages.labels(message_status_text(message.status)).inc()

    def watch(self, sessions: SessionCounts) -> None:
        """Report the sessions by status and the open watchers of ``sessions``."""
        self.registry.register(_SessionCollector(sessions))

    def serve(self, address: str, tokens: Tokens | None = None) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port``; returns the port.

        With ``tokens``, only a request with ``Authorization: Bearer`` and a token of
        either role is answered; the others get 401.
        """
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        app = make_wsgi_app(self.registry)
        if tokens is not None:
            app = _bearer_only(app, tokens)

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._http = make_server(host, int(port), app, Server, handler_class=_QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True).start()
        return int(self._http.server_port)

    @property
    def port(self) -> int | None:
        return None if self._http is None else int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (wsgiref writes a line to stderr for each)."""


def _bearer_only(app: WSGIApplication, tokens: Tokens) -> WSGIApplication:
    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        # WSGI gives headers as latin-1 text: encoding it back gives the bytes sent.
        if scheme.lower() == "bearer" and tokens.role_of(token.strip().encode("latin-1")):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", "Bearer")],
        )
        return [b"a bearer token is required (header 'Authorization: Bearer <token>')\n"]

    return guarded


class _SessionCollector(Collector):
    def __init__(self, sessions: SessionCounts) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_status = GaugeMetricFamily(
            "sessionmanager_sessions",
            "Sessions this node holds, by status (one node holds them all).",
            labels=["status"],
        )
        counts = self._sessions.status_counts()
        for status in STATUS_TEXTS:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        yield GaugeMetricFamily(
            "sessionmanager_sessions_owned",
            "Sessions this node holds (with several nodes, its share).",
            value=sum(counts.values()),
        )
        yield GaugeMetricFamily(
            "sessionmanager_watchers",
            "Open WatchSession streams.",
            value=self._sessions.watcher_count(),
        )


class MetricsInterceptor(_ServerInterceptor):
    """Counts and times every RPC by method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _record(self, method: str, context: Any, started: float) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        self._metrics.rpcs.labels(method, name).inc()
        self._metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await behavior(request, context)
                finally:
                    self._record(method, context, started)

            return grpc.unary_unary_rpc_method_handler(unary, **serializers)
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    async for response in stream(request, context):
                        yield response
                finally:
                    self._record(method, context, started)

            return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
        return handler
