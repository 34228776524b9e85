"""The old single-session service's routes, for Central Hub's transition (seed 003, sections 0, 4).

Before the Session Manager, one WhatsApp session served the whole system,
behind ``GET /status``, ``GET /qr``, ``POST /connect``, ``POST /disconnect``
and ``POST /send`` (``cliente_id`` in the body, only as metadata), with its
own status words. Off by default; ``--legacy-instance ID`` serves them for
that one session, over the same domain as every other route, so that Central
Hub's old code keeps working while it moves to the resource routes.

The old status words are mapped here, at this edge only, and nowhere else
(``connecting`` was ``AUTHENTICATED``, ``connected`` was ``READY``). Every
answer of these routes, errors included, carries ``Deprecation`` (RFC 9745),
``Sunset`` (RFC 8594) and a ``Link`` to the route that replaces it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from service.api.http import schemas
from service.api.http.errors import JSON, HttpError, error_response, invalid
from service.api.http.payloads import encode, send_json, session_json
from service.domain import errors, validation
from service.domain.contract import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    ERROR,
    INIT,
    QR_GENERATED,
    QR_REQUIRED,
    Status,
)
from service.domain.states import Session
from sessionmanager.v1 import session_pb2

if TYPE_CHECKING:
    from service.api.http.routes import Call

#: When these routes were deprecated, and when they stop being served.
DEPRECATED = datetime(2026, 12, 4, tzinfo=UTC)
SUNSET = datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)

#: The old service's status words, by the contract's status: at this edge only.
LEGACY_STATUS: dict[Status, str] = {
    INIT: "INIT",
    QR_REQUIRED: "QR_REQUIRED",
    CONNECTING: "AUTHENTICATED",
    CONNECTED: "READY",
    DISCONNECTED: "DISCONNECTED",
    ERROR: "ERROR",
}

_SESSIONS = "/api/session-manager/sessions"
#: The route that replaces each old one, for the session ``{iid}``.
SUCCESSORS = {
    "/status": _SESSIONS + "/{iid}",
    "/qr": _SESSIONS + "/{iid}/qr",
    "/connect": _SESSIONS + "/{iid}/qr",
    "/disconnect": _SESSIONS + "/{iid}/disconnect",
    "/send": _SESSIONS + "/{iid}/send",
}


def deprecation_headers(path: str, instance_id: str) -> dict[str, str]:
    """``Deprecation``, ``Sunset`` and the ``Link`` to the route that replaces ``path``."""
    successor = SUCCESSORS[path].format(iid=instance_id)
    return {
        "Deprecation": f"@{int(DEPRECATED.timestamp())}",
        "Sunset": format_datetime(SUNSET, usegmt=True),
        "Link": f'<{successor}>; rel="successor-version"',
    }


def legacy_instance(call: Call) -> str:
    """The session these routes serve; the routes are not served without one."""
    instance_id: str = getattr(call.request.app.state, "legacy_instance", "")
    if not instance_id:
        raise invalid(
            "path",
            f"no route {call.request.method} {call.request.url.path}: the old single-session "
            "routes are served only with --legacy-instance; the routes are in /openapi.json",
            404,
        )
    return instance_id


def _legacy_status(session: Session, **more: Any) -> dict[str, Any]:
    return {"status": LEGACY_STATUS[session.status], "session": session_json(session), **more}


#: What an old route does for its session: the body of its answer.
Behaviour = Callable[["Call", str], Awaitable[dict[str, Any]]]


async def _answer(call: Call, handler: Behaviour) -> Response:
    """Run ``handler(call, instance_id)``; its answer or its error, with the deprecation headers."""
    instance_id = legacy_instance(call)
    headers = deprecation_headers(call.request.url.path, instance_id)
    try:
        body = await handler(call, instance_id)
    except errors.ContractError as error:
        return error_response(HttpError(error, headers=headers))
    except HttpError as failure:
        failure.headers.update(headers)
        return error_response(failure)
    return Response(encode(body), 200, headers, media_type=JSON)


async def _status(call: Call, instance_id: str) -> dict[str, Any]:
    return _legacy_status(await call.manager.get(instance_id))


async def _qr(call: Call, instance_id: str) -> dict[str, Any]:
    session = await call.manager.get(instance_id)
    if session.status == CONNECTED:
        raise errors.in_status(
            session_pb2.ERROR_REASON_SESSION_ALREADY_CONNECTED,
            f"session {instance_id!r} is already connected",
            instance_id,
            session.status,
        )
    if session.qr_status != QR_GENERATED:
        raise errors.in_status(
            session_pb2.ERROR_REASON_QR_NOT_AVAILABLE,
            f"session {instance_id!r} shows no QR code; POST /connect shows one",
            instance_id,
            session.status,
        )
    body = session_json(session)
    return _legacy_status(session, qr_string=body["qr_string"], qr_expires_at=body["qr_expires_at"])


async def _connect(call: Call, instance_id: str) -> dict[str, Any]:
    """Start the session as the old ``/connect`` did: created if missing, then paired."""
    try:
        session = await call.manager.get(instance_id)
    except errors.ContractError as error:
        if error.reason != session_pb2.ERROR_REASON_SESSION_NOT_FOUND:
            raise
        session = await call.manager.create(instance_id)
    if session.status in (CONNECTED, CONNECTING):
        return _legacy_status(session)
    session = await call.manager.request_qr(instance_id)
    body = session_json(session)
    return _legacy_status(session, qr_string=body["qr_string"], qr_expires_at=body["qr_expires_at"])


async def _disconnect(call: Call, instance_id: str) -> dict[str, Any]:
    return _legacy_status(await call.manager.disconnect(instance_id))


async def _send(call: Call, instance_id: str) -> dict[str, Any]:
    body = call.parsed(schemas.LegacySendBody)
    if (body.message is None) == (body.text is None):
        raise invalid(
            "message", "send the text as message (or text), once", instance_id=instance_id
        )
    to = validation.recipient(body.to, instance_id)
    text = validation.text(body.message or body.text or "", instance_id)
    key = body.idempotency_key or call.request.headers.get("idempotency-key")
    if key is not None:
        key = validation.idempotency_key(key, instance_id)
    return send_json(await call.manager.send(instance_id, to, text, key))


async def legacy_status(call: Call) -> Response:
    return await _answer(call, _status)


async def legacy_qr(call: Call) -> Response:
    return await _answer(call, _qr)


async def legacy_connect(call: Call) -> Response:
    return await _answer(call, _connect)


async def legacy_disconnect(call: Call) -> Response:
    return await _answer(call, _disconnect)


async def legacy_send(call: Call) -> Response:
    return await _answer(call, _send)
