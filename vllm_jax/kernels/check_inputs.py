"""Inputs that make kernel bugs visible, shared by the tests and tools/gpu_preflight.py (which
runs on machines without the test suite).

A poisoned paged cache holds random K/V for each row's context on shuffled pages and NaN in every
other slot, and its unused block-table entries point at random pages: an unmasked or out-of-range
read turns the result into NaN instead of a small, plausible error.
"""
from __future__ import annotations

import numpy as np


def poisoned_cache(rng: np.random.Generator, kvh: int, hd: int, page_size: int, context_lens,
                   max_pages: int, spare_pages: int = 3):
    """-> k, v float32 [kvh, num_pages, page_size, hd], block_tables int32 [rows, max_pages]."""
    need = [-(-c // page_size) for c in context_lens]
    num_pages = sum(need) + spare_pages
    order = rng.permutation(num_pages)
    tables = rng.integers(0, num_pages, (len(context_lens), max_pages)).astype(np.int32)
    k = np.full((kvh, num_pages, page_size, hd), np.nan, np.float32)
    v = k.copy()
    used = 0
    for row, (c, n) in enumerate(zip(context_lens, need)):
        tables[row, :n] = order[used:used + n]
        used += n
        pos = np.arange(c)
        pages, offsets = tables[row, pos // page_size], pos % page_size
        k[:, pages, offsets] = rng.standard_normal((kvh, c, hd))
        v[:, pages, offsets] = rng.standard_normal((kvh, c, hd))
    return k, v, tables


def ragged_chunks(context_lens, new_tokens, num_tokens: int):
    """seq_idx, positions int32 [num_tokens] of a prefill step: each row's last new_tokens
    positions as one chunk (its earlier tokens already cached), then padding tokens the way the
    runner writes them (the last row, position 0)."""
    seq_idx = np.full(num_tokens, len(context_lens) - 1, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    off = 0
    for row, (c, n) in enumerate(zip(context_lens, new_tokens)):
        seq_idx[off:off + n] = row
        positions[off:off + n] = np.arange(c - n, c)
        off += n
    return seq_idx, positions
