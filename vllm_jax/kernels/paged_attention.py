"""Attention over a paged KV cache: the interface the models call, and the XLA reference.

Cache layout per layer: K and V as [num_kv_heads, num_pages, page_size, head_dim].
A token's KV lives at slot = page * page_size + offset; slot_mapping entries past the cache
(padding rows) are dropped on write.

`decode` and `prefill` pick an implementation by backend name (kernels/backend.py):
"xla" (the reference, used on Metal and as the test oracle), "cpu" (the C++ kernels in
cpu_attention.cc), "pallas" (GPU, Triton lowering) or "pallas_interpret" (the Pallas kernels run
by the interpreter, for tests on CPU).

`prefill` is the ragged path: query tokens flat across sequences, each with its own sequence
(seq_idx) and position, so one call serves prompt chunks and decode rows (1-token chunks)
together, as a mixed step needs. The XLA version scores every token against every row's keys
(cost tokens x rows x context): fine for a few prompts and for tests, slow for a mixed step with
dozens of decode rows, which the C++ kernel (per token, its own sequence only) serves on the CPU.

Both XLA functions walk the context in chunks of pages with an online softmax, looping only as
far as the longest context in the batch (a while loop with a traced trip count), so cost follows
the real context length and no shape depends on it. Keys outside a row's context are masked and
their values zeroed, so garbage (even NaN) in unused pages cannot leak into the result. The
Pallas kernels (paged_attention_pallas.py) follow the same rules per sequence: each program
loops over its own pages only. A kernel for another GPU lowering (Mosaic GPU) is a module beside
it with the same two functions, chosen in `decode` / `prefill` by a backend name.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vllm_jax.kernels import backend as kernel_backend
from vllm_jax.kernels.paged_attention_pallas import (decode_attention_pallas,
                                                   prefill_attention_pallas)

CHUNK_TOKENS = 512  # keys per loop step of prefill
DECODE_CHUNK_TOKENS = 128  # of decode: one query per row, so a chunk is mostly gather cost


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens]."""
    kvh, num_pages, page_size, hd = k_cache.shape
    if slot_mapping.shape[0] == 1:  # XLA turns a 1-slot scatter into a copy of the whole cache
        slot_mapping = jnp.pad(slot_mapping, (0, 1), constant_values=num_pages * page_size)
        k, v = (jnp.pad(x, ((0, 1), (0, 0), (0, 0))) for x in (k, v))

    def put(cache, x):
        flat = cache.reshape(kvh, num_pages * page_size, hd)
        flat = flat.at[:, slot_mapping].set(x.swapaxes(0, 1).astype(cache.dtype), mode="drop")
        return flat.reshape(cache.shape)

    return put(k_cache, k), put(v_cache, v)


def _chunking(block_tables, page_size, chunk_tokens=CHUNK_TOKENS):
    pages_per_chunk = max(1, min(block_tables.shape[1], chunk_tokens // page_size))
    pad = -block_tables.shape[1] % pages_per_chunk
    if pad:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, pad)))
    return block_tables, pages_per_chunk


def _online_softmax(first_chunk, num_chunks, init, chunk_fn):
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

    m, l, acc = jax.lax.fori_loop(first_chunk, num_chunks, body, init)
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
    block_tables, ppc = _chunking(block_tables, page_size, DECODE_CHUNK_TOKENS)
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
    first = 0
    if sliding_window is not None:  # keys before every row's window are never read
        live = jnp.where(context_lens > 0, context_lens - sliding_window, num_chunks * chunk)
        first = jnp.maximum(live.min(), 0) // chunk
    out = _online_softmax(first, num_chunks, init, chunk_fn)
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
    first = 0
    if sliding_window is not None:  # keys before every token's window are never read
        first = jnp.maximum(positions.min() - sliding_window + 1, 0) // chunk
    out = _online_softmax(first, num_chunks, init, chunk_fn)
    return out.reshape(t, h, hd).astype(q.dtype)


# -- backend choice (kernels/backend.py) ---------------------------------------------------------

def pallas_unsupported(k_cache) -> str | None:
    """Why the Pallas kernels cannot take this cache (static shapes/dtype), or None."""
    _, _, page_size, hd = k_cache.shape
    if page_size & (page_size - 1):
        return f"page_size {page_size} is not a power of two"
    if hd & (hd - 1) or hd < 16:
        return f"head_dim {hd} is not a power of two >= 16"
    return _dtype_unsupported(k_cache)


def _dtype_unsupported(k_cache) -> str | None:
    if k_cache.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"cache dtype {k_cache.dtype} is not float32/bfloat16/float16"
    return None


def cpu_unsupported(k_cache) -> str | None:
    if problem := _dtype_unsupported(k_cache):
        return problem
    hd = k_cache.shape[-1]
    return None if hd % 8 == 0 and hd <= 256 else f"head_dim {hd} is not a multiple of 8 <= 256"


def _resolve(backend: str, k_cache) -> str:
    name = kernel_backend.resolve(backend)
    check = {"xla": lambda _: None, "cpu": cpu_unsupported}.get(name, pallas_unsupported)
    problem = check(k_cache)
    if problem is None:
        return name
    if backend == "auto":
        return "xla"
    raise ValueError(f"{name} paged attention: {problem}")


def decode(q, k_cache, v_cache, block_tables, context_lens, *, scale, sliding_window=None,
           backend: str = "auto"):
    """decode_attention on the chosen backend (XLA where "auto" cannot use Pallas, or where the
    Pallas kernel does not compile)."""
    name = _resolve(backend, k_cache)
    args = (q, k_cache, v_cache, block_tables, context_lens)
    static = dict(scale=scale, sliding_window=sliding_window)
    if name == "cpu":
        from vllm_jax.kernels import cpu

        return cpu.decode_attention(*args, **static)
    if name != "xla" and _pallas_runs(name, "decode attention", decode_attention_pallas, args,
                                      static):
        return decode_attention_pallas(*args, **static, interpret=name == "pallas_interpret")
    return decode_attention(*args, **static)


def prefill(q, k_cache, v_cache, seq_idx, positions, block_tables, context_lens, *, scale,
            sliding_window=None, backend: str = "auto"):
    """prefill_attention on the chosen backend (XLA where "auto" cannot use Pallas, or where the
    Pallas kernel does not compile)."""
    name = _resolve(backend, k_cache)
    args = (q, k_cache, v_cache, seq_idx, positions, block_tables, context_lens)
    static = dict(scale=scale, sliding_window=sliding_window)
    if name == "cpu":
        from vllm_jax.kernels import cpu

        return cpu.ragged_attention(*args, **static)
    if name != "xla" and _pallas_runs(name, "prefill attention", prefill_attention_pallas, args,
                                      static):
        return prefill_attention_pallas(*args, **static, interpret=name == "pallas_interpret")
    return prefill_attention(*args, **static)


def _pallas_runs(name: str, kernel: str, fn, args, static: dict) -> bool:
    return kernel_backend.pallas_runs(name, kernel, functools.partial(fn, **static), args,
                                      tuple(static.items()))
