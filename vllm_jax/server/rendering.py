"""Prompt work off the event loop, so /health and every stream keep answering while a request
with a huge prompt or a slow template is prepared.

`off_loop` runs a function in a bounded pool of threads (the tokenizer releases the GIL while
it encodes and decodes, Jinja gives it up every few milliseconds). `ChatRenderer` renders the
model's own chat templates in that pool; a template sent with the request is refused unless the
server trusts them, and then renders in a worker process that is killed at the time limit.
"""
from __future__ import annotations

import functools

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from vllm_jax.server.options import ServerOptions
from vllm_jax.server.protocol import APIError
from vllm_jax.server.template_worker import TemplateWorker
from vllm_jax.tokenizer import TooManyTokens

# Enough that a few huge prompts in preparation leave room for the small ones behind them.
PROMPT_THREADS = 8
_threads: RunVar[anyio.CapacityLimiter] = RunVar("vllm_jax_prompt_threads")


async def off_loop(fn, *args, **kwargs):
    try:
        limiter = _threads.get()
    except LookupError:  # one pool per event loop
        limiter = anyio.CapacityLimiter(PROMPT_THREADS)
        _threads.set(limiter)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                          limiter=limiter)


def encode_prompt(tok, text: str, add_special_tokens: bool, max_model_len: int,
                  what: str) -> list[int]:
    """The prompt's ids; 400 for one longer than the model's context, refused before its id
    list is built (building it holds the GIL ~70 ms per million tokens)."""
    try:
        return tok.encode(text, add_special_tokens, max_tokens=max_model_len)
    except TooManyTokens as e:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, "
                       f"the {what} has {e.num_tokens} tokens. Please reduce its length.",
                       param=what) from None


class ChatRenderer:
    def __init__(self, options: ServerOptions):
        self.trusted = options.trust_request_chat_template
        self.worker = TemplateWorker(options.template_timeout_s, options.max_request_bytes)

    async def render(self, tok, messages: list[dict], add_generation_prompt: bool, tools=None,
                     chat_template: str | None = None, kwargs: dict | None = None) -> str:
        kwargs = dict(kwargs or {})
        template = kwargs.pop("chat_template", None) if chat_template is None else chat_template
        if template is None or template in tok.chat_templates:  # one of the model's own
            return await off_loop(tok.apply_chat_template, messages, add_generation_prompt,
                                  tools, chat_template=template, **kwargs)
        if not self.trusted:
            raise APIError("a chat_template in the request is refused: the server was not "
                           "started with --trust-request-chat-template", param="chat_template")
        return await self.worker.render(template, messages, tok.special_tokens,
                                        add_generation_prompt, tools, kwargs)

    def close(self):
        self.worker.close()
