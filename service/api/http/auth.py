"""Who may call an HTTP route: bearer tokens, and a cookie for browsers.

``EventSource`` cannot send an ``Authorization`` header, and a token must
never travel in a URL. So a browser trades its bearer token once for the
``sm_auth`` cookie (HttpOnly, SameSite=Strict). Its value is
``<role>.<expiry>.<HMAC>``, the HMAC keyed by a key derived from the token
itself: it survives a restart, dies when the token is rotated out, and holds
nothing that gives the token away. Signing out revokes every cookie of that
token issued until then (an epoch kept by this process).

Writes from browsers: a request that changes anything and carries no bearer
token must send ``X-Session-Manager-CSRF: 1`` (a header no cross-site form
can set, and that only same-origin or CORS-allowed scripts can) and, when the
browser sends ``Origin``, come from the service's own origin or a configured
CORS origin. With the cookie this holds always; without tokens it holds for
every request a browser sends (``Origin`` or ``Sec-Fetch-Site`` present,
headers browsers add to every such request and no page can forge), so that
any web page the operator opens cannot drive a service on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
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
#: The one form a cookie may have, as bytes: a role, 1 to 12 ASCII digits, 64 hex digits.
_COOKIE_VALUE = re.compile(rb"(public|internal)\.([0-9]{1,12})\.([0-9a-f]{64})")


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
class Caller:
    """Who a request comes from, as far as fairness goes: its token (if any) and its address."""

    token: bytes = b""
    address: str = ""

    @property
    def key(self) -> str:
        """A name for the caller that does not hold its token."""
        fingerprint = hashlib.sha256(self.token).hexdigest()[:16] if self.token else "-"
        return f"{fingerprint}@{self.address}"


@dataclass(frozen=True)
class Authenticator:
    """Checks every request against the tokens; everything is open without tokens."""

    tokens: Tokens
    #: Origins a browser may write from, besides the service's own.
    trusted_origins: Collection[str] = ()
    #: Per token (by its cookie key): cookies issued at or before this second are revoked.
    _revoked: dict[bytes, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.tokens.enabled

    def bearer_role(self, request: Request) -> str | None:
        """The role of the request's bearer token; ``None`` when it sends none."""
        token = self._bearer_token(request)
        return None if token is None else self._token_role(token)

    def missing_bearer(self) -> HttpError:
        return _unauthenticated(
            "a bearer token is required (header 'Authorization: Bearer <token>')"
        )

    def issue_cookie(self, role: str, now: float | None = None) -> str:
        """A cookie value for ``role``, signed with the first token of that role.

        A cookie issued in the same second as a sign-out is dated one second later, so
        that the sign-out, which revokes whole seconds, does not revoke it too.
        """
        token = self._role_tokens(role)[0]
        issued = max(int(time.time() if now is None else now), self._revoked_until(token) + 1)
        expiry = issued + COOKIE_SECONDS
        return f"{role}.{expiry}.{_signature(token, role, expiry)}"

    def revoke_cookie(self, request: Request) -> None:
        """Revoke every cookie of the token that signed the request's cookie, if it is valid."""
        if not self.enabled or COOKIE not in request.cookies:
            return
        try:
            _, token = self._cookie_holder(request)
        except HttpError:
            return  # nothing valid to revoke: clearing it is all there is to do
        key = _cookie_key(token)
        self._revoked[key] = max(self._revoked.get(key, 0), int(time.time()))

    def check(self, request: Request, access: Access) -> Caller:
        """Raise 401 or 403 unless the request may use a route of ``access``; who calls."""
        address = request.client.host if request.client else ""
        if not self.enabled or access is Access.OPEN:
            if "authorization" not in request.headers and _from_browser(request):
                self._check_write(request)
            return Caller(address=address)
        token = self._bearer_token(request)
        if token is not None:
            role = self._token_role(token)
        else:
            role, token = self._cookie_holder(request)
            self._check_write(request)
        if role != access.value:
            raise _forbidden(
                f"a {role} token may not call {request.method} {request.url.path}",
                method=request.method,
            )
        return Caller(token=token, address=address)

    def _bearer_token(self, request: Request) -> bytes | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise _unauthenticated("the bearer token is not valid")
        # Headers arrive as latin-1 text: encoding it back gives the bytes that were sent.
        return token.strip().encode("latin-1")

    def _token_role(self, token: bytes) -> str:
        role = self.tokens.role_of(token)
        if role is None:
            raise _unauthenticated("the bearer token is not valid")
        return role

    def _role_tokens(self, role: str) -> tuple[bytes, ...]:
        return self.tokens.public if role == PUBLIC else self.tokens.internal

    def _revoked_until(self, token: bytes) -> int:
        return self._revoked.get(_cookie_key(token), -1)

    def _cookie_holder(self, request: Request) -> tuple[str, bytes]:
        """The role of the request's cookie and the token that signed it, or 401."""
        value = request.cookies.get(COOKIE)
        if value is None:
            raise _unauthenticated(
                "a valid bearer token is required (header 'Authorization: Bearer <token>', "
                f"or the {COOKIE} cookie from POST /api/session-manager/auth/cookie)"
            )
        refused = _unauthenticated(f"the {COOKIE} cookie is not valid or has expired")
        try:
            # Starlette decodes the header as latin-1, so this gives back the bytes sent.
            match = _COOKIE_VALUE.fullmatch(value.encode("latin-1"))
        except UnicodeEncodeError:  # an escaped character above U+00FF
            raise refused from None
        if match is None:
            raise refused
        role, expiry, signature = match[1].decode(), int(match[2]), match[3]
        # Compare with every token of the role, in constant time.
        signers = [
            token
            for token in self._role_tokens(role)
            if hmac.compare_digest(signature, _signature(token, role, expiry).encode())
        ]
        issued = expiry - COOKIE_SECONDS
        if not signers or expiry <= time.time() or issued <= self._revoked_until(signers[0]):
            raise refused
        return role, signers[0]

    def _check_write(self, request: Request) -> None:
        """A write must prove it comes from a page of a trusted origin (see the module)."""
        if request.method in _SAFE_METHODS:
            return
        if request.headers.get(CSRF_HEADER) != "1":
            raise _forbidden(
                "a request from a browser or with the cookie that changes something must "
                "send the header 'X-Session-Manager-CSRF: 1'",
                header="X-Session-Manager-CSRF",
            )
        origin = request.headers.get("origin")
        if (
            origin is not None
            and origin != own_origin(request)
            and (origin not in self.trusted_origins)
        ):
            raise _forbidden(f"origin {origin} may not write here", origin=origin)


def _from_browser(request: Request) -> bool:
    """Whether a browser sent the request: browsers add these to every write, pages cannot."""
    return "origin" in request.headers or "sec-fetch-site" in request.headers


def own_origin(request: Request) -> str:
    """The origin the browser sees this service at: scheme and Host header."""
    host = request.headers.get("host", "")
    return f"{request.url.scheme}://{host}"
