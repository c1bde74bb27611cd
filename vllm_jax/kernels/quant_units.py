"""Dequantization of one K step of `quant.repack`'s fields inside a Pallas kernel (GPU, Triton
lowering), shared by the dense and the grouped dequant-matmuls in quant_pallas.py.

A loop step covers one GGUF block (32 values) or super-block (256). `UNITS[qtype]` turns step b
of a program's [block_rows, ...] field refs into "units" of 16 or 32 values that share one scale:
a unit is [block_rows, size] integers times per-row scale columns (two columns split by lane for
16-value sub-blocks), so no in-register reshapes or gathers are needed, only loads, shifts, masks,
selects, broadcasts and dots (>= 16 wide, as Triton requires). Each unit comes with its column
offset inside the step, so a kernel can dot it against the matching x columns, or merge units
into deeper tiles and permute x to match (`unit_layout` says where each unit's columns are).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


UNITS = {  # qtype -> (values per loop step, units function)
    **{t: (32, functools.partial(_units_legacy, qtype=t))
       for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")},
    "q2_k": (256, _units_q2_k),
    "q3_k": (256, _units_q3_k),
    "q4_k": (256, functools.partial(_units_q45_k, qtype="q4_k")),
    "q5_k": (256, functools.partial(_units_q45_k, qtype="q5_k")),
    "q6_k": (256, _units_q6_k),
}


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """Selects the Triton lowering (JAX >= 0.10 defaults pallas_call on GPU to Mosaic GPU)."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot_t(xs, w, prec):  # xs [bm, k] @ w [bn, k].T -> [bm, bn] f32
    return jax.lax.dot_general(xs, w.astype(xs.dtype), (((1,), (1,)), ((), ())),
                               precision=prec, preferred_element_type=_F32)


def accumulate(x_ref, f, qtype, cols, bm, bn, prec):
    """sum over K of x_ref [bm, cols] @ dequantized units of f's [bn, ...] refs -> [bm, bn] f32:
    one dot per unit, 16 or 32 deep."""
    step, units = UNITS[qtype]

    def body(b, acc):
        for offset, w in units(f, b):
            acc += _dot_t(x_ref[:, pl.ds(b * step + offset, w.shape[1])], w, prec)
        return acc

    return jax.lax.fori_loop(0, cols // step, body, jnp.zeros((bm, bn), _F32))


# -- deep tiles: units merged into [bn, depth] tiles, x permuted to match --------------------------


def _interleave(a, b):  # [r, w] twice -> [r, 2w]: lane 2j + h is (a, b)[h][:, j]
    return jnp.stack([a, b], axis=-1).reshape(a.shape[0], 2 * a.shape[1])


def _merge(tiles):
    """Equal-width tiles (a power of two of them) -> one tile, by a tree of interleaves: what
    Triton can do in registers (join + reshape); concatenation it cannot."""
    if len(tiles) == 1:
        return tiles[0]
    half = len(tiles) // 2
    return _interleave(_merge(tiles[:half]), _merge(tiles[half:]))


class _ShapeRef:
    """Stands for a field ref where only the shapes of loads matter (`unit_layout`)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __getitem__(self, idx):
        return jnp.zeros((1, idx[1].size), self.dtype)


@functools.cache
def unit_layout(qtype: str, dtypes: tuple) -> tuple[tuple[int, int], ...]:
    """(column offset, width) of each unit of one loop step; dtypes: ((field, dtype name), ...)."""
    with jax.ensure_compile_time_eval():
        units = UNITS[qtype][1]({k: _ShapeRef(jnp.dtype(d)) for k, d in dtypes}, 0)
        return tuple((off, w.shape[1]) for off, w in units)


def deep_plan(qtype: str, dtypes: tuple, n_blocks: int, depth: int = 128):
    """(blocks per loop step, tiles merged per dot) for dots `depth` deep where the row allows:
    a step takes as many blocks as fit in `depth` values and divide the row's n_blocks."""
    step = UNITS[qtype][0]
    group = max(1, depth // step)
    while n_blocks % group:
        group //= 2
    width = unit_layout(qtype, dtypes)[0][1]
    per_step = group * len(unit_layout(qtype, dtypes))
    return group, min(per_step, max(1, depth // width))


@functools.cache
def _step_permutation(qtype: str, dtypes: tuple, group: int, merge: int) -> np.ndarray:
    step = UNITS[qtype][0]
    tiles = [np.arange(off, off + w)[None] + i * step
             for i in range(group) for off, w in unit_layout(qtype, dtypes)]
    with jax.ensure_compile_time_eval():  # the same merge as the kernel's, on column numbers
        return np.concatenate([np.asarray(_merge(tiles[t:t + merge]))[0]
                               for t in range(0, len(tiles), merge)])


def deep_permutation(qtype: str, dtypes: tuple, cols: int, group: int, merge: int):
    """int32 [cols]: column c of permuted x is column perm[c] of x, so that x_perm's
    [g * group * step + t * depth, + depth) columns meet deep tile t of loop step g."""
    one_step = _step_permutation(qtype, dtypes, group, merge)
    span = group * UNITS[qtype][0]
    return (np.arange(0, cols, span)[:, None] + one_step[None]).reshape(-1).astype(np.int32)


def deep_accumulate(x_ref, f, qtype, cols, bm, bn, prec, group, merge):
    """As `accumulate`, over x permuted by `deep_permutation`: each loop step dequantizes `group`
    blocks, merges `merge` units at a time into [bn, depth] tiles (cast to x's dtype first) and
    runs one dot per tile."""
    step, units = UNITS[qtype]
    span = group * step

    def body(g, acc):
        tiles = [w.astype(x_ref.dtype) for i in range(group) for _, w in units(f, g * group + i)]
        for t in range(0, len(tiles), merge):
            deep = _merge(tiles[t:t + merge])
            acc += _dot_t(x_ref[:, pl.ds(g * span + t // merge * deep.shape[1], deep.shape[1])],
                          deep, prec)
        return acc

    return jax.lax.fori_loop(0, cols // span, body, jnp.zeros((bm, bn), _F32))
