"""The ASGI application: the route table served, with auth, body checks, logs and metrics.

Every request goes the same way: its Host checked (``guard``), refused with
503 while the server stops, authenticated (``auth``), its query and JSON body
validated against the route's declared models (strict types, no unknown
fields, at most ``MAX_BODY`` bytes, read within the read timeout), then
handed to the route's handler. Any failure leaves as seed 003's error body,
and every answer carries the safety headers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.console import console_routes
from service.api.http import openapi
from service.api.http.auth import CSRF_HEADER, Authenticator
from service.api.http.errors import (
    HttpError,
    error_response,
    invalid,
    shutting_down,
    unexpected,
)
from service.api.http.guard import AllowedHosts, HostCheck, SafetyHeaders
from service.api.http.routes import ENDPOINTS, Call, Endpoint
from service.api.http.sse import StreamShares
from service.api.metrics import Metrics
from service.domain import validation
from service.domain.errors import ContractError
from service.domain.facade import Sessions

log = logging.getLogger("service.api.http")

MAX_BODY = 64 * 1024


@dataclass
class Options:
    """What the app needs besides the domain."""

    auth: Authenticator
    keepalive: float = 15.0
    cors_origins: tuple[str, ...] = ()
    metrics: Metrics | None = None
    #: The Host names answered besides localhost and IP addresses.
    allowed_hosts: AllowedHosts = field(default_factory=lambda: AllowedHosts.of(()))
    #: Seconds a client gets to send a request's body.
    read_timeout: float = 10.0
    #: Each client's share of a session's event streams.
    streams: StreamShares = field(default_factory=lambda: StreamShares(10))
    #: Set when the server starts to stop: every new request gets 503.
    draining: bool = field(default=False)
    #: Whether the server can serve: ``/health`` answers 503 ``not_serving`` when not.
    serving: Callable[[], bool] = field(default=lambda: True)


def build_app(manager: Sessions, options: Options) -> Starlette:
    document = functools.cache(lambda: openapi.encoded(ENDPOINTS))
    by_path: dict[str, dict[str, Endpoint]] = {}
    for spec in ENDPOINTS:
        by_path.setdefault(spec.path, {})[spec.method] = spec
    routes = [
        Route(path, _dispatch(specs, manager, options, document), methods=list(specs))
        for path, specs in by_path.items()
    ]
    # The first is the outermost: every answer gets the safety headers, and nothing
    # (CORS, a redirect, a route) sees a request whose Host is not allowed.
    middleware = [
        Middleware(SafetyHeaders),
        Middleware(HostCheck, allowed=options.allowed_hosts),
    ]
    if options.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=options.cors_origins,
                allow_methods=("GET", "POST", "DELETE"),
                allow_headers=(
                    "Authorization",
                    "Content-Type",
                    "Idempotency-Key",
                    "Last-Event-ID",
                    CSRF_HEADER,
                ),
                allow_credentials=True,
                expose_headers=("Retry-After",),
            )
        )
    middleware.append(Middleware(RequestLog, metrics=options.metrics))
    return Starlette(
        routes=[*routes, *console_routes()],  # the web console at /
        middleware=middleware,
        exception_handlers={HTTPException: _http_exception},
    )


def _dispatch(
    specs: dict[str, Endpoint],
    manager: Sessions,
    options: Options,
    document: Callable[[], bytes],
) -> Callable[[Request], Awaitable[Response]]:
    """One path's endpoint: the route of the request's method (HEAD answers as GET)."""

    async def handle(request: Request) -> Response:
        spec = specs[_method(request)]
        try:
            if options.draining:
                raise shutting_down()
            caller = options.auth.check(request, spec.access)
            iid = request.path_params.get("instance_id", "")
            if iid:  # first, as gRPC does: every later error names the session
                validation.instance_id(iid)
            body = await _input(request, spec, iid, options.read_timeout)
            call = Call(
                request,
                manager,
                options.auth,
                body,
                options.keepalive,
                document,
                options.serving,
                options.streams,
                caller,
            )
            return await spec.handler(call)
        except HttpError as failure:
            return _failed(request, failure)
        except ContractError as error:
            return _failed(request, HttpError(error))
        except Exception as error:  # noqa: BLE001 - the contract's SESSION_MANAGER_ERROR
            return _failed(request, unexpected(error))

    return handle


def _method(request: Request) -> str:
    return "GET" if request.method == "HEAD" else request.method


def _failed(request: Request, failure: HttpError) -> Response:
    instance_id = failure.error.metadata.get("instance_id") or request.path_params.get(
        "instance_id"
    )
    log.log(
        logging.WARNING if failure.status >= 500 else logging.INFO,
        "%s %s: %d %s: %s",
        request.method,
        request.url.path,
        failure.status,
        failure.error.code,
        failure.error.message,
        extra={"instance_id": instance_id} if instance_id else None,
    )
    return error_response(failure)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 (method), in the error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = f"no route {request.method} {request.url.path}; the routes are in /openapi.json"
    failure = invalid("path", message, exc.status_code)
    failure.headers.update(exc.headers or {})
    return error_response(failure)


async def _input(
    request: Request, spec: Endpoint, iid: str, read_timeout: float
) -> BaseModel | None:
    if spec.query is not None:
        try:
            return spec.query.model_validate(dict(request.query_params))
        except ValidationError as error:
            raise _rejected(error, "query", iid) from None
    if spec.body is None:
        return None
    # A form (even an empty one) is refused before its body is read: what a page on another
    # site can post is a form, never JSON.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type and not _is_json(media_type):
        raise _not_json(media_type, iid)
    raw = await _read_body(request, iid, read_timeout)
    if not raw:
        if spec.body_required:
            raise invalid("body", "a JSON object is required as the body", instance_id=iid)
        return spec.body()
    if not media_type:
        raise _not_json(media_type, iid)
    try:
        return spec.body.model_validate_json(raw)
    except ValidationError as error:
        raise _rejected(error, "body", iid) from None


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _not_json(media_type: str, iid: str) -> HttpError:
    return invalid(
        "content-type",
        f"the body must be application/json, got {media_type or 'no content type'!r}",
        status=415,
        instance_id=iid,
    )


async def _read_body(request: Request, iid: str, read_timeout: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large(iid)
    body = bytearray()
    try:
        async with asyncio.timeout(read_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    raise _too_large(iid)
    except TimeoutError:
        failure = invalid("body", f"the body did not arrive within {read_timeout:g} s", 408, iid)
        failure.headers["Connection"] = "close"  # what is still on its way is not read
        raise failure from None
    except ClientDisconnect:
        raise invalid(
            "body", "the client closed the connection before sending the whole body", 400, iid
        ) from None
    return bytes(body)


def _too_large(iid: str) -> HttpError:
    return invalid("body", f"the body is larger than {MAX_BODY} bytes", 413, iid)


def _rejected(error: ValidationError, where: str, iid: str) -> HttpError:
    """The first problem pydantic found, as INVALID_ARGUMENT naming the field."""
    first: ErrorDetails = error.errors(include_url=False)[0]
    name = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "json_invalid":
        return invalid("body", f"the body is not valid JSON: {first['msg']}", instance_id=iid)
    if not name:
        return invalid(where, f"the {where} must be a JSON object", instance_id=iid)
    if kind == "extra_forbidden":
        return invalid(name, f"unknown field {name!r}", instance_id=iid)
    if kind == "missing":
        return invalid(name, f"{name} is required", instance_id=iid)
    return invalid(name, f"{name}: {first['msg']}", instance_id=iid)


class RequestLog:
    """One debug line and the metrics of every request, by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", "unmatched")
        method = scope["method"]
        if self._metrics is not None:
            self._metrics.http_requests.labels(template, method, str(status)).inc()
            self._metrics.http_seconds.labels(template, method).observe(seconds)
        if log.isEnabledFor(logging.DEBUG):
            instance_id = scope.get("path_params", {}).get("instance_id")
            log.debug(
                "%s %s %d in %.1f ms",
                method,
                scope["path"],
                status,
                seconds * 1000,
                extra={"instance_id": instance_id} if instance_id else None,
            )
