"""`--api-key`: every route outside PUBLIC_PATHS answers 401 unless the request carries
`Authorization: Bearer KEY`. A pure ASGI middleware, so nothing of a refused request (its body
included) is read."""
from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_jax.server.protocol import error_body

PUBLIC_PATHS = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json")


def is_public(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key_digest = _digest(api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] == "http" and not is_public(scope["path"]) \
                and not self._authorized(Headers(scope=scope)):
            body = error_body("Incorrect or missing API key: send `Authorization: Bearer KEY`",
                              401)
            response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # Digests have one length, so the comparison's time says nothing about the key.
        sent = _digest(token.strip().encode("latin-1"))  # the header's bytes, as sent
        return scheme.lower() == "bearer" and hmac.compare_digest(sent, self._key_digest)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
