"""Fused dequant-matmul Pallas kernel over the fields of `quant.repack` (GPU, Triton lowering).

Grid = (row tiles, token tiles). Each program keeps its [block_rows, all bytes] slice of the
packed weight and its [block_tokens, cols] slice of x, walks K one GGUF block (32 values) or
super-block (256) per loop step, and dequantizes "units" of 16 or 32 values that share one scale:
a unit is [block_rows, size] integers times per-row scale columns (two columns split by lane
for 16-value sub-blocks), so the kernel needs no in-register reshapes or gathers, only loads,
shifts, masks, selects, broadcasts and dots (>= 16 wide, as Triton requires); `x @ unit.T`
accumulates in float32. `grouped_fused_qmatmul` runs the same K loop for Mixture-of-Experts
layers: token tiles of rows sorted by expert, each tile reading only its own expert's weights.
Only `quant.qmatmul` imports this module, and only for a Pallas backend, so CPU/Metal runs never
import Pallas.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32


def _col(ref, i):  # [bn, 1] float32: one scale per row
    return ref[:, pl.ds(i, 1)].astype(_F32)


def _load(ref, start, size):  # [bn, size] int32
    return ref[:, pl.ds(start, size)].astype(jnp.int32)


def _units_legacy(f, b, qtype):
    """Block b (32 values) -> [(offset, unit [bn, size] f32)]."""
    d = _col(f["d"], b)
    if qtype == "q8_0":
        return [(0, d * _load(f["qs"], b * 32, 32).astype(_F32))]
    qs = _load(f["qs"], b * 16, 16)
    q = [qs & 15, qs >> 4]
    if qtype in ("q5_0", "q5_1"):
        qh = f["qh"][:, pl.ds(b, 1)]  # [bn, 1] uint32
        shift = jax.lax.broadcasted_iota(jnp.uint32, (1, 16), 1)
        q = [q[h] | (((qh >> (shift + 16 * h)) & 1).astype(jnp.int32) << 4) for h in (0, 1)]
    if qtype in ("q4_0", "q5_0"):
        zero = 8 if qtype == "q4_0" else 16
        return [(16 * h, d * (q[h] - zero).astype(_F32)) for h in (0, 1)]
    m = _col(f["m"], b)
    return [(16 * h, d * q[h].astype(_F32) + m) for h in (0, 1)]


def _pair(ref, i):  # [bn, 32] int32: column i for lanes 0..15, column i + 1 for lanes 16..31
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, 32), 1)
    return jnp.where(lane < 16, _load(ref, i, 1), _load(ref, i + 1, 1))


def _units_q2_k(f, b):
    d, dmin = _col(f["d"], b), _col(f["dmin"], b)
    out = []
    for h in range(2):
        qs = _load(f["qs"], b * 64 + h * 32, 32)
        for s in range(4):
            sc = _pair(f["sc"], b * 16 + h * 8 + s * 2)
            dl, ml = d * (sc & 15).astype(_F32), dmin * (sc >> 4).astype(_F32)
            out.append((h * 128 + s * 32, dl * ((qs >> 2 * s) & 3).astype(_F32) - ml))
    return out


def _units_q3_k(f, b):
    d = _col(f["d"], b)
    hm = _load(f["hmask"], b * 32, 32)
    out = []
    for h in range(2):
        qs = _load(f["qs"], b * 64 + h * 32, 32)
        for s in range(4):
            q = ((qs >> 2 * s) & 3) - 4 + 4 * ((hm >> (h * 4 + s)) & 1)
            dl = d * _pair(f["sc"], b * 16 + h * 8 + s * 2).astype(_F32)
            out.append((h * 128 + s * 32, dl * q.astype(_F32)))
    return out


def _units_q45_k(f, b, qtype):
    d, dmin = _col(f["d"], b), _col(f["dmin"], b)
    qh = _load(f["qh"], b * 32, 32) if qtype == "q5_k" else None
    out = []
    for c in range(4):
        qs = _load(f["qs"], b * 128 + c * 32, 32)
        for h in range(2):
            sub = 2 * c + h
            q = (qs >> 4 * h) & 15
            if qh is not None:
                q = q | (((qh >> sub) & 1) << 4)
            dl = d * _col(f["sc"], b * 8 + sub)
            dm = dmin * _col(f["m"], b * 8 + sub)
            out.append((sub * 32, dl * q.astype(_F32) - dm))
    return out


def _units_q6_k(f, b):
    d = _col(f["d"], b)
    out = []
    for c in range(2):
        qh = _load(f["qh"], b * 64 + c * 32, 32)
        for s in range(4):  # 32-value group inside this 128-value half
            ql = _load(f["ql"], b * 128 + c * 64 + (s % 2) * 32, 32)
            q = (((ql >> 4 * (s // 2)) & 15) | (((qh >> 2 * s) & 3) << 4)) - 32
            dl = d * _pair(f["sc"], b * 16 + c * 8 + s * 2).astype(_F32)
            out.append((c * 128 + s * 32, dl * q.astype(_F32)))
    return out


_UNITS = {  # qtype -> (values per loop step, units function)
    **{t: (32, functools.partial(_units_legacy, qtype=t))
       for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")},
    "q2_k": (256, _units_q2_k),
    "q3_k": (256, _units_q3_k),
    "q4_k": (256, functools.partial(_units_q45_k, qtype="q4_k")),
    "q5_k": (256, functools.partial(_units_q45_k, qtype="q5_k")),
    "q6_k": (256, _units_q6_k),
}


def _pick_block_rows(rows: int) -> int:
    """Largest power of two in 16..128 dividing rows that still leaves >= 128 row tiles."""
    for bn in (128, 64, 32):
        if rows % bn == 0 and rows // bn >= 128:
            return bn
    return 16


def _triton_params():
    """Selects the Triton lowering (JAX >= 0.10 defaults pallas_call on GPU to Mosaic GPU)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams()


def _accumulate(x_ref, f, qtype, cols, bm, bn, precision):
    """sum over K of x_ref [bm, cols] @ dequantized units of f's [bn, ...] refs -> [bm, bn] f32."""
    step, units = _UNITS[qtype]

    def body(b, acc):
        for offset, w in units(f, b):
            xs = x_ref[:, pl.ds(b * step + offset, w.shape[1])]  # [bm, size]
            acc += jax.lax.dot_general(xs, w.astype(xs.dtype), (((1,), (1,)), ((), ())),
                                       precision=precision, preferred_element_type=_F32)
        return acc

    return jax.lax.fori_loop(0, cols // step, body, jnp.zeros((bm, bn), _F32))


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def fused_qmatmul(x, fields, qtype, cols, *, interpret=False, block_rows=None, block_tokens=None):
    """x [tokens, cols] @ dequantize(fields).T -> [tokens, rows] in x.dtype."""
    names = sorted(fields)
    arrays = [jnp.asarray(fields[k]) for k in names]
    rows, tokens = arrays[0].shape[0], x.shape[0]
    bn = block_rows or _pick_block_rows(rows)
    bm = block_tokens or min(64, max(16, pl.next_power_of_2(tokens)))
    rows_p, tokens_p = pl.cdiv(rows, bn) * bn, pl.cdiv(tokens, bm) * bm
    if rows_p != rows:  # zero scales: padded rows come out 0 and are sliced away
        arrays = [jnp.pad(a, ((0, rows_p - rows), (0, 0))) for a in arrays]
    x = jnp.pad(x, ((0, tokens_p - tokens), (0, 0)))
    precision = _precision(x.dtype)

    def kernel(x_ref, *refs):
        *field_refs, o_ref = refs
        f = dict(zip(names, field_refs))
        o_ref[...] = _accumulate(x_ref, f, qtype, cols, bm, bn, precision).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tokens_p, rows_p), x.dtype),
        grid=(rows_p // bn, tokens_p // bm),
        in_specs=[pl.BlockSpec((bm, cols), lambda i, j: (j, 0))]
        + [pl.BlockSpec((bn, a.shape[1]), lambda i, j: (i, 0)) for a in arrays],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (j, i)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
    )(x, *arrays)
    return out[:tokens, :rows]


# ---------------------------------------------------------------------------------------------
# grouped (Mixture of Experts) variant

_GROUP_TILE = 16  # token rows per tile: the smallest Triton dot, so decode pads least


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
    bn = _pick_block_rows(rows)
    rows_p = pl.cdiv(rows, bn) * bn
    if rows_p != rows:  # zero scales: padded rows come out 0 and are sliced away
        arrays = [jnp.pad(a, ((0, 0), (0, rows_p - rows), (0, 0))) for a in arrays]
    tiles, tile_expert, src, dest = _group_layout(jnp.asarray(group_sizes), n_experts, tokens, bm)
    xp = jnp.take(x2, src, axis=0, mode="fill", fill_value=0)  # [tiles * bm, cols]
    precision = _precision(x2.dtype)

    def kernel(te_ref, x_ref, *refs):
        *field_refs, o_ref = refs
        e = te_ref[pl.program_id(1)]

        @pl.when(e < 0)
        def _():
            o_ref[...] = jnp.zeros((bm, bn), o_ref.dtype)

        @pl.when(e >= 0)
        def _():
            f = {k: _ExpertRef(r, e) for k, r in zip(names, field_refs)}
            o_ref[...] = _accumulate(x_ref, f, qtype, cols, bm, bn, precision)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tiles * bm, rows_p), _F32),
        grid=(rows_p // bn, tiles),
        in_specs=[pl.BlockSpec((tiles,), lambda i, j: (0,)),
                  pl.BlockSpec((bm, cols), lambda i, j: (j, 0))]
        + [pl.BlockSpec((n_experts, bn, a.shape[2]), lambda i, j: (0, i, 0)) for a in arrays],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (j, i)),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(),
        name="grouped_fused_qmatmul",
    )(tile_expert, xp, *arrays)
    return jnp.take(out[:, :rows], dest, axis=0, mode="fill", fill_value=0)
