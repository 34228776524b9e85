"""The OpenAPI 3.1 document, generated from the route table.

Paths, parameters, bodies, responses and error statuses all come from each
``Endpoint`` and the pydantic models it names, so the document describes what
is served and cannot drift from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api.http import schemas
from service.api.http.auth import COOKIE, CSRF_HEADER, Access
from service.api.http.errors import JSON
from service.api.http.payloads import encode
from service.api.http.routes import Endpoint
from service.domain.contract import reason_code
from service.domain.errors import ContractError
from sessionmanager.v1 import session_pb2

VERSION = "1.0.0"
_REF = "#/components/schemas/{model}"
_PATH_PARAMETER = re.compile(r"{(\w+)}")

#: One event of a session's stream (OpenAPI 3.1: the schema of a stream describes each event).
_EVENT: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"const": "session"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": {"$ref": _REF.format(model="SessionJSON")},
                },
            },
        },
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": "end"},
                "data": {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": {"$ref": _REF.format(model="EndEvent")},
                },
            },
        },
    ]
}


def _json_data(model: str) -> dict[str, Any]:
    return {
        "type": "string",
        "contentMediaType": JSON,
        "contentSchema": {"$ref": _REF.format(model=model)},
    }


#: One event of the event log's stream (``GET /events``).
_LOG_EVENT: dict[str, Any] = {
    "oneOf": [
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {"event": {"const": "session"}, "data": _json_data("SessionJSON")},
        },
        {
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"enum": ["checkpoint"]},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": _json_data("CheckpointJSON"),
            },
        },
        {
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"enum": ["session.updated", "session.deleted", "message.updated"]},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "data": _json_data("EventJSON"),
            },
        },
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {"event": {"const": "end"}, "data": _json_data("EndEvent")},
        },
    ]
}

#: What each event stream says it sends, by its handler's name.
_STREAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "events": (
        "An event stream: `retry: 2000`, then `event: session` events "
        "(`id:` the revision, `data:` a SessionJSON), `: keep-alive` comments while idle, "
        "and a final `event: end` whose data is an EndEvent.",
        _EVENT,
    ),
    "all_events": (
        "An event stream: `retry: 2000`; without a cursor the current state (`event: "
        "session`, a SessionJSON each, no `id:`) and an `event: checkpoint`; then each event "
        "(`event:` its type, `id:` its sequence number, `data:` an EventJSON); while idle a "
        "checkpoint or a `: keep-alive` comment; a final `event: end` (EndEvent) when the "
        "server stops or the log was trimmed past the reader.",
        _LOG_EVENT,
    ),
}

_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    schemas.ErrorJSON,
    schemas.EndEvent,
    schemas.EventJSON,
    schemas.CheckpointJSON,
)
#: Request headers whose values have a form of their own.
_HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Last-Event-ID": {"type": "string", "pattern": schemas.SEQUENCE_PATTERN},
}
#: The pattern of each path parameter.
_PATH_PATTERNS = {
    "instance_id": (schemas.INSTANCE_ID_PATTERN, "sender_51"),
    "message_id": (schemas.MESSAGE_ID_PATTERN, "0f8b1c2e-4d5a-4b6c-9d7e-8f9a0b1c2d3e"),
}


def _reason_status(reason: session_pb2.ErrorReason.ValueType) -> int:
    return ContractError(reason, "").http_status


def _error_statuses(spec: Endpoint) -> dict[int, list[str]]:
    """Each error status the route can answer, with the codes it carries."""
    statuses: dict[int, list[str]] = {}

    def add(status: int, code: str) -> None:
        codes = statuses.setdefault(status, [])
        if code not in codes:
            codes.append(code)

    for reason in spec.reasons:
        add(_reason_status(reason), reason_code(reason))
    if spec.body is not None or spec.query is not None or "{" in spec.path:
        add(400, "INVALID_ARGUMENT")
    if spec.body is not None:
        add(413, "INVALID_ARGUMENT")
        add(415, "INVALID_ARGUMENT")
    if spec.access is not Access.OPEN:
        add(401, "UNAUTHENTICATED")
        add(403, "PERMISSION_DENIED")
    add(500, "SESSION_MANAGER_ERROR")
    add(503, "SESSION_MANAGER_ERROR")
    return dict(sorted(statuses.items()))


def _error_response(status: int, codes: list[str]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": " or ".join(codes),
        "content": {JSON: {"schema": {"$ref": _REF.format(model="ErrorJSON")}}},
    }
    if status in (429, 503):
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def _parameters(spec: Endpoint) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = []
    for name in _PATH_PARAMETER.findall(spec.path):
        pattern, example = _PATH_PATTERNS[name]
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": pattern},
                "example": example,
            }
        )
    if spec.query is not None:
        query_schema = spec.query.model_json_schema(ref_template=_REF)
        for name, schema in query_schema["properties"].items():
            schema = {k: v for k, v in schema.items() if k not in ("default", "title")}
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": schema.pop("description", ""),
                    "schema": _nullable_removed(schema),
                }
            )
    for name, description in spec.headers.items():
        parameters.append(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": _HEADER_SCHEMAS.get(
                    name, {"type": "string", "minLength": 1, "maxLength": 128}
                ),
            }
        )
    return parameters


def _nullable_removed(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the ``null`` alternative."""
    options = schema.get("anyOf")
    if options is None:
        return schema
    kept = [option for option in options if option.get("type") != "null"]
    return kept[0] if len(kept) == 1 else {"anyOf": kept}


def _success(spec: Endpoint) -> dict[str, Any]:
    if spec.response is None and spec.status == 204:
        return {"description": "Done; no body."}
    if spec.media_type == "text/event-stream":
        description, events = _STREAMS[spec.handler.__name__]
        return {"description": description, "content": {"text/event-stream": {"schema": events}}}
    schema: dict[str, Any] = (
        {"$ref": _REF.format(model=spec.response.__name__)}
        if spec.response is not None
        else {"type": "object"}
    )
    return {"description": "OK", "content": {JSON: {"schema": schema}}}


def _operation(spec: Endpoint) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": spec.summary,
        "operationId": spec.handler.__name__ + ("_alias" if _is_alias(spec) else ""),
        "tags": list(spec.tags),
        "responses": {
            str(spec.status): _success(spec),
            **{
                str(status): _error_response(status, codes)
                for status, codes in _error_statuses(spec).items()
            },
        },
    }
    parameters = _parameters(spec)
    if parameters:
        operation["parameters"] = parameters
    if spec.body is not None:
        operation["requestBody"] = {
            "required": spec.body_required,
            "content": {JSON: {"schema": {"$ref": _REF.format(model=spec.body.__name__)}}},
        }
    operation["security"] = [] if spec.access is Access.OPEN else [{"bearer": []}, {"cookie": []}]
    if spec.deprecated:
        operation["deprecated"] = True
        operation["description"] = (
            "The old single-session service's route, served only with --legacy-instance "
            "(otherwise 404) until its Sunset date; every answer carries Deprecation, Sunset "
            "and a Link to the route that replaces it."
        )
    return operation


def _is_alias(spec: Endpoint) -> bool:
    return spec.path.startswith("/api/") and spec.path.endswith(("/health", "/openapi.json"))


def _components(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    models: dict[type[BaseModel], str] = {}
    for spec in endpoints:
        if spec.body is not None:
            models[spec.body] = "validation"
        if spec.response is not None:
            models.setdefault(spec.response, "serialization")
    for model in _RESPONSE_MODELS:
        models.setdefault(model, "serialization")
    _, top = models_json_schema(
        [(model, mode) for model, mode in models.items()],  # type: ignore[misc]
        ref_template=_REF,
    )
    return dict(sorted(top.get("$defs", {}).items()))


def document(endpoints: tuple[Endpoint, ...]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for spec in endpoints:
        paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Session Manager HTTP API",
            "version": VERSION,
            "description": "The HTTP/JSON twin of the gRPC SessionService and EngineService: "
            "the same sessions, the same state machine, the same error reasons. Errors are "
            '`{"error": true, "code": "<REASON>", "message": "...", "details": {...}}`. '
            "Browsers authenticate with the sm_auth cookie from POST "
            "/api/session-manager/auth/cookie; requests that change anything with the cookie "
            f"must send `{CSRF_HEADER}: 1`.",
        },
        "paths": paths,
        "components": {
            "schemas": _components(endpoints),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": COOKIE},
            },
        },
    }


def encoded(endpoints: tuple[Endpoint, ...]) -> bytes:
    return encode(document(endpoints))
