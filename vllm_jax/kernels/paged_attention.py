"""Attention over a paged KV cache: the XLA reference, used on CPU/Metal and as the test oracle.

Cache layout per layer: K and V as [num_kv_heads, num_pages, page_size, head_dim].
A token's KV lives at slot = page * page_size + offset; slot_mapping entries past the cache
(padding rows) are dropped on write.

Both functions walk the context in chunks of pages with an online softmax, looping only as far
as the longest context in the batch (a while loop with a traced trip count), so cost follows the
real context length and no shape depends on it. Keys outside a row's context are masked and
their values zeroed, so garbage (even NaN) in unused pages cannot leak into the result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_TOKENS = 512


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens]."""
    kvh, num_pages, page_size, hd = k_cache.shape

    def put(cache, x):
        flat = cache.reshape(kvh, num_pages * page_size, hd)
        flat = flat.at[:, slot_mapping].set(x.swapaxes(0, 1).astype(cache.dtype), mode="drop")
        return flat.reshape(cache.shape)

    return put(k_cache, k), put(v_cache, v)


def _chunking(block_tables, page_size):
    pages_per_chunk = max(1, min(block_tables.shape[1], CHUNK_TOKENS // page_size))
    pad = -block_tables.shape[1] % pages_per_chunk
    if pad:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, pad)))
    return block_tables, pages_per_chunk


def _online_softmax(num_chunks, init, chunk_fn):
    def body(c, carry):
        m, l, acc = carry
        scores, v, valid = chunk_fn(c)  # scores/valid [..., keys], v [..., keys, hd]
        scores = jnp.where(valid, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - m_safe[..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("...c,...cd->...d", p, v)
        return m_new, l, acc

    m, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, scale,
                     sliding_window=None):
    """One query token per sequence, at position context_len - 1.

    q: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_pages];
    context_lens: [num_seqs] (0 for padding rows). Returns [num_seqs, num_heads, head_dim].
    """
    kvh, _, page_size, hd = k_cache.shape
    s, h, _ = q.shape
    g = h // kvh
    block_tables, ppc = _chunking(block_tables, page_size)
    chunk = ppc * page_size
    qg = q.reshape(s, kvh, g, hd).astype(jnp.float32) * scale  # [S, kvh, G, hd]
    qpos = context_lens - 1

    def chunk_fn(c):
        pages = jax.lax.dynamic_slice_in_dim(block_tables, c * ppc, ppc, axis=1)  # [S, ppc]
        k = k_cache[:, pages].reshape(kvh, s, chunk, hd).astype(jnp.float32)
        v = v_cache[:, pages].reshape(kvh, s, chunk, hd).astype(jnp.float32)
        kpos = c * chunk + jnp.arange(chunk)
        valid = kpos[None, :] < context_lens[:, None]  # [S, C]
        if sliding_window is not None:
            valid &= kpos[None, :] > qpos[:, None] - sliding_window
        v = jnp.where(valid[None, :, :, None], v, 0.0)
        scores = jnp.einsum("skgd,kscd->skgc", qg, k)
        return scores, v.transpose(1, 0, 2, 3)[:, :, None], valid[:, None, None, :]

    init = (jnp.full((s, kvh, g), -jnp.inf), jnp.zeros((s, kvh, g)), jnp.zeros((s, kvh, g, hd)))
    num_chunks = (context_lens.max() + chunk - 1) // chunk
    out = _online_softmax(num_chunks, init, chunk_fn)
    return out.reshape(s, h, hd).astype(q.dtype)


def prefill_attention(q, k_cache, v_cache, seq_idx, positions, block_tables, context_lens, *,
                      scale, sliding_window=None):
    """Ragged prompt chunks of a few sequences, causal over each sequence's paged context.

    q: [num_tokens, num_heads, head_dim]; seq_idx/positions: [num_tokens];
    block_tables: [num_seqs, max_pages]; context_lens: [num_seqs] (tokens in the cache after
    this step's write). Returns [num_tokens, num_heads, head_dim].
    """
    kvh, _, page_size, hd = k_cache.shape
    t, h, _ = q.shape
    s = block_tables.shape[0]
    g = h // kvh
    block_tables, ppc = _chunking(block_tables, page_size)
    chunk = ppc * page_size
    qg = q.reshape(t, kvh, g, hd).astype(jnp.float32) * scale
    own = seq_idx[:, None] == jnp.arange(s)[None, :]  # [T, S]

    def chunk_fn(c):
        pages = jax.lax.dynamic_slice_in_dim(block_tables, c * ppc, ppc, axis=1)
        k = k_cache[:, pages].reshape(kvh, s * chunk, hd).astype(jnp.float32)
        v = v_cache[:, pages].reshape(kvh, s * chunk, hd).astype(jnp.float32)
        kpos = c * chunk + jnp.arange(chunk)  # [C]
        in_ctx = kpos[None, :] < context_lens[:, None]  # [S, C]
        v = jnp.where(in_ctx.reshape(1, s * chunk, 1), v, 0.0)
        valid = own[:, :, None] & in_ctx[None] & (kpos[None, None, :] <= positions[:, None, None])
        if sliding_window is not None:
            valid &= kpos[None, None, :] > positions[:, None, None] - sliding_window
        scores = jnp.einsum("tkgd,kcd->tkgc", qg, k)
        return scores, v[None, :, None], valid.reshape(t, 1, 1, s * chunk)

    init = (jnp.full((t, kvh, g), -jnp.inf), jnp.zeros((t, kvh, g)), jnp.zeros((t, kvh, g, hd)))
    num_chunks = (context_lens.max() + chunk - 1) // chunk
    out = _online_softmax(num_chunks, init, chunk_fn)
    return out.reshape(t, h, hd).astype(q.dtype)
