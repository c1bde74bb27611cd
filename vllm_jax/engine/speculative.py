"""Speculative decoding: each decoding sequence proposes up to k tokens, one target step scores
its last token and the proposals, and the accepted run is appended token by token.

A sequence's `num_computed_tokens` counts accepted tokens only: the KV that rejected proposals
wrote past them is overwritten by later steps. Proposals never take a page from another
sequence: a row proposes only what free pages, its max_tokens and max_model_len leave room
for. Stop conditions apply to each appended token, so nothing past a stop is emitted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import numpy as np

from vllm_jax.config import ConfigError
from vllm_jax.engine.scheduler import ScheduledBatch
from vllm_jax.engine.sequence import Sequence
from vllm_jax.loader import load
from vllm_jax.loader.default_model import resolve_model_path
from vllm_jax.runner.drafter import Drafter
from vllm_jax.runner.spec_runner import Verifier

MAX_SPECULATIVE_TOKENS = 16
CONFIG_KEYS = {"method", "model", "num_speculative_tokens", "prompt_lookup_max",
               "prompt_lookup_min", "disable_by_batch_size"}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str  # "ngram" (prompt lookup) | "draft_model"
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    model: str | None = None  # the draft model's path or name
    # steps with more sequences than this decode plainly: verifying k + 1 tokens a row pays
    # while a step is bound by reading the weights, not once it is bound by compute
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, spec: dict) -> "SpeculativeConfig":
        """vLLM's speculative_config dict, checked (ConfigError says what is wrong)."""
        if not isinstance(spec, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {spec!r}")
        unknown = sorted(set(spec) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"unknown speculative_config keys {unknown}; known: "
                              f"{sorted(CONFIG_KEYS)}")
        model = spec.get("model")
        method = spec.get("method") or ("draft_model" if model else None)
        if method not in ("ngram", "draft_model"):
            raise ConfigError(f"speculative_config needs \"method\": \"ngram\" or a draft "
                              f"\"model\", got method {method!r}")
        if method == "draft_model" and not model:
            raise ConfigError("the draft_model method needs a \"model\" (--speculative-model)")
        if method == "ngram" and model:
            raise ConfigError("the ngram method takes no \"model\"")
        k = _int_in(spec.get("num_speculative_tokens"), "num_speculative_tokens", 1,
                    MAX_SPECULATIVE_TOKENS)
        lo, hi = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
        lo, hi = (5, 5) if lo is None and hi is None else (lo if lo is not None else hi,
                                                           hi if hi is not None else lo)
        lo = _int_in(lo, "prompt_lookup_min", 1, 1 << 20)
        hi = _int_in(hi, "prompt_lookup_max", lo, 1 << 20)
        limit = spec.get("disable_by_batch_size")
        if limit is not None:
            limit = _int_in(limit, "disable_by_batch_size", 1, 1 << 20)
        return cls(method, k, hi, lo, model, limit)


def _int_in(value, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def ngram_proposal(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the last n
    tokens (n from n_max down to n_min), or [] when none recurs."""
    arr = np.asarray(tokens)
    for n in range(min(n_max, len(arr) - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return arr[start:start + k].tolist()
    return []


@dataclass
class SpecStats:
    steps: int = 0
    rows: int = 0  # sequences verified, summed over steps
    draft_tokens: int = 0  # proposed
    accepted_tokens: int = 0  # proposals accepted
    emitted_tokens: int = 0  # appended (accepted + the target's own, cut at stops)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def as_dict(self) -> dict:
        return dict(steps=self.steps, rows=self.rows, draft_tokens=self.draft_tokens,
                    accepted_tokens=self.accepted_tokens, emitted_tokens=self.emitted_tokens,
                    acceptance_rate=self.acceptance_rate)


@dataclass
class Speculator:
    """Turns a pure decode batch into a verification step (`step`) for the engine."""
    config: SpeculativeConfig
    engine: object  # the LLMEngine
    verifier: Verifier
    drafter: Drafter | None = None  # proposals from a draft model (else n-gram lookup)
    stats: SpecStats = field(default_factory=SpecStats)

    def warmup(self) -> int:
        if self.drafter is None:
            return self.verifier.warmup()
        vocab = self.engine.model_config.vocab_size
        return self.verifier.warmup(vocab) + self.drafter.warmup()

    def applies(self, batch: ScheduledBatch) -> bool:
        limit = self.config.disable_by_batch_size
        return (batch.decode and (limit is None or len(batch.seqs) <= limit)
                and all(seq.matcher is None for seq in batch.seqs))

    def step(self, batch: ScheduledBatch) -> list | None:
        """Propose, verify, append; None when no row proposes (the engine runs a plain step)."""
        seqs = batch.seqs
        room = self._room(seqs)
        if not any(room):
            return None
        for seq, n in zip(seqs, room):
            self.engine.block_manager.may_append(seq, seq.num_tokens + n)
        drafts, draft_probs = self._propose(seqs, room)
        if not any(drafts):
            return None
        for seq, d in zip(seqs, drafts):
            seq.token_ids.extend(d)
        try:
            out = jax.device_get(self.verifier.run(seqs, drafts, draft_probs))
        finally:
            for seq, d in zip(seqs, drafts):
                del seq.token_ids[len(seq.token_ids) - len(d):]
        return self._append_runs(seqs, drafts, out)

    def _room(self, seqs: list[Sequence]) -> list[int]:
        """How many proposals each row may make (a verification step holds k + 1 tokens a row,
        whatever the token budget)."""
        engine, k = self.engine, self.config.num_speculative_tokens
        bm = engine.block_manager
        free = bm.num_free
        room = []
        for seq in seqs:
            limit = engine.max_model_len - seq.num_tokens - 1
            if seq.params.max_tokens is not None:
                limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
            n = max(0, min(k, limit))
            while n and bm.pages_needed(seq.num_tokens + n) - len(seq.block_table) > free:
                n -= 1
            free -= max(0, bm.pages_needed(seq.num_tokens + n) - len(seq.block_table))
            room.append(n)
        return room

    def _propose(self, seqs, room):
        if self.drafter is not None:
            return self.drafter.propose(seqs, room)
        c = self.config
        return [ngram_proposal(seq.token_ids, n, c.prompt_lookup_max, c.prompt_lookup_min)
                if n else [] for seq, n in zip(seqs, room)], None

    def _append_runs(self, seqs, drafts, out) -> list:
        engine, stats = self.engine, self.stats
        stats.steps += 1
        stats.rows += len(seqs)
        now = time.monotonic()
        touched = {}
        for row, (seq, d) in enumerate(zip(seqs, drafts)):
            accepted = int(out["num_accepted"][row])
            stats.draft_tokens += len(d)
            stats.accepted_tokens += accepted
            req = engine.requests[seq.request_id]
            if self.drafter is not None:
                self.drafter.commit(seq, accepted)
            for j in range(accepted + 1):
                seq.num_computed_tokens += 1
                engine.block_manager.register_computed(seq)
                seq.add_placeholder(-1)  # what _append fills, as after a plain step
                engine._append(req, seq, _position(out, row, j), 0, int(out["tokens"][row, j]))
                stats.emitted_tokens += 1
                if seq.is_finished:
                    break
            req.first_token_time = req.first_token_time or now
            touched[req.request_id] = req
        return [engine._output(r) for r in touched.values()]


def make_speculator(engine, spec: dict) -> Speculator:
    """The engine's speculator for a speculative_config dict (ConfigError when it is bad)."""
    config = SpeculativeConfig.parse(spec)
    k = config.num_speculative_tokens
    drafter = None
    if config.model:
        c = engine.config
        loaded = load(resolve_model_path(config.model), c.dtype, mesh=engine.mesh,
                      backend=c.backends(), keep_quantized=c.keep_quantized,
                      max_model_len=engine.max_model_len)
        drafter = Drafter(loaded, engine.runner, c.max_num_seqs, k)
    return Speculator(config, engine, Verifier(engine.runner, k), drafter)


def _position(out: dict, row: int, j: int) -> dict:
    """Row `row`'s j-th emitted token's logprobs as a one-row step output (what
    LLMEngine._append reads)."""
    return {name: value[row, j][None] for name, value in out.items()
            if name in ("logprob", "top_ids", "top_logprobs")}
