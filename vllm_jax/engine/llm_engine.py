"""The engine loop: add_request / step / abort; detokenize and apply stop conditions.

With async scheduling (EngineConfig.async_scheduling) a step dispatches the next batch before
it reads the previous one's sampled tokens (engine/in_flight.py): the device computes step N+1
while the host appends, stop-checks and detokenizes step N. A sequence that stopped at N had
its N+1 token computed for nothing; it is discarded. Steps whose rows need their last token on
the host before the next one is prepared (structured output's bitmask, penalties' history) are
read at once, and so are the steps that run suspects alone after a failure.

A step that raises costs only the request to blame: the KV cache is rebuilt, every sequence
recomputed, and the failed batch's sequences retried alone (Scheduler.restart); a sequence
that fails alone ends its request with finish_reason "error"."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import parallel
from vllm_jax.config import WARMUPS, EngineConfig
from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.in_flight import InFlight, dispatched
from vllm_jax.engine.outputs import CompletionOutput, RequestOutput, logprob_entries
from vllm_jax.engine.scheduler import ScheduledBatch, Scheduler
from vllm_jax.engine.sequence import Sequence
from vllm_jax.engine.speculative import make_speculator
from vllm_jax.engine.step_cost import MixedStepBudget
from vllm_jax.engine.structured import StructuredOutputManager
from vllm_jax.loader import load, to_dtype
from vllm_jax.loader.default_model import cache_dir, resolve_model_path
from vllm_jax.models.base import ConfigError
from vllm_jax.pooling_params import PoolingParams, check_embedding_prompt
from vllm_jax.runner.model_runner import (CompileClock, ModelRunner, enable_compilation_cache,
                                          kv_cache_bytes_per_page)
from vllm_jax.runner.pooler import Pooler, l2_normalize
from vllm_jax.sampling_params import SamplingParams, check_text, describe, model_defaults
from vllm_jax.tokenizer import IncrementalDetokenizer

log = logging.getLogger("vllm_jax")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    texts: list[str]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded=None):
        enable_compilation_cache(cache_dir())
        CompileClock.start()
        self.config = config
        if config.warmup not in WARMUPS:
            raise ConfigError(f"warmup={config.warmup!r}; expected one of {', '.join(WARMUPS)}")
        parallel.init_distributed(config.coordinator_address, config.num_processes,
                                  config.process_id)
        self.mesh = parallel.make_mesh(config.device_ids, config.tensor_parallel_size)
        if loaded is None:  # a `loaded` handed in must already sit on self.mesh
            loaded = load(resolve_model_path(config.model_path), config.dtype, mesh=self.mesh,
                          quant=config.quant, backend=config.backends(),
                          keep_quantized=config.keep_quantized,
                          max_model_len=config.max_model_len)
        self.loaded = loaded
        self.model_config = cfg = loaded.config
        self.tokenizer = loaded.tokenizer
        # for requests that leave temperature, top_k, top_p, min_p unset (chat, the server)
        self.sampling_defaults, self.sampling_defaults_source = model_defaults(loaded.path)
        log.info("sampling defaults for requests that set none (%s): %s",
                 self.sampling_defaults_source,
                 describe(self.sampling_defaults))
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 4096)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's context "
                              f"length {cfg.max_position_embeddings}")
        kv_dtype = to_dtype(config.kv_cache_dtype if config.kv_cache_dtype != "auto" else
                            config.dtype)
        if config.kv_cache_dtype == "auto" and kv_dtype == jnp.bfloat16 and (
                jax.default_backend() == "cpu"):
            # XLA's CPU has no bf16 scatter: it would convert every layer's whole cache to
            # float32 and back each step (276 -> 672 tok/s at 16 sequences with f16)
            kv_dtype = jnp.float16
        ps = config.page_size
        num_pages = self._kv_pages(cfg, ps, np.dtype(kv_dtype))
        max_tokens = min(config.max_num_batched_tokens, self.max_model_len)
        max_tokens = max(max_tokens, min(16, self.max_model_len))
        max_prefill_seqs = min(8, config.max_num_seqs)
        # a mixed step carries every running sequence: prefill-shaped steps need all seq buckets
        step_seqs = config.max_num_seqs if config.mixed_steps else max_prefill_seqs
        self.runner = ModelRunner(loaded.model, self.tokenizer.eos_token_ids, num_pages, ps,
                                  self.max_model_len, config.max_num_seqs, max_tokens,
                                  step_seqs, kv_dtype, mesh=self.mesh)
        self.pooler = Pooler(self.runner, config.pooling, self.max_model_len, max_tokens,
                             mesh=self.mesh)
        self.block_manager = BlockManager(num_pages, ps, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max_tokens,
                                   max_prefill_seqs, mixed=config.mixed_steps,
                                   mixed_prefill_tokens=config.mixed_prefill_tokens,
                                   step_budget=MixedStepBudget(config.mixed_step_slowdown)
                                   if config.mixed_step_slowdown else None,
                                   max_model_len=self.max_model_len)
        self.structured = StructuredOutputManager(self.tokenizer, cfg.vocab_size)
        self.speculator = (make_speculator(self, config.speculative_config)
                           if config.speculative_config else None)
        # the speculator verifies one step at a time
        self.scheduler.decode_steps = self.runner.decode_steps = (
            1 if self.speculator else config.decode_steps)
        self.requests: dict[str, Request] = {}
        self.rng = np.random.default_rng(config.seed)
        self.num_prompt_tokens = 0  # computed prompt tokens (prefill work done)
        self.num_generated_tokens = 0
        self._next_id = 0
        self.in_flight: InFlight | None = None  # the step dispatched and not read yet
        self._last_read = 0.0  # when the last step read back had finished
        if config.warmup != "none":
            n = self.warmup(prefill=config.warmup == "all")
            log.info("warm-up compiled %d step buckets (%s)", n, config.warmup)

    def _kv_pages(self, cfg, ps: int, dtype: np.dtype) -> int:
        """Pages for max_num_seqs full-length sequences, at most kvcache_mem_mb per device.

        The budget is per device: under tensor parallelism each device holds its KV heads'
        slice of every page (the whole page where attention is replicated)."""
        config = self.config
        per_page = (kv_cache_bytes_per_page(cfg, ps, dtype.itemsize)
                    / parallel.kv_shards(cfg, self.mesh))
        pages_per_seq = -(-self.max_model_len // ps)
        budget = int(config.kvcache_mem_mb * 2**20 // per_page)
        if budget < pages_per_seq:
            raise ConfigError(
                f"the KV cache ({config.kvcache_mem_mb} MB = {budget} pages of {ps} tokens) "
                f"cannot hold one sequence of max_model_len={self.max_model_len}; raise --kvmem "
                f"or lower --max-model-len")
        num_pages = min(budget, config.max_num_seqs * pages_per_seq)
        log.info("KV cache: %d tokens (%d pages of %d), %.1f sequences of max_model_len %d; "
                 "%.1f MiB per device (%s)", num_pages * ps, num_pages, ps,
                 num_pages / pages_per_seq, self.max_model_len, num_pages * per_page / 2**20,
                 dtype.name)
        return num_pages

    @property
    def compile_seconds(self) -> float:
        """Seconds this process has spent compiling (or loading compiled programs)."""
        return CompileClock.seconds

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if request_id is None:
            request_id, self._next_id = str(self._next_id), self._next_id + 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self.check_prompt(ids)
        params.check_for_model(self.model_config.vocab_size)
        so = params.structured_outputs
        matchers = self.structured.matchers(so, params.n) if so else [None] * params.n
        seqs, detoks = [], []
        for i, matcher in enumerate(matchers):
            if params.seed is None:
                seed = int(self.rng.integers(2**31))
            else:  # all 64 bits of any seed, negative ones too, folded into the uint32 key
                seed = int(np.random.SeedSequence([params.seed % 2**64, i]).generate_state(1)[0])
            seq = Sequence(ids, params, seed, request_id, i)
            seq.matcher = matcher
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens))
        req = Request(request_id, text, ids, params, seqs, detoks, [""] * params.n)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(ids)
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def check_prompt(self, ids: list[int]):
        if not ids:
            raise ValueError("the prompt cannot be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(ids) + 1} tokens ({len(ids)} in the prompt, at least 1 in "
                f"the completion). Please reduce the length of the prompt.")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of vocabulary (size {vocab})")

    def abort_request(self, request_id: str):
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_compiles(self) -> int:
        return self.runner.num_compiles

    def warmup(self, prefill: bool = True) -> int:
        """Compile the decode buckets, and the prefill-shaped ones unless `prefill` is False
        (those then compile on first use), and the speculative verification steps; returns how
        many were compiled."""
        return self.runner.warmup(prefill) + (self.speculator.warmup() if self.speculator else 0)

    # -- embeddings ---------------------------------------------------------------------------
    def embedding_batches(self, prompts: list[list[int]],
                          params: PoolingParams | None = None) -> list[list[int]]:
        """Validate prompts and parameters for embedding (ValueError); the prompts' indices
        grouped into the device batches `embed` runs them in."""
        (params or PoolingParams()).verify(self.model_config.hidden_size)
        for ids in prompts:
            check_embedding_prompt(ids, self.max_model_len, self.model_config.vocab_size)
        return self.pooler.batches([len(ids) for ids in prompts])

    def embed(self, prompts: list[list[int]],
              params: PoolingParams | None = None) -> np.ndarray:
        """Pooled final hidden states, float32 [len(prompts), hidden], in input order. Runs
        at once, beside (not through) the scheduler: call it between steps."""
        params = params or PoolingParams()
        out = np.zeros((len(prompts), self.model_config.hidden_size), np.float32)
        for group in self.embedding_batches(prompts, params):
            out[group] = self.pooler.run([prompts[i] for i in group])
        return l2_normalize(out) if params.normalize else out

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch a step; return the outputs of the steps read meanwhile (with
        async scheduling, the previous one)."""
        batch = self.scheduler.schedule()
        earlier, self.in_flight = self.in_flight, None
        if batch is None:
            return self._read(earlier) if earlier else []
        if self.speculator is not None and self.speculator.applies(batch):  # never async
            try:
                outputs = self.speculator.step(batch)
            except Exception as error:
                return self._recover(batch, error)
            if outputs is not None:
                return outputs
        compiles, started = self.runner.num_compiles, time.perf_counter()
        try:
            out = self.runner.run(batch, self._bitmask(batch), earlier and earlier.prev_tokens)
        except Exception as error:  # a bug, or a request that slipped past validation
            return self._recover(batch, error)
        self.num_prompt_tokens += sum(batch.num_new_tokens[batch.num_decode_rows:])
        self.in_flight = dispatched(batch, out, self.block_manager, started,
                                    compiled=self.runner.num_compiles != compiles)
        outputs = self._read(earlier) if earlier else []  # a failure there clears in_flight
        if self.in_flight is not None and not self._may_overlap(batch):
            current, self.in_flight = self.in_flight, None
            outputs += self._read(current)
        return outputs

    def _may_overlap(self, batch: ScheduledBatch) -> bool:
        """The next step may be dispatched before this one's tokens are read."""
        return (self.config.async_scheduling and self.speculator is None
                and not self.scheduler.suspects) and not any(
            seq.matcher is not None or seq.params.uses_penalties for seq in batch.seqs)

    def _timed(self, step: InFlight):
        """Tell the scheduler how long `step` held the device: from its dispatch, or from the
        end of the step before it, to now (steps run one after another), per decode step it
        ran. A compile says nothing of a step's cost."""
        done = time.perf_counter()
        if not step.compiled:
            held = done - max(step.dispatched_at, self._last_read)
            self.scheduler.observe(step.batch, held / step.batch.num_steps)
        self._last_read = done

    def _read(self, step: InFlight) -> list[RequestOutput]:
        """Read a dispatched step back: fill its placeholders, stop-check, detokenize."""
        try:
            out = jax.device_get(step.out)
        except Exception as error:  # the step failed on the device
            return self._recover(step.batch, error)
        self._timed(step)
        batch, touched, now = step.batch, {}, time.monotonic()
        sampled = out["sampled"] if "sampled" in out else out["tokens"][None]  # [steps, rows]
        for row, seq, offset in zip(range(len(batch.seqs)), batch.seqs, _offsets(batch)):
            if seq.is_finished:
                continue  # it stopped (or was aborted) while this step ran: discard its token
            req = self.requests[seq.request_id]
            if "prompt_logprob" in out and req.prompt_logprobs is not None and seq.index == 0:
                self._record_prompt_logprobs(req, seq, out, offset, step.starts[row],
                                             batch.num_new_tokens[row])
            if not step.sampled[row]:
                continue  # a prompt chunk; the prompt is not done yet
            for tokens in sampled:
                if seq.is_finished:
                    break  # it stopped: the tokens sampled after its last are discarded
                self._append(req, seq, out, row, int(tokens[row]))
            req.first_token_time = req.first_token_time or now
            touched[req.request_id] = req
        return [self._output(r) for r in touched.values()]

    def _recover(self, batch: ScheduledBatch, error: Exception) -> list[RequestOutput]:
        """After a failed step, nothing in the KV cache is trusted (it was donated to the step),
        nor what a step still in flight computes from it. A sequence that failed alone is to
        blame: its request ends with the error."""
        log.error("an engine step of %d sequences failed", len(batch.seqs), exc_info=error)
        self.in_flight = None
        for req in self.requests.values():
            for seq in req.seqs:
                seq.drop_placeholders()
        alone = len(batch.seqs) == 1
        self.scheduler.restart([] if alone else batch.seqs)
        self.block_manager.reset_prefix_cache()
        self.runner.reset_kv()
        req = self.requests.get(batch.seqs[0].request_id)
        if not alone or req is None:  # None: aborted while its step ran
            return []
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        out = self._output(req)
        out.error = error
        return [out]

    def _bitmask(self, batch: ScheduledBatch):
        """None when no row that samples this step is constrained, else what fills their
        allowed tokens (the runner calls it while the forward runs)."""
        matchers = [seq.matcher if seq.num_computed_tokens + n >= seq.num_tokens else None
                    for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        if not any(m is not None for m in matchers):
            return None
        return partial(self.structured.bitmask, matchers)

    def _append(self, req: Request, seq: Sequence, out: dict, row: int, token: int):
        seq.fill_placeholder(token)
        grammar_done = seq.matcher is not None and self.structured.advance(seq, token)
        self.num_generated_tokens += 1
        params = seq.params
        if "logprob" in out:
            lp = float(out["logprob"][row])
            seq.cumulative_logprob += lp
            if params.logprobs is not None:
                top = {int(i): float(v) for i, v in
                       zip(out["top_ids"][row][:params.logprobs], out["top_logprobs"][row])}
                seq.output_logprobs.append(logprob_entries(token, lp, top))
        detok = req.detoks[seq.index]
        before = len(detok.text)
        reason = stop = None
        n_out = seq.num_known_tokens - seq.num_prompt_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
                reason = "stop"
            elif token in params.stop_token_ids:
                reason, stop = "stop", token
        # vLLM leaves a stopping token's text out (it may be a special token kept in the text)
        if params.detokenize and (reason is None or params.include_stop_str_in_output):
            detok.add(token)
        text = detok.text
        if reason is None and n_out >= params.min_tokens and params.stop_strings:
            hit = _find_stop(text, before, params.stop_strings)
            if hit is not None:
                idx, s = hit
                text = text[:idx + (len(s) if params.include_stop_str_in_output else 0)]
                reason, stop = "stop", s
        if reason is None and grammar_done:
            reason = "stop"
        if reason is None and (params.max_tokens is not None and n_out >= params.max_tokens
                               or seq.num_known_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None and params.detokenize and not isinstance(stop, str):
            detok.flush()
            text = detok.text
        req.texts[seq.index] = text
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop
            self.scheduler.finish(seq)

    def _record_prompt_logprobs(self, req, seq, out, start, first, n):
        """The logprobs of the rows from `start` in `out`: the chunk from prompt position
        `first`, of n tokens."""
        k = req.params.prompt_logprobs
        for j in range(n):
            p = first + j + 1  # the prompt position this logit predicts
            if p >= seq.num_prompt_tokens:
                break
            entry = {seq.token_ids[p]: float(out["prompt_logprob"][start + j])}
            for i, v in zip(out["prompt_top_ids"][start + j][:k],
                            out["prompt_top_logprobs"][start + j][:k]):
                entry.setdefault(int(i), float(v))
            req.prompt_logprobs[p] = entry

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        hold = max((len(s) for s in req.params.stop_strings), default=1) - 1
        for seq, text in zip(req.seqs, req.texts):
            if not seq.is_finished and hold:
                text = text[:max(0, len(text) - hold)]
            logprobs = None
            if req.params.logprobs is not None:
                logprobs = list(seq.output_logprobs)
            outs.append(CompletionOutput(
                seq.index, text, seq.output_token_ids,
                seq.cumulative_logprob if req.params.logprobs is not None else None, logprobs,
                seq.finish_reason, seq.stop_reason))
        prompt_lps = None
        if req.prompt_logprobs is not None:
            ids = req.prompt_token_ids
            prompt_lps = [None if e is None else logprob_entries(ids[p], e[ids[p]], e)
                          for p, e in enumerate(req.prompt_logprobs)]
        finished = req.finished
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, prompt_lps, outs,
                             finished, req.seqs[0].num_cached_tokens,
                             {"arrival_time": req.arrival_time,
                              "first_token_time": req.first_token_time})

    def generate(self, prompts: list, params: SamplingParams | list | None = None):
        """Run prompts (strings or token id lists) to completion; outputs in input order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = {}
        while len(done) < len(ids):
            for o in self.step():
                if o.finished:
                    done[o.request_id] = o
        return [done[i] for i in ids]


def _offsets(batch: ScheduledBatch) -> list[int]:
    return list(np.cumsum([0] + batch.num_new_tokens[:-1]))


def _find_stop(text: str, before: int, stops) -> tuple[int, str] | None:
    best = None
    for s in stops:
        idx = text.find(s, max(0, before - len(s) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best
