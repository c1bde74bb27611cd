"""The HTTP layer a client meets before the app: a deadline for request headers, a cap on
request bodies.

uvicorn runs on its h11 protocol (pinned, so the same code runs whether or not httptools is
installed). It times out only idle keep-alive connections, and stops that timer at the first
byte: a client sending part of a request line and then nothing (or a byte a second) would hold
its connection forever. Here a connection waiting for a request has `header_timeout` seconds,
from the moment it opened or its previous response ended, to complete the request's headers.

`BodyLimitMiddleware` answers 413 to a body over the limit, announced by Content-Length or found
while reading a chunked one, and never holds more than the limit of it.
"""
from __future__ import annotations

import functools

import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vllm_jax.server.options import ServerOptions
from vllm_jax.server.protocol import error_body


class HeaderDeadlineH11Protocol(H11Protocol):
    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._watch_headers()

    def handle_events(self):
        super().handle_events()
        self._watch_headers()

    def on_response_complete(self):
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self._cancel_deadline()

    def _watch_headers(self):
        """Armed while h11 waits for a request (their state IDLE), cancelled once it has one."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout,
                                                         self.timeout_keep_alive_handler)
        elif not waiting:
            self._cancel_deadline()

    def _cancel_deadline(self):
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


class BodyLimitMiddleware:
    """Reads the whole body (up to `max_bytes`) before the app runs, then hands it over."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        message = await self._read_body(receive)
        if message is None:
            return await self._refuse(scope, receive, send)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # what comes after the body: a disconnect
            delivered = True
            return message

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> Message | None:
        """The body as one message (or the disconnect that cut it); None past the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send):
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(message, 413), 413)(scope, receive, send)


def uvicorn_config(app, host: str, port: int, options: ServerOptions, **kwargs) -> uvicorn.Config:
    http = functools.partial(HeaderDeadlineH11Protocol, header_timeout=options.header_timeout_s)
    return uvicorn.Config(app, host=host, port=port, http=http, **kwargs)
