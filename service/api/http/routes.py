"""Every HTTP route: its declaration and its handler, the one place that calls the domain.

Each handler does what its gRPC twin in ``service.api.rpc`` does — the same
``SessionManager`` method, the same ``validation`` functions — and only
changes the wire form. The table ``ENDPOINTS`` is what the app serves and
what the OpenAPI document is generated from.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from service.api.http import schemas
from service.api.http.auth import COOKIE, COOKIE_SECONDS, Access, Authenticator, Caller
from service.api.http.errors import JSON, invalid
from service.api.http.payloads import encode, send_json, session_bytes, session_json
from service.api.http.sse import SessionEventStream, StreamShares
from service.domain import states, validation
from service.domain.contract import Reason, Status, status_from_text
from service.domain.facade import Sessions
from service.domain.states import Session
from sessionmanager.v1 import session_pb2

PREFIX = "/api/session-manager"

M = TypeVar("M", bound=BaseModel)
R = session_pb2


@dataclass(frozen=True)
class Call:
    """One request, as a handler sees it."""

    request: Request
    manager: Sessions
    auth: Authenticator
    body: BaseModel | None
    keepalive: float
    openapi: Callable[[], bytes]
    #: Whether this server can serve (a node that lost its database cannot).
    serving: Callable[[], bool] = lambda: True
    #: Each client's share of a session's event streams.
    streams: StreamShares = field(default_factory=lambda: StreamShares(10))
    #: Who calls: its token and address.
    caller: Caller = field(default_factory=Caller)

    def parsed(self, model: type[M]) -> M:
        assert isinstance(self.body, model)
        return self.body

    @property
    def instance_id(self) -> str:
        return validation.instance_id(self.request.path_params["instance_id"])


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """A route's declaration: what it takes, what it answers, who may call it."""

    method: str
    path: str
    handler: Handler
    summary: str
    access: Access
    status: int = 200
    response: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    reasons: tuple[Reason, ...] = ()
    query: type[BaseModel] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = JSON
    tags: tuple[str, ...] = ("sessions",)


def _json(body: Any, status: int = 200) -> Response:
    return Response(encode(body), status, media_type=JSON)


def _session(session: Session, status: int = 200) -> Response:
    return Response(session_bytes(session), status, media_type=JSON)


# Handlers.


async def health(call: Call) -> Response:
    if not call.serving():
        return _json({"status": "not_serving"}, 503)
    return _json({"status": "serving"})


async def openapi(call: Call) -> Response:
    return Response(call.openapi(), media_type=JSON)


async def get_session(call: Call) -> Response:
    return _session(await call.manager.get(call.instance_id))


async def request_qr(call: Call) -> Response:
    session = await call.manager.request_qr(call.instance_id)
    body = session_json(session)
    return _json(
        {"qr_string": body["qr_string"], "qr_expires_at": body["qr_expires_at"], "session": body}
    )


async def pair_phone(call: Call) -> Response:
    iid = call.instance_id
    phone = validation.phone_number(call.parsed(schemas.PairPhoneBody).phone_number, iid=iid)
    code, session = await call.manager.pair_phone(iid, phone)
    return _json({"linking_code": code, "session": session_json(session)})


async def send(call: Call) -> Response:
    iid = call.instance_id
    body = call.parsed(schemas.SendBody)
    to = validation.recipient(body.to, iid)
    text = validation.text(body.text, iid)
    key = _idempotency_key(call.request, body.idempotency_key, iid)
    return _json(send_json(await call.manager.send(iid, to, text, key)))


def _idempotency_key(request: Request, in_body: str | None, iid: str) -> str | None:
    in_header = request.headers.get("idempotency-key")
    if in_header is not None and in_body is not None and in_header != in_body:
        raise invalid(
            "idempotency_key",
            "the Idempotency-Key header and the body's idempotency_key differ",
            instance_id=iid,
        )
    key = in_body if in_body is not None else in_header
    return None if key is None else validation.idempotency_key(key, iid)


async def disconnect(call: Call) -> Response:
    return _session(await call.manager.disconnect(call.instance_id))


async def events(call: Call) -> Response:
    iid = call.instance_id
    if call.request.method == "HEAD":  # the headers a stream would have, and no stream
        await call.manager.get(iid)
        return Response(media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    give_back = call.streams.take(call.caller.key, iid)
    try:
        watcher = await call.manager.watch(iid)
    except BaseException:
        give_back()
        raise

    def release() -> None:
        call.manager.unwatch(iid, watcher)
        give_back()

    return SessionEventStream(watcher, release, call.keepalive)


async def create_session(call: Call) -> Response:
    iid = validation.instance_id(call.parsed(schemas.CreateSessionBody).instance_id)
    return _session(await call.manager.create(iid), 201)


async def list_sessions(call: Call) -> Response:
    query = call.parsed(schemas.ListQuery)
    size = validation.page_size(query.page_size)
    after = validation.page_token(query.page_token)
    status: Status | None = None if query.status is None else status_from_text(query.status)
    sessions, last = await call.manager.list(size, after, status)
    return _json(
        {
            "sessions": [session_json(s) for s in sessions],
            "next_page_token": None if last is None else validation.encode_page_token(last),
        }
    )


async def delete_session(call: Call) -> Response:
    await call.manager.delete(call.instance_id)
    return Response(status_code=204)


async def report_connected(call: Call) -> Response:
    body = call.parsed(schemas.ConnectedEvent)
    iid = validation.instance_id(body.instance_id)
    phone = validation.phone_number(body.phone_number, iid=iid)
    return _session(await call.manager.report_current(iid, states.Connected(phone)))


async def report_disconnected(call: Call) -> Response:
    body = call.parsed(schemas.DisconnectedEvent)
    iid = validation.instance_id(body.instance_id)
    reason = session_pb2.DisconnectReason.Value(f"DISCONNECT_REASON_{body.reason}")
    message = "" if body.message is None else validation.error_message(body.message, iid)
    event = states.Disconnected(reason, message)
    return _session(await call.manager.report_current(iid, event))


async def issue_cookie(call: Call) -> Response:
    response = Response(status_code=204)
    if not call.auth.enabled:
        return response
    role = call.auth.bearer_role(call.request)
    if role is None:
        raise call.auth.missing_bearer()
    response.set_cookie(
        COOKIE,
        call.auth.issue_cookie(role),
        max_age=COOKIE_SECONDS,
        path="/",
        secure=call.request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


async def clear_cookie(call: Call) -> Response:
    call.auth.revoke_cookie(call.request)
    response = Response(status_code=204)
    response.delete_cookie(
        COOKIE,
        path="/",
        secure=call.request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


# The table.

_SESSION = f"{PREFIX}/sessions/{{instance_id}}"
_ID = (R.ERROR_REASON_INVALID_INSTANCE_ID, R.ERROR_REASON_SESSION_NOT_FOUND)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/health",
        health,
        "Serving status, open to probes.",
        Access.OPEN,
        response=schemas.Health,
        tags=("service",),
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/health",
        health,
        "Serving status (same as /health).",
        Access.OPEN,
        response=schemas.Health,
        tags=("service",),
    ),
    Endpoint(
        "GET",
        "/openapi.json",
        openapi,
        "This document.",
        Access.OPEN,
        tags=("service",),
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/openapi.json",
        openapi,
        "This document (same as /openapi.json).",
        Access.OPEN,
        tags=("service",),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/auth/cookie",
        issue_cookie,
        "Trade the bearer token for the sm_auth cookie (browsers, EventSource).",
        Access.OPEN,
        status=204,
        reasons=(R.ERROR_REASON_UNAUTHENTICATED,),
        tags=("auth",),
    ),
    Endpoint(
        "DELETE",
        f"{PREFIX}/auth/cookie",
        clear_cookie,
        "Clear the sm_auth cookie, and revoke every cookie of its token issued until now.",
        Access.OPEN,
        status=204,
        tags=("auth",),
    ),
    Endpoint(
        "GET",
        _SESSION,
        get_session,
        "The session (GetSession).",
        Access.PUBLIC,
        response=schemas.SessionJSON,
        reasons=_ID,
    ),
    Endpoint(
        "POST",
        f"{_SESSION}/qr",
        request_qr,
        "The session's valid QR code, starting a pairing if needed (RequestQR).",
        Access.PUBLIC,
        response=schemas.QRResponse,
        body=schemas.EmptyBody,
        body_required=False,
        reasons=(
            *_ID,
            R.ERROR_REASON_SESSION_ALREADY_CONNECTED,
            R.ERROR_REASON_QR_NOT_AVAILABLE,
            R.ERROR_REASON_QR_GENERATION_FAILED,
        ),
    ),
    Endpoint(
        "POST",
        f"{_SESSION}/pair-phone",
        pair_phone,
        "WhatsApp's linking code for a phone number (PairPhone).",
        Access.PUBLIC,
        response=schemas.PairPhoneResponse,
        body=schemas.PairPhoneBody,
        reasons=(
            *_ID,
            R.ERROR_REASON_INVALID_ARGUMENT,
            R.ERROR_REASON_SESSION_ALREADY_CONNECTED,
            R.ERROR_REASON_QR_NOT_AVAILABLE,
            R.ERROR_REASON_QR_GENERATION_FAILED,
            R.ERROR_REASON_WHATSAPP_ERROR,
        ),
    ),
    Endpoint(
        "POST",
        f"{_SESSION}/send",
        send,
        "Send a text message (Send).",
        Access.PUBLIC,
        response=schemas.SendResponse,
        body=schemas.SendBody,
        headers={"Idempotency-Key": "Same as the body's idempotency_key."},
        reasons=(
            *_ID,
            R.ERROR_REASON_INVALID_ARGUMENT,
            R.ERROR_REASON_SESSION_NOT_CONNECTED,
            R.ERROR_REASON_WHATSAPP_ERROR,
            R.ERROR_REASON_LIMIT_EXCEEDED,
        ),
    ),
    Endpoint(
        "POST",
        f"{_SESSION}/disconnect",
        disconnect,
        "Unlink the device; the session after it (Disconnect).",
        Access.PUBLIC,
        response=schemas.SessionJSON,
        body=schemas.EmptyBody,
        body_required=False,
        reasons=(*_ID, R.ERROR_REASON_SESSION_NOT_CONNECTED),
    ),
    Endpoint(
        "GET",
        f"{_SESSION}/events",
        events,
        "Server-Sent Events: the current state, then every committed change (WatchSession).",
        Access.PUBLIC,
        response=schemas.SessionJSON,
        media_type="text/event-stream",
        reasons=(*_ID, R.ERROR_REASON_LIMIT_EXCEEDED),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/sessions",
        create_session,
        "Create a session (CreateSession).",
        Access.PUBLIC,
        status=201,
        response=schemas.SessionJSON,
        body=schemas.CreateSessionBody,
        reasons=(R.ERROR_REASON_INVALID_INSTANCE_ID, R.ERROR_REASON_SESSION_ALREADY_EXISTS),
    ),
    Endpoint(
        "GET",
        f"{PREFIX}/sessions",
        list_sessions,
        "One page of sessions by instance_id (ListSessions).",
        Access.PUBLIC,
        response=schemas.SessionPage,
        query=schemas.ListQuery,
        reasons=(R.ERROR_REASON_INVALID_ARGUMENT,),
    ),
    Endpoint(
        "DELETE",
        _SESSION,
        delete_session,
        "Delete a session and its credentials.",
        Access.PUBLIC,
        status=204,
        reasons=_ID,
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/internal/events/connected",
        report_connected,
        "The engine side reports a connection (ReportConnected).",
        Access.INTERNAL,
        response=schemas.SessionJSON,
        body=schemas.ConnectedEvent,
        reasons=(*_ID, R.ERROR_REASON_INVALID_ARGUMENT, R.ERROR_REASON_INVALID_TRANSITION),
        tags=("internal",),
    ),
    Endpoint(
        "POST",
        f"{PREFIX}/internal/events/disconnected",
        report_disconnected,
        "The engine side reports a disconnection (ReportDisconnected).",
        Access.INTERNAL,
        response=schemas.SessionJSON,
        body=schemas.DisconnectedEvent,
        reasons=(*_ID, R.ERROR_REASON_INVALID_ARGUMENT, R.ERROR_REASON_INVALID_TRANSITION),
        tags=("internal",),
    ),
)
