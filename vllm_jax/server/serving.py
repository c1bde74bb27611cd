"""Chat and text completions: requests to engine requests, engine outputs to OpenAI responses."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from functools import partial
from typing import AsyncIterator

from fastapi import Request

from vllm_jax.engine.outputs import RequestOutput
from vllm_jax.sampling_params import ParamError
from vllm_jax.server import responses as fmt
from vllm_jax.server import tool_calls
from vllm_jax.server.engine_thread import EngineThread
from vllm_jax.server.errors import internal_error_body
from vllm_jax.server.metrics import Metrics
from vllm_jax.server.options import ServerOptions
from vllm_jax.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from vllm_jax.server.rendering import ChatRenderer, encode_prompt, off_loop

log = logging.getLogger("vllm_jax")

DISCONNECT_CHECK_S = 0.5


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class ServerState:
    def __init__(self, load, model_names: list[str], log_interval: float = 5.0,
                 on_load_error=None, options: ServerOptions = ServerOptions()):
        self.model_names = model_names
        self.options = options
        self.renderer = ChatRenderer(options)
        self.metrics = Metrics(model_names[0], log_interval)
        self.engine_thread = EngineThread(load, self.metrics, on_load_error)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def engine(self):
        """The loaded engine, for its read-only parts (tokenizer, limits); 503 while loading."""
        t = self.engine_thread
        if t.error is not None:
            raise APIError("the model failed to load (the server log says why)", 503)
        if not t.ready.is_set():
            raise APIError("the model is still loading", 503)
        return t.engine

    def check_model(self, model: str | None):
        if model is not None and model not in self.model_names:
            raise APIError(f"The model `{model}` does not exist.", 404, "model")

    def check_prompt(self, ids: list[int], requested: int | None, what: str) -> int:
        """The engine's prompt checks (LLMEngine.check_prompt) with the completion asked for;
        returns the completion budget (max_tokens) for this prompt."""
        engine = self.engine()
        limit, n = engine.max_model_len, len(ids)
        completion = requested if requested is not None else max(limit - n, 1)
        if ids and completion >= 1 and n + completion > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + completion} tokens ({n} in the messages, {completion} in the completion). "
                f"Please reduce the length of the messages or completion.", param=what)
        try:
            engine.check_prompt(ids)
        except ValueError as e:
            raise APIError(str(e), param=what) from None
        return completion

    def check_params(self, req, params):
        """The model-dependent checks of the engine's admission (SamplingParams.check_for_model),
        done here so that a bad request gets its 400 before it reaches the engine thread."""
        vocab = self.engine().model_config.vocab_size
        for p in params:
            try:
                p.check_for_model(vocab)
            except ParamError as e:
                raise req.api_error(e) from None


class RequestGroup:
    """Engine requests for one API call (one per prompt), their latest outputs, abort on exit."""

    def __init__(self, thread: EngineThread, base_id: str, prompts: list[list[int]], params):
        loop = asyncio.get_running_loop()
        self.thread = thread
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self.outputs: list[RequestOutput | None] = [None] * len(prompts)
        self.finished: set[int] = set()
        for i, (request_id, ids, sp) in enumerate(zip(self.ids, prompts, params)):
            thread.add(request_id, ids, sp, partial(_deliver, loop, self.queue, i))

    async def updates(self, request: Request | None = None) -> AsyncIterator[set[int]]:
        """Yields the prompt indices whose outputs changed, until all are finished. With
        `request`, checks now and then whether the client is still there."""
        checked = time.monotonic()
        while len(self.finished) < len(self.ids):
            if request is not None and time.monotonic() - checked > DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientGone()
            if request is None:  # streaming: the response notices a dropped client itself
                item = await self.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_CHECK_S)
                except TimeoutError:
                    continue
            items = [item]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            changed = set()
            for i, out in items:
                if isinstance(out, BaseException):
                    self.finished.add(i)
                    raise APIError(str(out)) if isinstance(out, ValueError) else out
                self.outputs[i] = out
                changed.add(i)
                if out.finished:
                    self.finished.add(i)
            yield changed

    def abort(self):
        for i, request_id in enumerate(self.ids):
            if i not in self.finished:
                self.thread.abort(request_id)
                self.finished.add(i)


def _deliver(loop, queue, index, item):
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (index, item))
    except RuntimeError:  # the event loop is gone: the server is shutting down
        pass


async def _collect(group: RequestGroup, request: Request):
    try:
        async for _ in group.updates(request):
            pass
    finally:
        group.abort()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream:
    """The server-sent events of one streaming response: the chunks, an error event if one
    happens, then [DONE]. aclose() aborts the engine requests, whether or not the response got
    as far as starting (a dropped client must not keep its pages)."""

    def __init__(self, chunks: AsyncIterator[str], group: RequestGroup):
        self.chunks, self.group = chunks, group
        self._events = self._run()

    def __aiter__(self):
        return self._events

    async def aclose(self):
        self.group.abort()
        await self._events.aclose()
        await self.chunks.aclose()

    async def _run(self) -> AsyncIterator[str]:
        try:
            async for chunk in self.chunks:
                yield chunk
        except APIError as e:
            yield sse(fmt.error_event(e))
        except Exception as e:
            log.exception("streaming failed")
            yield sse(internal_error_body(e))
        finally:
            self.group.abort()
        yield "data: [DONE]\n\n"


# -- chat ------------------------------------------------------------------------------------------

async def chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request):
    state.check_model(req.model)
    tok = state.engine().tokenizer
    logprobs = req.engine_logprobs()
    tools = await off_loop(tool_calls.tool_use, req, tok, state.options.tool_call_parser)
    messages = await off_loop(req.message_dicts)
    text = await render_chat(state, tok, messages, req)
    ids = await off_loop(encode_prompt, tok, text, False, state.engine().max_model_len, "messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    budget = await off_loop(state.check_prompt, ids, requested, "messages")
    params = req.sampling_params(budget, logprobs, state.engine().sampling_defaults)
    tools.adjust(params)
    state.check_params(req, [params])
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "created": int(time.time()), "model": req.model or state.model_name}
    group = RequestGroup(state.engine_thread, rid, [ids], [params])
    if req.stream:
        return EventStream(_chat_stream(tok, req, group, head, len(ids), tools), group)
    await _collect(group, raw)
    out = group.outputs[0]
    choices = []
    for c in out.outputs:
        message, finish_reason = tools.message(c.text, c.finish_reason)
        choices.append({"index": c.index, "message": message,
                        "logprobs": None if logprobs is None else await off_loop(
                            fmt.chat_logprobs, tok, c, logprobs,
                            as_ids=req.return_tokens_as_token_ids),
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": fmt.usage(len(ids), [out])}


async def render_chat(state: ServerState, tok, messages: list[dict],
                      req: ChatCompletionRequest) -> str:
    final = req.continue_final_message
    if final and messages[-1]["role"] != "assistant":
        raise APIError("continue_final_message needs an assistant message last", param="messages")
    try:
        text = await state.renderer.render(
            tok, messages, add_generation_prompt=req.add_generation_prompt and not final,
            tools=req.tools, chat_template=req.chat_template, kwargs=req.chat_template_kwargs)
    except APIError:
        raise
    except Exception as e:  # the template rejected these messages (roles, missing content...)
        raise APIError(f"could not apply the chat template: {e}", param="messages") from None
    if final:  # cut what the template adds after the final message (its end-of-turn marker)
        content = messages[-1].get("content") or ""
        text = text[:text.rindex(content) + len(content)] if content in text else text
    return text


async def _chat_stream(tok, req, group: RequestGroup, head: dict, prompt_len: int,
                       tools: tool_calls.ToolUse):
    head = {**head, "object": "chat.completion.chunk"}
    n = req.n
    sent_text, sent_tokens = [0] * n, [0] * n
    views = [tools.stream() for _ in range(n)]
    top = req.top_logprobs or 0

    def chunk(choices, usage=None):
        data = {**head, "choices": choices}
        if req.include_usage:
            data["usage"] = usage
        return sse(data)

    def choice(index, delta, logprobs=None, finish=None, stop=None):
        c = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            c["stop_reason"] = stop
        return c

    for i in range(n):
        yield chunk([choice(i, {"role": "assistant", "content": ""})])
    async for _ in group.updates():
        out = group.outputs[0]
        usage = fmt.usage(prompt_len, [out]) if req.continuous_usage else None
        for c in out.outputs:
            i = c.index
            deltas = views[i].feed(c.text[sent_text[i]:])
            sent_text[i] = len(c.text)
            done = c.finish_reason is not None
            if done:
                deltas += views[i].finish()
            lps = None
            if req.logprobs and (deltas or done):
                lps = fmt.chat_logprobs(tok, c, top, sent_tokens[i], req.return_tokens_as_token_ids)
                sent_tokens[i] = len(c.token_ids)
            for delta in deltas:
                yield chunk([choice(i, delta, lps)], usage)
                lps = None
            if done:
                finish = views[i].finish_reason(c.finish_reason)
                yield chunk([choice(i, {}, lps, finish, c.stop_reason)], usage)
    if req.include_usage:
        yield chunk([], fmt.usage(prompt_len, group.outputs))


# -- text completions ------------------------------------------------------------------------------

async def completion(state: ServerState, req: CompletionRequest, raw: Request):
    state.check_model(req.model)
    tok = state.engine().tokenizer
    texts, prompt_ids = await off_loop(_encode_prompts, tok, req, state.engine().max_model_len)
    echo_only = req.echo and req.max_tokens == 0  # lm-eval style: just the prompt's logprobs
    prompt_logprobs = req.logprobs if req.echo else None
    defaults = state.engine().sampling_defaults
    budgets = await off_loop(lambda: [state.check_prompt(
        ids, 1 if echo_only else req.max_tokens, "prompt") for ids in prompt_ids])
    params = [req.sampling_params(budget, None if echo_only else req.logprobs, defaults,
                                  prompt_logprobs) for budget in budgets]
    state.check_params(req, params)
    rid = f"cmpl-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": req.model or state.model_name}
    group = RequestGroup(state.engine_thread, rid, prompt_ids, params)
    view = fmt.CompletionView(tok, req, texts, prompt_ids, echo_only)
    if req.stream:
        return EventStream(_completion_stream(view, req, group, head), group)
    await _collect(group, raw)
    choices = await off_loop(lambda: [view.choice(i, out, c) for i, out in
                                      enumerate(group.outputs) for c in out.outputs])
    return {**head, "choices": choices, "usage": view.usage(group.outputs)}


def _encode_prompts(tok, req: CompletionRequest,
                    max_model_len: int) -> tuple[list[str | None], list[list[int]]]:
    """Each prompt's text (None for token ids) and ids."""
    texts, prompt_ids = [], []
    for p in req.prompt_list():
        if isinstance(p, str):
            texts.append(p)
            prompt_ids.append(encode_prompt(tok, p, req.add_special_tokens, max_model_len,
                                            "prompt"))
        else:
            texts.append(None)
            prompt_ids.append(list(p))
    return texts, prompt_ids


async def _completion_stream(view: fmt.CompletionView, req, group: RequestGroup, head: dict):
    def chunk(choices, usage=None):
        data = {**head, "choices": choices}
        if req.include_usage:
            data["usage"] = usage
        return sse(data)

    async for changed in group.updates():
        usage = view.usage(group.outputs) if req.continuous_usage else None
        for i in sorted(changed):
            out = group.outputs[i]
            for c in out.outputs:
                piece = view.delta(i, out, c)
                if piece is not None:
                    yield chunk([piece], usage)
    if req.include_usage:
        yield chunk([], view.usage(group.outputs))
