"""The Python API: `Engine` (synchronous and streaming generation), vLLM-style `LLM`, and the
model as a plain JAX function (`load_model` + `forward_logits`, differentiable).

Neither `Engine` nor `LLM` is thread-safe: drive each from one thread (the server runs its
engine in a thread of its own, see vllm_jax/server/engine_thread.py).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from vllm_jax.config import ConfigError, EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.engine.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput,
                                     Logprob, RequestOutput)
from vllm_jax.loader import load
from vllm_jax.loader.default_model import resolve_model_path
from vllm_jax.pooling_params import PoolingParams
from vllm_jax.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "ConfigError", "EmbeddingOutput", "EmbeddingRequestOutput",
           "Engine", "EngineConfig", "LLM", "Logprob", "Message", "PoolingParams", "RequestOutput",
           "SamplingParams", "forward_logits", "load_model"]


@dataclass(slots=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str


def as_dicts(messages: Iterable) -> list[dict]:
    return [dataclasses.asdict(m) if isinstance(m, Message) else dict(m) for m in messages]


class Engine:
    """Synchronous front end of an LLMEngine: run prompts to completion, or stream one.

    Several `stream`/`generate_stream` iterators may be interleaved in one thread: each step's
    outputs are kept per request until that request's iterator asks for them.
    """

    def __init__(self, config: EngineConfig | None = None, dtype: str | None = None,
                 **options):
        """`Engine(EngineConfig(model_path=...), "bf16")`, or `Engine(model_path=..., ...)`.

        dtype (auto, bf16, f16, f32) and options (EngineConfig's fields) override the config's.
        """
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; engine options are: "
                            f"{', '.join(sorted(fields))}")
        if dtype is not None:
            options["dtype"] = dtype
        config = (dataclasses.replace(config, **options) if config is not None
                  else EngineConfig(**options))
        self.llm_engine = LLMEngine(config)
        self._latest: dict[str, RequestOutput | None] = {}
        self._texts: dict[str, str] = {}
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def apply_chat_template(self, messages: Sequence, add_generation_prompt: bool = True,
                            **kwargs) -> str:
        return self.tokenizer.apply_chat_template(as_dicts(messages),
                                                  add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def encode_chat(self, messages: Sequence, add_generation_prompt: bool = True,
                    **kwargs) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add(self, prompt: str | list[int], params: SamplingParams | None = None) -> str:
        ids = self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = f"api-{next(self._ids)}"
        self.llm_engine.add_request(ids, params or SamplingParams(), request_id)
        self._latest[request_id] = None
        if isinstance(prompt, str):
            self._texts[request_id] = prompt
        return request_id

    def abort(self, request_id: str):
        self._latest.pop(request_id, None)
        self._texts.pop(request_id, None)
        self.llm_engine.abort_request(request_id)

    def _step(self):
        for out in self.llm_engine.step():
            if out.request_id in self._latest:
                out.prompt = out.prompt or self._texts.get(out.request_id)
                self._latest[out.request_id] = out
                if out.finished:
                    self._texts.pop(out.request_id, None)

    def _next(self, request_id: str, last: RequestOutput | None) -> RequestOutput:
        """Step until the request has an output newer than `last`."""
        while (out := self._latest.get(request_id)) is last:
            if request_id not in self.llm_engine.requests:
                raise RuntimeError(f"request {request_id} was aborted")
            self._step()
        return out

    def generate_sync(self, params: SamplingParams | list | None,
                      prompts: str | Sequence) -> list[RequestOutput]:
        """Run prompts (strings or token id lists) to completion; results in input order."""
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.add(p, sp))
            for i in ids:
                out = None
                while out is None or not out.finished:
                    out = self._next(i, out)
            return [self._latest.pop(i) for i in ids]
        finally:
            for i in ids:
                if i in self._latest:
                    self.abort(i)

    def stream(self, params: SamplingParams | None,
               prompt: str | list[int]) -> Iterator[RequestOutput]:
        """Yields the request's output (cumulative) after every step that changed it. Closing
        the iterator early aborts the request and frees its KV pages."""
        request_id = self.add(prompt, params)
        try:
            out = None
            while out is None or not out.finished:
                out = self._next(request_id, out)
                yield out
        finally:
            self.abort(request_id)

    def generate_stream(self, params: SamplingParams | None,
                        prompt: str | list[int]) -> Iterator[str]:
        """Text pieces of the first output as they are generated; close() to cancel."""
        sent = 0
        stream = self.stream(params, prompt)
        try:
            for out in stream:
                text = out.outputs[0].text
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
        finally:
            stream.close()

    def embed(self, prompts: Sequence[str | list[int]],
              params: PoolingParams | None = None) -> list[EmbeddingRequestOutput]:
        """Embeddings of prompts (strings or token id lists), batched, in input order."""
        tok = self.tokenizer
        ids = [tok.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
        vectors = self.llm_engine.embed(ids, params)
        return [EmbeddingRequestOutput(f"embd-{next(self._ids)}", EmbeddingOutput(v.tolist()), i)
                for i, v in zip(ids, vectors)]


def _is_single_prompt(p) -> bool:
    return isinstance(p, (str, dict)) or (isinstance(p, list) and bool(p)
                                          and all(isinstance(t, int) for t in p))


class LLM:
    """vLLM's offline entry point: `LLM(model=...).generate(prompts, sampling_params)`."""

    def __init__(self, model: str | None = None, **options):
        """options: EngineConfig's fields (dtype, max_model_len, kvcache_mem_mb, ...)."""
        self.engine = Engine(model_path=model, **options)
        self.llm_engine = self.engine.llm_engine

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a string, {"prompt": str} or {"prompt_token_ids": [...]}, or a list of
        those (a bare list of ints is one tokenized prompt)."""
        items = [prompts] if _is_single_prompt(prompts) else list(prompts)
        inputs = [_prompt_input(p) for p in items]
        params = sampling_params if isinstance(sampling_params, list) else (
            [sampling_params or SamplingParams()] * len(inputs))
        return [self._decorate(o) for o in self.engine.generate_sync(params, inputs)]

    def embed(self, prompts, pooling_params: PoolingParams | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """Pooled final hidden states (the engine's `pooling`, L2-normalized unless
        pooling_params say not): `outputs.embedding` per prompt. prompts as for `generate`."""
        items = [prompts] if _is_single_prompt(prompts) else list(prompts)
        return self.engine.embed([_prompt_input(p) for p in items], pooling_params)

    def chat(self, messages, sampling_params: SamplingParams | list | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             chat_template: str | None = None, **template_kwargs) -> list[RequestOutput]:
        """messages: one conversation (a list of Message or {"role", "content"} dicts) or a
        list of conversations."""
        conversations = [messages] if messages and not isinstance(messages[0], list) else messages
        prompts = [self.engine.encode_chat(c, add_generation_prompt,
                                           chat_template=chat_template, **template_kwargs)
                   for c in conversations]
        return self.generate([{"prompt_token_ids": p} for p in prompts], sampling_params)

    def _decorate(self, out: RequestOutput) -> RequestOutput:
        """Fill Logprob.decoded_token, as vLLM does."""
        tok = self.engine.tokenizer
        entries = [e for c in out.outputs for e in (c.logprobs or [])]
        entries += [e for e in (out.prompt_logprobs or []) if e]
        for entry in entries:
            for token_id, lp in entry.items():
                lp.decoded_token = tok.decode([token_id], skip_special_tokens=False)
        return out


def _prompt_input(p) -> str | list[int]:
    if isinstance(p, dict):
        if "prompt_token_ids" in p:
            return [int(t) for t in p["prompt_token_ids"]]
        if "prompt" in p:
            return p["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(p, (str, list)):
        return p
    raise TypeError(f"a prompt must be a string, a token id list or a dict, got {type(p)}")


# -- the model as a JAX function ------------------------------------------------------------------

def load_model(path: str | None = None, dtype: str = "auto", dequantize: bool = False,
               kernel_backend: str = "auto"):
    """(NNX model, ModelConfig, Tokenizer) for a model folder or .gguf file (None: the default).

    dequantize: unpack a GGUF file's quantized blocks to `dtype` at load. Packed blocks are
    integer arrays, which `jax.grad` cannot differentiate; a folder's weights are dense already.
    """
    loaded = load(resolve_model_path(path), dtype, backend=kernel_backend,
                  keep_quantized=False if dequantize else None)
    return loaded.model, loaded.config, loaded.tokenizer


def forward_logits(model, token_ids) -> jax.Array:
    """token_ids [B, L] -> float32 logits [B, L, vocab], causal, without the paged KV cache.

    The model's own forward in its cache-free mode, a plain function of its weights: split the
    model with `nnx.split` and `nnx.merge` it inside a loss to take `jax.grad` w.r.t. the
    parameters. Each row is independent, so right-padding is safe (ignore the logits at padded
    positions).
    """
    hidden, _ = model(jnp.asarray(token_ids, jnp.int32))
    return model.logits(hidden)
