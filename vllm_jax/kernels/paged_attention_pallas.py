"""The paged-attention kernels in Pallas for GPUs (Triton lowering), called through
paged_attention.decode / prefill, which pick them by backend name.

Written for the Triton lowering: every array a kernel loads, stores or makes has power-of-two
dimensions, and both matmuls have M, N, K >= 16. The whole per-head cache is one block; pages
are gathered through the block table inside the kernel (`k_ref[pages]`), so nothing but the
sequence's own pages is read. Only pallas_call, BlockSpec, program_id, ds and the Triton
CompilerParams are used, so a Mosaic GPU port replaces this module only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Finite, so a fully masked row keeps a finite running max and exp(m_old - m_new) never sees
# inf - inf; masked probabilities are zeroed explicitly anyway.
_MASK = -1e30
_BIG = 2 ** 30
# Decode programs to aim for before splitting a sequence's pages (about 2 per H100 SM), and
# the fewest keys worth a split of their own (each split writes a float32 partial result).
_TARGET_PROGRAMS = 256
_MIN_SPLIT_KEYS = 512


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _keys_per_step(block_k, k_cache, cap: int) -> int:
    # A K tile of at most 32 KiB: with V and two pipeline stages it fits in shared memory.
    if block_k is not None:
        return block_k
    return max(16, min(cap, 32768 // (k_cache.shape[-1] * k_cache.dtype.itemsize)))


def _page_blocking(block_tables, page_size: int, block_k: int):
    """Pages per kernel step (>= 16 keys) and the block table padded to whole steps."""
    ppb = max(1, block_k // page_size, _cdiv(16, page_size))
    width = _cdiv(block_tables.shape[1], ppb) * ppb
    return ppb, _pad_to(block_tables.astype(jnp.int32), 1, width)


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _attend_pages(carry, q, k_ref, v_ref, pages, key_ok, row_ok, scale):
    """One online-softmax step over a few gathered pages.

    carry: (m [M], l [M], acc [M, hd]) float32; q: [M, hd]; pages: [ppb];
    key_ok: [BK] keys that exist (their V may be read); row_ok: [M, BK] keys each row attends to.
    """
    m, l, acc = carry
    hd = q.shape[-1]
    dtype = jnp.promote_types(q.dtype, k_ref.dtype)
    k = k_ref[pages].reshape(-1, hd).astype(dtype)  # [BK, hd]
    v = v_ref[pages].reshape(-1, hd).astype(dtype)
    v = jnp.where(key_ok[:, None], v, 0)
    scores = lax.dot_general(q.astype(dtype), k, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) * scale  # [M, BK]
    scores = jnp.where(row_ok, scores, _MASK)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    p = jnp.where(row_ok, jnp.exp(scores - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(axis=-1)
    pv = lax.dot_general(p.astype(dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return m_new, l, alpha[:, None] * acc + pv


def _block_pages(bt_ref, seq, page0, ppb, num_pages):
    from jax.experimental import pallas as pl
    pages = bt_ref[seq, pl.ds(page0, ppb)]
    # Unused table entries may hold anything; clamping keeps the gather inside the cache.
    return jnp.minimum(jnp.maximum(pages, 0), num_pages - 1)


def _decode_kernel(q_ref, k_ref, v_ref, bt_ref, lens_ref, acc_ref, m_ref, l_ref, *, scale,
                   window, page_size, ppb, pages_per_split, num_pages):
    from jax.experimental import pallas as pl
    seq, split = pl.program_id(1), pl.program_id(2)
    gp, hd = q_ref.shape
    bk = ppb * page_size
    ctx = lens_ref[seq]
    hi = jnp.minimum(ctx, (split + 1) * (pages_per_split * page_size))  # end of this split
    lo, first = 0, split * pages_per_split  # first key in the window, its step-aligned page
    if window is not None:
        lo = jnp.maximum(ctx - window, 0)
        first = jnp.maximum(first, lax.div(lo, bk) * ppb)
    steps = lax.div(jnp.maximum(hi - first * page_size, 0) + bk - 1, bk)
    q = q_ref[...]

    def step(i, carry):
        page0 = first + i * ppb
        kpos = page0 * page_size + jnp.arange(bk)
        ok = (kpos >= lo) & (kpos < hi)
        pages = _block_pages(bt_ref, seq, page0, ppb, num_pages)
        return _attend_pages(carry, q, k_ref, v_ref, pages, ok,
                             jnp.broadcast_to(ok[None, :], (gp, bk)), scale)

    init = (jnp.full((gp,), _MASK, jnp.float32), jnp.zeros((gp,), jnp.float32),
            jnp.zeros((gp, hd), jnp.float32))
    m, l, acc = lax.fori_loop(0, steps, step, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_attention_pallas(q, k_cache, v_cache, block_tables, context_lens, *, scale,
                            sliding_window=None, interpret=False, block_k=None, num_splits=None):
    """decode_attention as a Pallas kernel (flash-decoding).

    Grid (kv heads, sequences, splits): one program takes the G = num_heads / num_kv_heads
    queries of one KV head as the rows of its matmuls (padded to 16, the smallest MMA tile) and
    walks `block_k` keys at a time (default 128, fewer for wide f32 heads) through its
    sequence's pages, up to its own context length. A sequence's pages are split over
    `num_splits` programs when the batch alone would leave the GPU idle (default: a heuristic
    from the shapes); the partial softmax states are merged in XLA.
    """
    from jax.experimental import pallas as pl
    kvh, num_pages, page_size, hd = k_cache.shape
    s, h, _ = q.shape
    g = h // kvh
    gp = max(16, _pow2_at_least(g))
    ppb, block_tables = _page_blocking(block_tables, page_size,
                                       _keys_per_step(block_k, k_cache, 128))
    steps = block_tables.shape[1] // ppb
    if num_splits is None:
        most = max(1, block_tables.shape[1] * page_size // _MIN_SPLIT_KEYS)
        num_splits = max(1, min(most, _TARGET_PROGRAMS // (s * kvh)))
    pages_per_split = _cdiv(steps, num_splits) * ppb
    num_splits = _cdiv(block_tables.shape[1], pages_per_split)
    qg = _pad_to(q.reshape(s, kvh, g, hd), 2, gp)  # [S, kvh, Gp, hd]

    kernel = functools.partial(_decode_kernel, scale=scale, window=sliding_window,
                               page_size=page_size, ppb=ppb, pages_per_split=pages_per_split,
                               num_pages=num_pages)
    cache_spec = pl.BlockSpec((None, num_pages, page_size, hd), lambda h, i, j: (h, 0, 0, 0))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(kvh, s, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, gp, hd), lambda h, i, j: (i, h, 0, 0)),
            cache_spec,
            cache_spec,
            pl.BlockSpec(block_tables.shape, lambda h, i, j: (0, 0)),
            pl.BlockSpec((s,), lambda h, i, j: (0,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, hd), lambda h, i, j: (j, i, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda h, i, j: (j, i, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda h, i, j: (j, i, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, s, kvh, gp, hd), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, s, kvh, gp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, s, kvh, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps=4, num_stages=2),
        name="paged_decode_attention",
    )(qg, k_cache, v_cache, block_tables, context_lens.astype(jnp.int32))

    m_all = m.max(axis=0)
    w = jnp.exp(m - m_all)  # [splits, S, kvh, Gp]
    l_all = (w * l).sum(axis=0)
    out = (w[..., None] * acc).sum(axis=0) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    return out[:, :, :g].reshape(s, h, hd).astype(q.dtype)


def _prefill_kernel(q_ref, k_ref, v_ref, seq_ref, pos_ref, bt_ref, lens_ref, o_ref, *, scale,
                    window, page_size, ppb, num_pages):
    tile, gp, hd = q_ref.shape
    rows = tile * gp
    bk = ppb * page_size
    q = q_ref[...].reshape(rows, hd)  # row = token * Gp + query head in the group
    seq = seq_ref[...]  # [tile]
    pos = pos_ref[...]  # [tile]; -1 for tile padding

    def per_seq(s, carry):
        own = seq == s
        ctx = lens_ref[s]
        hi = jnp.minimum(ctx, jnp.max(jnp.where(own, pos + 1, 0)))
        lo, first = 0, 0
        if window is not None:
            lo = jnp.maximum(jnp.min(jnp.where(own, pos, _BIG)) - window + 1, 0)
            first = lax.div(lo, bk) * ppb
        steps = lax.div(jnp.maximum(hi - first * page_size, 0) + bk - 1, bk)

        def step(i, carry):
            page0 = first + i * ppb
            kpos = page0 * page_size + jnp.arange(bk)
            key_ok = (kpos >= lo) & (kpos < hi)
            ok = own[:, None] & key_ok[None, :] & (kpos[None, :] <= pos[:, None])  # [tile, BK]
            if window is not None:
                ok &= kpos[None, :] > pos[:, None] - window
            row_ok = jnp.broadcast_to(ok[:, None, :], (tile, gp, bk)).reshape(rows, bk)
            pages = _block_pages(bt_ref, s, page0, ppb, num_pages)
            return _attend_pages(carry, q, k_ref, v_ref, pages, key_ok, row_ok, scale)

        return lax.fori_loop(0, steps, step, carry)

    init = (jnp.full((rows,), _MASK, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, hd), jnp.float32))
    _, l, acc = lax.fori_loop(jnp.min(seq), jnp.max(seq) + 1, per_seq, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    o_ref[...] = out.reshape(tile, gp, hd).astype(o_ref.dtype)


def prefill_attention_pallas(q, k_cache, v_cache, seq_idx, positions, block_tables, context_lens,
                             *, scale, sliding_window=None, interpret=False, block_m=64,
                             block_k=None):
    """prefill_attention as a Pallas kernel over ragged chunks of the flat token array.

    Grid (token tiles, kv heads): a tile is `block_m // G` consecutive tokens times the G query
    heads of one KV head (rows of the matmuls, >= 16). For each sequence its tokens belong to
    (seq_idx from the tile's min to max; tokens of a sequence are normally contiguous), the tile
    walks `block_k` keys (default 64) at a time from the sliding-window start of its earliest
    token to its latest token, masking by seq_idx, causality and context length.
    """
    from jax.experimental import pallas as pl
    kvh, num_pages, page_size, hd = k_cache.shape
    t, h, _ = q.shape
    g = h // kvh
    gp = _pow2_at_least(g)
    tile = max(min(block_m // gp, _pow2_at_least(t)), _cdiv(16, gp))  # tokens per tile
    tp = _cdiv(t, tile) * tile
    ppb, block_tables = _page_blocking(block_tables, page_size,
                                       _keys_per_step(block_k, k_cache, 64))
    qg = _pad_to(_pad_to(q.reshape(t, kvh, g, hd), 2, gp), 0, tp)  # [Tp, kvh, Gp, hd]
    seq_idx = jnp.pad(seq_idx.astype(jnp.int32), (0, tp - t), mode="edge")
    positions = _pad_to(positions.astype(jnp.int32), 0, tp, value=-1)
    s = block_tables.shape[0]

    kernel = functools.partial(_prefill_kernel, scale=scale, window=sliding_window,
                               page_size=page_size, ppb=ppb, num_pages=num_pages)
    cache_spec = pl.BlockSpec((None, num_pages, page_size, hd), lambda i, h: (h, 0, 0, 0))
    tile_spec = pl.BlockSpec((tile, None, gp, hd), lambda i, h: (i, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(tp // tile, kvh),
        in_specs=[
            tile_spec,
            cache_spec,
            cache_spec,
            pl.BlockSpec((tile,), lambda i, h: (i,)),
            pl.BlockSpec((tile,), lambda i, h: (i,)),
            pl.BlockSpec(block_tables.shape, lambda i, h: (0, 0)),
            pl.BlockSpec((s,), lambda i, h: (0,)),
        ],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps=4, num_stages=2),
        name="paged_prefill_attention",
    )(qg, k_cache, v_cache, seq_idx, positions, block_tables, context_lens.astype(jnp.int32))
    return out[:t, :, :g].reshape(t, h, hd)