"""Access control: bearer tokens per service, checked before any handler runs.

Central Hub gets the public token (``SessionService``); the engine side gets
the internal one (``EngineService``, ``NodeService`` between nodes and, with
the simulated engine, ``SimulatorService``). Health checking stays open to probes; reflection
accepts either token. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from service.api.aborts import abort
from service.domain import errors
from sessionmanager.v1 import session_pb2

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the stubs' generic class is not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor

PUBLIC = "public"
INTERNAL = "internal"

_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_ROLE_BY_SERVICE = {
    "/sessionmanager.v1.SessionService/": PUBLIC,
    "/sessionmanager.v1.EngineService/": INTERNAL,
    "/sessionmanager.v1.NodeService/": INTERNAL,
    "/sessionmanager.v1.SimulatorService/": INTERNAL,
}


@dataclass(frozen=True, slots=True)
class Tokens:
    """The accepted tokens of each role; several per role allow rotation."""

    public: tuple[bytes, ...] = ()
    internal: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.public or self.internal)

    def role_of(self, token: bytes) -> str | None:
        # Compare with every token, in constant time, so timing tells nothing.
        public = any([hmac.compare_digest(token, known) for known in self.public])
        internal = any([hmac.compare_digest(token, known) for known in self.internal])
        if public:
            return PUBLIC
        return INTERNAL if internal else None


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode()
    return None


def check(tokens: Tokens, method: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
    """Raise the contract error when ``method`` may not be called with this metadata."""
    if not tokens.enabled or method.startswith(_HEALTH_PREFIX):
        return
    token = _bearer(metadata)
    role = tokens.role_of(token) if token is not None else None
    if role is None:
        raise errors.ContractError(
            session_pb2.ERROR_REASON_UNAUTHENTICATED,
            "a valid bearer token is required (metadata 'authorization: Bearer <token>')",
        )
    if method.startswith(_REFLECTION_PREFIXES):
        return
    required = next(
        (role for prefix, role in _ROLE_BY_SERVICE.items() if method.startswith(prefix)), None
    )
    if required != role:
        raise errors.ContractError(
            session_pb2.ERROR_REASON_PERMISSION_DENIED,
            f"a {role} token may not call {method}",
            method=method,
        )


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], error: errors.ContractError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that only ends the call with ``error``."""

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await abort(context, error)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(context)

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await refuse(context)
        yield None  # pragma: no cover - abort raises

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.stream_stream_rpc_method_handler(streaming, **serializers)


class TokenInterceptor(_ServerInterceptor):
    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        try:
            check(
                self._tokens,
                handler_call_details.method,
                handler_call_details.invocation_metadata,
            )
        except errors.ContractError as error:
            return _refusal(handler, error)
        return handler
