"""Contract errors as HTTP responses: the one reason table, seed 003's body.

The status comes from ``ContractError.http_status`` unless the failure is
HTTP's own (an over-long body is 413, a wrong content type 415, an unknown
route 404, a server that is stopping 503); the code is always a contract reason.
"""

from __future__ import annotations

import logging
import math

from starlette.responses import Response

from service.api.http.payloads import encode, error_json
from service.domain import errors
from service.domain.errors import ContractError
from service.store import failures
from sessionmanager.v1 import session_pb2

log = logging.getLogger(__name__)

JSON = "application/json"


class HttpError(Exception):
    """A contract error with the HTTP status and headers it leaves with."""

    def __init__(
        self,
        error: ContractError,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = error.http_status if status is None else status
        self.headers = headers or {}


def error_response(failure: HttpError | ContractError) -> Response:
    if isinstance(failure, ContractError):
        failure = HttpError(failure)
    error = failure.error
    headers = dict(failure.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.reason == session_pb2.ERROR_REASON_UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(encode(error_json(error)), failure.status, headers, media_type=JSON)


def unexpected(error: BaseException) -> HttpError:
    """Anything unexpected is the contract's SESSION_MANAGER_ERROR, logged with its cause.

    A storage failure is not unexpected: it is STORAGE_UNAVAILABLE, named in one line.
    """
    storage = failures.storage_unavailable(error)
    if storage is not None:
        log.error("%s", storage.message)
        return HttpError(storage)
    log.error("unexpected failure", exc_info=error)
    return HttpError(errors.internal(f"the Session Manager failed: {type(error).__name__}"))


def invalid(field: str, message: str, status: int = 400, instance_id: str = "") -> HttpError:
    return HttpError(errors.invalid_argument(field, message, instance_id), status)


def shutting_down() -> HttpError:
    error = errors.internal("the Session Manager is shutting down; retry on another instance")
    error.retry_after = 1.0
    error.metadata["shutting_down"] = "true"
    return HttpError(error, 503)
