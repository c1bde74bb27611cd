"""Inputs for the kernel checks: ragged decode and prefill batches over poisoned paged caches
(kernels/check_inputs.py), GGUF-quantized matrices, and the shapes of the models the GPU run is about.

Every builder is host numpy with a seeded generator, so a failing case can be rebuilt exactly
from the name and numbers the report prints.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_jax.kernels import quant
from vllm_jax.kernels.check_inputs import poisoned_cache, ragged_chunks

GGUF_TYPES = tuple(quant.QTYPES)


@dataclass(frozen=True, slots=True)
class AttnShape:
    """One model's attention: KV heads, query heads per KV head, head size."""
    name: str
    kv_heads: int
    group: int
    head_dim: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.group


LLAMA_8B = AttnShape("llama3.1-8b", 8, 4, 128)
QWEN3_06B = AttnShape("qwen3-0.6b", 8, 2, 128)
TINY = AttnShape("tiny", 2, 4, 16)
QWQ_HIDDEN, QWQ_INTERMEDIATE = 5120, 27648
LLAMA_HIDDEN, LLAMA_INTERMEDIATE = 4096, 14336
MATMUL_SHAPES = [(QWQ_HIDDEN, QWQ_HIDDEN), (QWQ_INTERMEDIATE, QWQ_HIDDEN),  # (rows, cols)
                 (QWQ_HIDDEN, QWQ_INTERMEDIATE), (LLAMA_INTERMEDIATE, LLAMA_HIDDEN),
                 (LLAMA_HIDDEN, LLAMA_INTERMEDIATE)]
PAGE_SIZE = 16


@dataclass(slots=True)
class PagedBatch:
    """A paged KV cache [kvh, pages, page_size, hd] (NaN outside every row's context) with
    queries [tokens, heads, hd] and the metadata both attention kernels take."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    block_tables: np.ndarray  # [seqs, max_pages]; unused entries point at random pages
    context_lens: np.ndarray  # [seqs]
    seq_idx: np.ndarray  # [tokens] (prefill)
    positions: np.ndarray  # [tokens] (prefill)


def _poisoned_cache(rng, shape: AttnShape, context_lens):
    max_pages = max(-(-c // PAGE_SIZE) for c in context_lens) + 2
    return poisoned_cache(rng, shape.kv_heads, shape.head_dim, PAGE_SIZE, context_lens, max_pages)


def decode_batch(seed: int, shape: AttnShape, context_lens) -> PagedBatch:
    """One query per row at position context_len - 1 (0: a padding row)."""
    rng = np.random.default_rng(seed)
    k, v, tables = _poisoned_cache(rng, shape, context_lens)
    q = rng.standard_normal((len(context_lens), shape.heads, shape.head_dim)).astype(np.float32)
    rows = np.arange(len(context_lens), dtype=np.int32)
    lens = np.asarray(context_lens, np.int32)
    return PagedBatch(q, k, v, tables, lens, rows, lens - 1)


def prefill_batch(seed: int, shape: AttnShape, context_lens, new_tokens, pad_to: int) -> PagedBatch:
    """A prefill step of `check_inputs.ragged_chunks`, padded to pad_to tokens."""
    rng = np.random.default_rng(seed)
    k, v, tables = _poisoned_cache(rng, shape, context_lens)
    seq_idx, positions = ragged_chunks(context_lens, new_tokens, pad_to)
    q = rng.standard_normal((pad_to, shape.heads, shape.head_dim)).astype(np.float32)
    return PagedBatch(q, k, v, tables, np.asarray(context_lens, np.int32), seq_idx, positions)


def quantized_matrix(seed: int, qtype: str, rows: int, cols: int) -> dict:
    """`quant.repack` fields of a random [rows, cols] matrix quantized by the project's quantizer."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    return quant.repack(quant.quantize(w, qtype))
