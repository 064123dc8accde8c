"""Bearer-token authentication: every RPC but the health service needs a known token.

Tokens come from a file (one 'TOKEN PRINCIPAL' per line, '#' comments) and/or an inline
list 'PRINCIPAL:TOKEN,...'. The principal names the owner of the sessions a caller
creates; other principals get NOT_FOUND for them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class AuthConfigError(ValueError):
    pass


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: str = "", inline: str = "") -> dict[bytes, str]:
    """SHA-256 of each token -> principal. Only digests are kept in memory."""
    tokens: dict[bytes, str] = {}

    def add(token: str, principal: str, where: str) -> None:
        if len(token) < 16:
            raise AuthConfigError(f"{where}: token for {principal!r} is shorter than 16 characters")
        if not principal:
            raise AuthConfigError(f"{where}: a token has no principal name")
        digest = _digest(token)
        if digest in tokens:  # two owners for one token: whichever won, the other loses its sessions
            raise AuthConfigError(
                f"{where}: this token is already listed (for {tokens[digest]!r}); tokens must be unique"
            )
        tokens[digest] = principal

    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise AuthConfigError(f"{path}: cannot read auth tokens ({e.strerror})") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise AuthConfigError(f"{path}:{number}: expected 'TOKEN PRINCIPAL'")
            add(parts[0], parts[1], f"{path}:{number}")
    for entry in filter(None, (e.strip() for e in inline.split(","))):
        principal, sep, token = entry.partition(":")
        if not sep:
            raise AuthConfigError("inline auth tokens must be 'PRINCIPAL:TOKEN,...'")
        add(token, principal, "inline auth tokens")
    if (path or inline.strip()) and not tokens:  # asked for authentication, got none: never run open
        raise AuthConfigError(f"{path or 'inline auth tokens'}: no tokens found; authentication would be off")
    return tokens


class TokenAuth:
    def __init__(self, tokens: dict[bytes, str]) -> None:
        self.tokens = tokens

    def principal(self, metadata: Any) -> str | None:
        """The principal of a call's 'authorization: Bearer TOKEN' metadata, or None."""
        for key, value in metadata or ():
            scheme, _, credentials = value.partition(" ") if isinstance(value, str) else ("", "", "")
            if key == "authorization" and scheme.lower() == "bearer":  # schemes are case-insensitive
                digest = _digest(credentials.strip())
                for known, principal in self.tokens.items():
                    if hmac.compare_digest(known, digest):
                        return principal
        return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid token with UNAUTHENTICATED (health checks stay open)."""

    def __init__(self, auth: TokenAuth, on_denied: Callable[[str], None] | None = None) -> None:
        self.auth = auth
        self.on_denied = on_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self.auth.principal(details.invocation_metadata) is not None:
            return handler
        return self._denied(handler, method)

    def _denied(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        on_denied = self.on_denied

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if on_denied is not None:
                on_denied(method.rsplit("/", 1)[-1])
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')",
            )

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await deny(request, context)
            yield  # pragma: no cover - abort raises

        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kw)
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
