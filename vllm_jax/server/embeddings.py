"""/v1/embeddings: OpenAI's embeddings response over the engine's pooled final hidden states.

The event loop only parses and awaits: tokenizing, validating and encoding the response run in
worker threads, and the model runs on the engine thread between steps (EngineThread.call), one
device batch per call, so no other thread touches the device and generation steps go on
between the batches of a large request.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from vllm_jax.pooling_params import PoolingParams
from vllm_jax.server.protocol import APIError, EmbeddingRequest
from vllm_jax.server.rendering import encode_prompt
from vllm_jax.server.serving import ClientGone, ServerState

BATCH_TIMEOUT_S = 600.0  # one device batch, a first compile included


async def create_embedding(state: ServerState, req: EmbeddingRequest, raw: Request) -> Response:
    state.check_model(req.model)
    engine = state.engine()
    params = req.pooling_params(engine.model_config.hidden_size)
    prompts, batches = await asyncio.to_thread(_prepare, engine, req, params)
    vectors = np.zeros((len(prompts), engine.model_config.hidden_size), np.float32)
    for batch in batches:
        if await raw.is_disconnected():
            raise ClientGone()
        vectors[batch] = await asyncio.to_thread(_embed_on_engine_thread, state,
                                                 [prompts[i] for i in batch], params)
    body = await asyncio.to_thread(_response_body, req, req.model or state.model_name,
                                   prompts, vectors)
    return Response(body, media_type="application/json")


def _prepare(engine, req: EmbeddingRequest,
             params: PoolingParams) -> tuple[list[list[int]], list[list[int]]]:
    """The inputs' token ids, validated, and their indices grouped into device batches."""
    tok, limit = engine.tokenizer, engine.max_model_len
    prompts = [x if not isinstance(x, str) else
               encode_prompt(tok, x, req.add_special_tokens, limit, "input")
               for x in req.input_list()]
    try:
        return prompts, engine.embedding_batches(prompts, params)
    except ValueError as e:
        raise APIError(str(e), param="input") from None


def _embed_on_engine_thread(state: ServerState, prompts: list[list[int]],
                            params: PoolingParams) -> np.ndarray:
    return state.engine_thread.call(lambda engine: engine.embed(prompts, params),
                                    timeout=BATCH_TIMEOUT_S)


def _response_body(req: EmbeddingRequest, model: str, prompts: list[list[int]],
                   vectors: np.ndarray) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    tokens = sum(len(p) for p in prompts)
    return json.dumps({"id": f"embd-{uuid.uuid4().hex}", "object": "list",
                       "created": int(time.time()), "model": model, "data": data,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes (what OpenAI sends)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
