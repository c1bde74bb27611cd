"""Unhandled exceptions become a 500 with the OpenAI error body, and the connection lives on.

Starlette's own catch-all (ServerErrorMiddleware) answers and then re-raises, so uvicorn closes
the keep-alive connection and the client's next request on it fails; this one does not re-raise.
"""
from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from vllm_jax.server.protocol import error_body

log = logging.getLogger("vllm_jax")


def internal_error_body(e: Exception) -> dict:
    """A 500's body: the exception's type only, as its text may hold paths."""
    return error_body(f"internal error ({type(e).__name__}; the server log has the details)", 500)


class InternalErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            log.exception("error handling %s", scope.get("path"))
            if started:  # half a response is out: only closing the connection ends it
                raise
            await JSONResponse(internal_error_body(e), status_code=500)(scope, receive, send)
