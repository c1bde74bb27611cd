"""Fused dequant-matmul Pallas kernels over the fields of `quant.repack` (GPU, Triton lowering),
shaped for the two regimes of a step; `fused_qmatmul` picks one by token count at trace time.

Decode (<= DECODE_MAX_TOKENS tokens) is a split-K GEMV: grid = (row tiles of 32, K splits), each
program walks its contiguous 1/splits of every row's packed bytes and writes float32 partial
sums of the real tokens only; XLA sums the split axis. Splits are chosen so the grid holds
>= MIN_PROGRAMS programs (4 per SM of a 132-SM H100) where partial sums stay under a quarter of
the weight bytes. Its roofline is the packed weight read once (BENCHMARKS.md).

Prefill is a GEMM tiled 128 tokens x 64 rows (8 warps; fewer rows where the grid would leave
SMs idle). Token tiles are the fastest grid axis, so the programs sharing a weight tile run
together (HBM reads it once, L2 serves the rest). Each weight tile is dequantized once per 128
tokens and its 16/32-value units merged into 128-deep tiles (quant_units.deep_accumulate, x
permuted in XLA to match): every dot is 128 deep, in x's dtype with float32 accumulation.

`grouped_fused_qmatmul` runs the per-unit K loop for Mixture-of-Experts layers: token tiles of
rows sorted by expert, each tile reading only its own expert's weights. Only `quant.qmatmul` and
moe.py import this module, and only for a Pallas backend, so CPU/Metal runs never import Pallas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from vllm_jax.kernels.quant_units import (UNITS, accumulate, deep_accumulate, deep_permutation,
                                          deep_plan, precision, triton_params)

_F32 = jnp.float32
DECODE_MAX_TOKENS = 16  # the smallest Triton dot: up to here one token tile serves the batch
SMS = 132  # H100 SXM
MIN_PROGRAMS = 4 * SMS
_DECODE_ROWS = 32
_MIN_SPLIT_VALUES = 256  # one super-block, eight legacy blocks: a split's loop is not trivial
_PREFILL_TOKENS, _PREFILL_ROWS = 128, 64


def regime(tokens: int) -> str:
    """Which kernel `fused_qmatmul` runs for `tokens` rows of x: "decode" or "prefill"."""
    return "decode" if tokens <= DECODE_MAX_TOKENS else "prefill"


def fused_qmatmul(x, fields, qtype, cols, *, interpret=False):
    """x [tokens, cols] @ dequantize(fields).T -> [tokens, rows] in x.dtype."""
    run = decode_qmatmul if regime(x.shape[0]) == "decode" else prefill_qmatmul
    return run(x, fields, qtype, cols, interpret=interpret)


def _padded_fields(fields, multiple):
    """(sorted names, arrays with rows padded to `multiple`); zero scales: padded rows are 0."""
    names = sorted(fields)
    arrays = [jnp.asarray(fields[k]) for k in names]
    pad = -arrays[0].shape[0] % multiple
    if pad:
        arrays = [jnp.pad(a, ((0, pad), (0, 0))) for a in arrays]
    return names, arrays


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def decode_tiling(rows: int, tokens: int, n_blocks: int, step: int, row_bytes: int):
    """(rows per program, K splits) for the decode kernel. Splits divide n_blocks (so every
    field splits evenly), keep >= _MIN_SPLIT_VALUES per split and partial sums <= a quarter of
    the weight bytes; the fewest such splits that give MIN_PROGRAMS programs, else the most."""
    bn = _DECODE_ROWS
    row_tiles = pl.cdiv(rows, bn)
    fits = [s for s in _divisors(n_blocks) if s == 1 or (  # s * tokens * 4 B <= row_bytes / 4
        n_blocks // s * step >= _MIN_SPLIT_VALUES and 16 * s * tokens <= row_bytes)]
    return bn, next((s for s in fits if row_tiles * s >= MIN_PROGRAMS), fits[-1])


def decode_qmatmul(x, fields, qtype, cols, *, interpret=False, block_rows=None, splits=None):
    """Split-K GEMV for <= DECODE_MAX_TOKENS tokens: x [tokens, cols] -> [tokens, rows]."""
    tokens, step = x.shape[0], UNITS[qtype][0]
    if tokens > DECODE_MAX_TOKENS:
        raise ValueError(f"decode_qmatmul takes <= {DECODE_MAX_TOKENS} tokens, got {tokens}")
    rows, n_blocks = next(iter(fields.values())).shape[0], cols // step
    row_bytes = sum(a.shape[1] * jnp.dtype(a.dtype).itemsize for a in fields.values())
    bn, ns = decode_tiling(rows, tokens, n_blocks, step, row_bytes)
    bn, ns = block_rows or bn, splits or ns
    names, arrays = _padded_fields(fields, bn)
    bm, kc = DECODE_MAX_TOKENS, cols // ns
    xp = jnp.pad(x, ((0, bm - tokens), (0, 0)))
    prec = precision(x.dtype)

    def kernel(x_ref, *refs):
        *field_refs, o_ref = refs
        acc = accumulate(x_ref, dict(zip(names, field_refs)), qtype, kc, bm, bn, prec)
        real = jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0) < tokens
        pltriton.store(o_ref, acc, mask=real)  # rows past `tokens` lie outside the output

    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((ns, tokens, arrays[0].shape[0]), _F32),
        grid=(arrays[0].shape[0] // bn, ns),
        in_specs=[pl.BlockSpec((bm, kc), lambda i, k: (0, k))]
        + [pl.BlockSpec((bn, a.shape[1] // ns), lambda i, k: (i, k)) for a in arrays],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, k: (k, 0, i)),
        interpret=interpret,
        compiler_params=None if interpret else triton_params(),
        name="qmatmul_decode_split_k",
    )(xp, *arrays)
    return partial.sum(axis=0)[:, :rows].astype(x.dtype)


def prefill_tiling(rows: int, tokens: int):
    """(tokens, rows) per program: up to 128 x 64; fewer rows where that leaves SMs idle (a
    narrow k/v projection, a short prefill), down to 16."""
    bm = min(_PREFILL_TOKENS, max(16, pl.next_power_of_2(tokens)))
    token_tiles = pl.cdiv(tokens, bm)
    bn = next((bn for bn in (_PREFILL_ROWS, 32) if pl.cdiv(rows, bn) * token_tiles >= SMS), 16)
    return bm, bn


def _prefill_launch(bm, bn):
    """(warps, pipeline stages): three stages of 128 x 128-deep x tiles (two per K-quant step)
    overflow the H100's 227 KiB of shared memory per block with q5_k and q6_k; two fit all."""
    return (8, 2) if bm * bn >= _PREFILL_TOKENS * _PREFILL_ROWS else (4, 2)


def prefill_qmatmul(x, fields, qtype, cols, *, interpret=False, block_rows=None,
                    block_tokens=None):
    """GEMM for many tokens: x [tokens, cols] -> [tokens, rows], 128-deep dots."""
    tokens, rows = x.shape[0], next(iter(fields.values())).shape[0]
    bm, bn = prefill_tiling(rows, tokens)
    bm, bn = block_tokens or bm, block_rows or bn
    names, arrays = _padded_fields(fields, bn)
    dtypes = tuple((k, jnp.dtype(a.dtype).name) for k, a in zip(names, arrays))
    group, merge = deep_plan(qtype, dtypes, cols // UNITS[qtype][0])
    perm = deep_permutation(qtype, dtypes, cols, group, merge)
    tokens_p = pl.cdiv(tokens, bm) * bm
    xp = jnp.pad(jnp.take(x, perm, axis=1), ((0, tokens_p - tokens), (0, 0)))
    prec = precision(x.dtype)

    def kernel(x_ref, *refs):
        *field_refs, o_ref = refs
        f = dict(zip(names, field_refs))
        acc = deep_accumulate(x_ref, f, qtype, cols, bm, bn, prec, group, merge)
        o_ref[...] = acc.astype(o_ref.dtype)

    rows_p = arrays[0].shape[0]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tokens_p, rows_p), x.dtype),
        grid=(tokens_p // bm, rows_p // bn),  # token tiles vary fastest: they share the weight
        in_specs=[pl.BlockSpec((bm, cols), lambda j, i: (j, 0))]
        + [pl.BlockSpec((bn, a.shape[1]), lambda j, i: (i, 0)) for a in arrays],
        out_specs=pl.BlockSpec((bm, bn), lambda j, i: (j, i)),
        interpret=interpret,
        compiler_params=None if interpret else triton_params(*_prefill_launch(bm, bn)),
        name="qmatmul_prefill",
    )(xp, *arrays)
    return out[:tokens, :rows]


# ---------------------------------------------------------------------------------------------
# grouped (Mixture of Experts) variant

_GROUP_TILE = 16  # token rows per tile: the smallest Triton dot, so decode pads least


def _group_block_rows(rows: int) -> int:
    """Largest power of two in 16..128 dividing rows that still leaves >= 128 row tiles."""
    for bn in (128, 64, 32):
        if rows % bn == 0 and rows // bn >= 128:
            return bn
    return 16


class _ExpertRef:
    """One expert's [rows, ...] view of an [E, rows, ...] ref for the `_units_*` functions:
    `view[:, i]` loads `ref[e, :, i]` through a single indexer (the Triton lowering takes one
    indexer per load, so `ref.at[e][...]` would not lower)."""

    def __init__(self, ref, e):
        self.ref, self.e = ref, e

    def __getitem__(self, idx):
        return self.ref[(self.e, *idx)]


def _group_layout(group_sizes, n_experts, tokens, bm):
    """Tile-aligned layout of rows sorted by expert: each expert's rows start a new bm-row tile.

    Returns (tiles: static tile count, tile_expert int32 [tiles] (-1: empty tile),
    src int32 [tiles * bm]: x row of each padded row (tokens: none), dest int32 [tokens]: padded
    row of each x row (tiles * bm: a padding row past sum(group_sizes)))."""
    # sum_e cdiv(g_e, bm) <= (tokens + k * (bm - 1)) / bm for k <= min(E, tokens) nonempty
    # experts, and <= tokens since every used tile holds a row.
    tiles = max(1, min(tokens, (tokens + min(n_experts, tokens) * (bm - 1)) // bm))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    ntiles = (sizes + bm - 1) // bm
    tile_ends = jnp.cumsum(ntiles)
    first_row = (tile_ends - ntiles) * bm  # padded row where each expert starts

    tile_expert = jnp.searchsorted(tile_ends, jnp.arange(tiles, dtype=jnp.int32), side="right")
    tile_expert = jnp.where(tile_expert < n_experts, tile_expert, -1).astype(jnp.int32)

    p = jnp.arange(tiles * bm, dtype=jnp.int32)
    e_p = tile_expert[p // bm]
    e_c = jnp.maximum(e_p, 0)
    local = p - first_row[e_c]
    src = jnp.where((e_p >= 0) & (local < sizes[e_c]), starts[e_c] + local, tokens)

    i = jnp.arange(tokens, dtype=jnp.int32)
    e_i = jnp.searchsorted(ends, i, side="right")
    e_c = jnp.minimum(e_i, n_experts - 1)
    dest = jnp.where(e_i < n_experts, first_row[e_c] + i - starts[e_c], tiles * bm)
    return tiles, tile_expert, src.astype(jnp.int32), dest.astype(jnp.int32)


def grouped_fused_qmatmul(x2, fields: dict, group_sizes, qtype: str, cols: int, *,
                          interpret: bool = False):
    """x2 [N, cols] rows sorted by expert; group_sizes int32 [E] (sum <= N; rows past the sum are
    padding, output 0 there); fields: quant.repack fields of E experts stacked on a leading axis,
    each [E, rows, ...]. -> float32 [N, rows]; row i of group e = x2[i] @ dequantize(expert e).T

    In XLA the rows are gathered into 16-row tiles, each expert's rows starting a new tile (at
    most cdiv(N, 16) + E tiles, fewer when E > N), with a tile -> expert array (-1 for the
    unused tail). Grid = (row tiles, token tiles): a program reads its tile's expert id, skips
    (writes zeros) for -1, else runs `fused_qmatmul`'s K loop on that expert's [block_rows, ...]
    weight slice, indexed dynamically in the [E, block_rows, ...] blocks, so only the experts that
    own rows are read. The output rows are gathered back to x2's order.
    """
    names = sorted(fields)
    arrays = [jnp.asarray(fields[k]) for k in names]
    n_experts, rows = arrays[0].shape[:2]
    tokens = x2.shape[0]
    bm = _GROUP_TILE
    bn = _group_block_rows(rows)
    rows_p = pl.cdiv(rows, bn) * bn
    if rows_p != rows:  # zero scales: padded rows come out 0 and are sliced away
        arrays = [jnp.pad(a, ((0, 0), (0, rows_p - rows), (0, 0))) for a in arrays]
    tiles, tile_expert, src, dest = _group_layout(jnp.asarray(group_sizes), n_experts, tokens, bm)
    xp = jnp.take(x2, src, axis=0, mode="fill", fill_value=0)  # [tiles * bm, cols]
    prec = precision(x2.dtype)

    def kernel(te_ref, x_ref, *refs):
        *field_refs, o_ref = refs
        e = te_ref[pl.program_id(1)]

        @pl.when(e < 0)
        def _():
            o_ref[...] = jnp.zeros((bm, bn), o_ref.dtype)

        @pl.when(e >= 0)
        def _():
            f = {k: _ExpertRef(r, e) for k, r in zip(names, field_refs)}
            o_ref[...] = accumulate(x_ref, f, qtype, cols, bm, bn, prec)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tiles * bm, rows_p), _F32),
        grid=(rows_p // bn, tiles),
        in_specs=[pl.BlockSpec((tiles,), lambda i, j: (0,)),
                  pl.BlockSpec((bm, cols), lambda i, j: (j, 0))]
        + [pl.BlockSpec((n_experts, bn, a.shape[2]), lambda i, j: (0, i, 0)) for a in arrays],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (j, i)),
        interpret=interpret,
        compiler_params=None if interpret else triton_params(),
        name="grouped_fused_qmatmul",
    )(tile_expert, xp, *arrays)
    return jnp.take(out[:, :rows], dest, axis=0, mode="fill", fill_value=0)
