"""Embeddings on the device: the model's final hidden states (after its final norm), pooled per
prompt, in static-shaped cache-free batches.

A batch is [rows, length] tokens, both powers of two (the length capped at max_model_len), with
rows * length within a token budget unless one prompt alone exceeds it; so the number of
compiled programs is bounded by the buckets, whatever the prompts. Prompts are right-padded:
attention is causal, so no real token attends to a padding token after it, and pooling reads
only each prompt's own `length` positions. Padding rows (to fill `rows`) are dropped. Weights
go in as arguments (the ModelRunner's leaves), never as constants.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import parallel
from vllm_jax.models.base import ConfigError
from vllm_jax.runner.model_runner import ModelRunner, buckets, pick

POOLING_TYPES = ("last", "mean")


def pool(hidden, lengths, pooling: str):
    """hidden [B, L, H], lengths [B] (each >= 1) -> float32 [B, H]: the last real token's
    state, or the mean over the real tokens."""
    hidden = hidden.astype(jnp.float32)
    if pooling == "last":
        return hidden[jnp.arange(hidden.shape[0]), lengths - 1]
    real = jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]  # [B, L]
    total = jnp.sum(jnp.where(real[..., None], hidden, 0.0), axis=1)
    return total / lengths[:, None].astype(jnp.float32)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Pooler:
    def __init__(self, runner: ModelRunner, pooling: str, max_model_len: int, max_tokens: int,
                 mesh=None):
        if pooling not in POOLING_TYPES:
            raise ConfigError(f"pooling must be one of {', '.join(POOLING_TYPES)}, "
                              f"got {pooling!r}")
        self.runner = runner
        self.pooling = pooling
        self.length_buckets = buckets(max_model_len, start=min(16, max_model_len))
        self.max_tokens = max_tokens
        self.num_compiles = 0
        self._embed = parallel.under_mesh(jax.jit(self._embed_impl, static_argnums=(3,)), mesh)

    def _embed_impl(self, leaves, tokens, lengths, pooling: str):
        self.num_compiles += 1  # runs only while tracing, i.e. once per compile
        hidden, _ = self.runner.model(leaves)(tokens)  # [B, L, hidden]
        return pool(hidden, lengths, pooling)

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """The prompts' indices grouped into device batches, longest prompts first (so each
        batch pads its prompts to a similar length)."""
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            if groups and self._fits(len(groups[-1]) + 1, lengths[groups[-1][0]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _fits(self, rows: int, longest: int) -> bool:
        return next_power_of_two(rows) * pick(self.length_buckets, longest) <= self.max_tokens

    def run(self, prompts: list[list[int]]) -> np.ndarray:
        """Pooled (not normalized) float32 [len(prompts), hidden] for one batch of prompts."""
        rows = next_power_of_two(len(prompts))
        length = pick(self.length_buckets, max(len(p) for p in prompts))
        tokens = np.zeros((rows, length), np.int32)
        lengths = np.ones(rows, np.int32)
        for r, ids in enumerate(prompts):
            tokens[r, :len(ids)] = ids
            lengths[r] = len(ids)
        pooled = self._embed(self.runner.leaves, tokens, lengths, self.pooling)
        return np.asarray(jax.device_get(pooled))[:len(prompts)]
