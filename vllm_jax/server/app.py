"""The FastAPI app: routes, the error shape for every failure, health and metrics."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from vllm_jax.server import embeddings, serving
from vllm_jax.server.auth import APIKeyMiddleware
from vllm_jax.server.errors import InternalErrors
from vllm_jax.server.http_limits import BodyLimitMiddleware
from vllm_jax.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, EmbeddingRequest, TokenizeRequest,
                                      error_body)
from vllm_jax.server.rendering import encode_prompt, off_loop
from vllm_jax.server.request_body import json_body
from vllm_jax.server.serving import ServerState


class SSEResponse(StreamingResponse):
    """Closes its event stream however the response ends, so a dropped client's requests are
    aborted at once rather than whenever the generator is garbage-collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def error_response(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts[:4]) or "invalid request", param


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine_thread.start()
        yield
        state.engine_thread.stop()
        state.renderer.close()

    options = state.options
    app = FastAPI(title="vllm_jax", summary="OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(InternalErrors)
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_request_bytes)
    if options.api_key:  # added last, so it runs first: a refused request's body is never read
        app.add_middleware(APIKeyMiddleware, api_key=options.api_key)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(serving.ClientGone)
    async def on_client_gone(request: Request, exc: serving.ClientGone):
        return Response(status_code=499)  # nobody reads it; the request was aborted

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.message, exc.status, exc.param)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return error_response(str(exc.detail), exc.status_code)

    @app.get("/health")
    async def health():
        t = state.engine_thread
        if t.ready.is_set() and t.error is None:
            return Response(status_code=200)
        return Response(status_code=503)

    @app.get("/v1/models")
    async def models():
        engine = state.engine()
        data = [{"id": name, "object": "model", "created": int(time.time()),
                 "owned_by": "vllm_jax", "root": name, "parent": None,
                 "max_model_len": engine.max_model_len} for name in state.model_names[:1]]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request,
                               req: ChatCompletionRequest = json_body(ChatCompletionRequest)):
        return _respond(await serving.chat_completion(state, req, raw))

    @app.post("/v1/completions")
    async def completions(raw: Request, req: CompletionRequest = json_body(CompletionRequest)):
        return _respond(await serving.completion(state, req, raw))

    @app.post("/v1/embeddings")
    async def create_embeddings(raw: Request, req: EmbeddingRequest = json_body(EmbeddingRequest)):
        return await embeddings.create_embedding(state, req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest = json_body(TokenizeRequest)):
        state.check_model(req.model)
        engine = state.engine()
        tok = engine.tokenizer
        if req.messages is not None:
            fields = ChatCompletionRequest(messages=req.messages,
                                           add_generation_prompt=req.add_generation_prompt)
            messages = await off_loop(fields.message_dicts)
            text = await serving.render_chat(state, tok, messages, fields)
            special = bool(req.add_special_tokens)
        elif req.prompt is not None:
            text = req.prompt
            special = req.add_special_tokens is not False
        else:
            raise APIError("either prompt or messages is required", param="prompt")
        ids = await off_loop(encode_prompt, tok, text, special, engine.max_model_len, "prompt")
        strs = await off_loop(lambda: [tok.id_to_token(i) for i in ids]) \
            if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest = json_body(DetokenizeRequest)):
        state.check_model(req.model)
        engine = state.engine()
        vocab = engine.model_config.vocab_size
        bad = await off_loop(lambda: next((t for t in req.tokens if not 0 <= t < vocab), None))
        if bad is not None:
            raise APIError(f"token id {bad} is out of vocabulary (size {vocab})", param="tokens")
        text = await off_loop(engine.tokenizer.decode, req.tokens, skip_special_tokens=False)
        return {"prompt": text}

    return app


def _respond(result):
    if isinstance(result, serving.EventStream):
        return SSEResponse(result, headers={"Cache-Control": "no-cache"})
    return JSONResponse(result)
