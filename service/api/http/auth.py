"""Who may call an HTTP route: bearer tokens, and a cookie for browsers.

``EventSource`` cannot send an ``Authorization`` header, and a token must
never travel in a URL. So a browser trades its bearer token once for the
``sm_auth`` cookie (HttpOnly, SameSite=Strict). Its value is
``<role>.<expiry>.<HMAC>``, the HMAC keyed by a key derived from the token
itself: it survives a restart, dies when the token is rotated out, and holds
nothing that gives the token away. A request authenticated by the cookie that
changes anything must also carry ``X-Session-Manager-CSRF: 1`` (a header no
cross-site form can set, and that only same-origin or CORS-allowed scripts can)
and, when the browser sends ``Origin``, come from the service's own origin or
a configured CORS origin.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

from starlette.requests import Request

from service.api.auth import INTERNAL, PUBLIC, Tokens
from service.api.http.errors import HttpError
from service.domain.errors import ContractError
from sessionmanager.v1 import session_pb2

COOKIE = "sm_auth"
COOKIE_SECONDS = 12 * 3600
CSRF_HEADER = "x-session-manager-csrf"
_KEY_LABEL = b"session-manager http cookie v1"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Access(Enum):
    """What a route requires."""

    OPEN = "open"
    PUBLIC = PUBLIC
    INTERNAL = INTERNAL


def _unauthenticated(message: str) -> HttpError:
    return HttpError(ContractError(session_pb2.ERROR_REASON_UNAUTHENTICATED, message))


def _forbidden(message: str, **metadata: str) -> HttpError:
    error = ContractError(session_pb2.ERROR_REASON_PERMISSION_DENIED, message)
    error.metadata.update(metadata)
    return HttpError(error)


def _cookie_key(token: bytes) -> bytes:
    return hmac.new(token, _KEY_LABEL, hashlib.sha256).digest()


def _signature(token: bytes, role: str, expiry: int) -> str:
    return hmac.new(_cookie_key(token), f"{role}.{expiry}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Authenticator:
    """Checks every request against the tokens; everything is open without tokens."""

    tokens: Tokens
    #: Origins a cookie-authenticated browser may write from, besides the service's own.
    trusted_origins: Collection[str] = ()

    @property
    def enabled(self) -> bool:
        return self.tokens.enabled

    def bearer_role(self, request: Request) -> str | None:
        """The role of the request's bearer token; ``None`` when it sends none."""
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        role = self.tokens.role_of(token.strip().encode()) if scheme.lower() == "bearer" else None
        if role is None:
            raise _unauthenticated("the bearer token is not valid")
        return role

    def missing_bearer(self) -> HttpError:
        return _unauthenticated(
            "a bearer token is required (header 'Authorization: Bearer <token>')"
        )

    def issue_cookie(self, role: str, now: float | None = None) -> str:
        """A cookie value for ``role``, signed with the first token of that role."""
        expiry = int(time.time() if now is None else now) + COOKIE_SECONDS
        token = self._role_tokens(role)[0]
        return f"{role}.{expiry}.{_signature(token, role, expiry)}"

    def check(self, request: Request, access: Access) -> None:
        """Raise 401 or 403 unless the request may use a route of ``access``."""
        if not self.enabled or access is Access.OPEN:
            return
        role = self.bearer_role(request)
        if role is None:
            role = self._cookie_role(request)
            self._check_csrf(request)
        if role != access.value:
            raise _forbidden(
                f"a {role} token may not call {request.method} {request.url.path}",
                method=request.method,
            )

    def _role_tokens(self, role: str) -> tuple[bytes, ...]:
        return self.tokens.public if role == PUBLIC else self.tokens.internal

    def _cookie_role(self, request: Request) -> str:
        value = request.cookies.get(COOKIE)
        if value is None:
            raise _unauthenticated(
                "a valid bearer token is required (header 'Authorization: Bearer <token>', "
                f"or the {COOKIE} cookie from POST /api/session-manager/auth/cookie)"
            )
        role, _, rest = value.partition(".")
        expiry_text, _, signature = rest.partition(".")
        valid = (
            role in (PUBLIC, INTERNAL)
            and expiry_text.isdigit()
            and int(expiry_text) > time.time()
            # Compare with every token of the role, in constant time.
            and any(
                [
                    hmac.compare_digest(signature, _signature(token, role, int(expiry_text)))
                    for token in self._role_tokens(role)
                ]
            )
        )
        if not valid:
            raise _unauthenticated(f"the {COOKIE} cookie is not valid or has expired")
        return role

    def _check_csrf(self, request: Request) -> None:
        if request.method in _SAFE_METHODS:
            return
        if request.headers.get(CSRF_HEADER) != "1":
            raise _forbidden(
                "a request authenticated by cookie must send the header "
                "'X-Session-Manager-CSRF: 1'",
                header="X-Session-Manager-CSRF",
            )
        origin = request.headers.get("origin")
        if (
            origin is not None
            and origin != own_origin(request)
            and (origin not in self.trusted_origins)
        ):
            raise _forbidden(f"origin {origin} may not write with the cookie", origin=origin)


def own_origin(request: Request) -> str:
    """The origin the browser sees this service at: scheme and Host header."""
    host = request.headers.get("host", "")
    return f"{request.url.scheme}://{host}"
