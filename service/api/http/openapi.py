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

_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (schemas.ErrorJSON, schemas.EndEvent)


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
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": schemas.INSTANCE_ID_PATTERN},
                "example": "sender_51",
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
                "schema": {"type": "string", "minLength": 1, "maxLength": 128},
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
        return {
            "description": "An event stream: `retry: 2000`, then `event: session` events "
            "(`id:` the revision, `data:` a SessionJSON), `: keep-alive` comments while idle, "
            "and a final `event: end` whose data is an EndEvent.",
            "content": {"text/event-stream": {"schema": _EVENT}},
        }
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
