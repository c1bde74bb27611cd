"""Fused dequant-matmul Pallas kernel over the fields of `quant.repack` (GPU, Triton lowering).

Grid = (row tiles, token tiles). Each program keeps its [block_rows, all bytes] slice of the
packed weight and its [block_tokens, cols] slice of x, walks K one GGUF block (32 values) or
super-block (256) per loop step, and dequantizes "units" of 16 or 32 values that share one scale:
a unit is [block_rows, size] integers times per-row scale columns (two columns split by lane
for 16-value sub-blocks), so the kernel needs no in-register reshapes or gathers, only loads,
shifts, masks, selects, broadcasts and dots (>= 16 wide, as Triton requires); `x @ unit.T`
accumulates in float32. Only `quant.qmatmul` imports this module, and only for a Pallas backend,
so CPU/Metal runs never import Pallas.
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


def fused_qmatmul(x, fields, qtype, cols, *, interpret=False, block_rows=None, block_tokens=None):
    """x [tokens, cols] @ dequantize(fields).T -> [tokens, rows] in x.dtype."""
    step, units = _UNITS[qtype]
    names = sorted(fields)
    arrays = [jnp.asarray(fields[k]) for k in names]
    rows, tokens = arrays[0].shape[0], x.shape[0]
    bn = block_rows or _pick_block_rows(rows)
    bm = block_tokens or min(64, max(16, pl.next_power_of_2(tokens)))
    rows_p, tokens_p = pl.cdiv(rows, bn) * bn, pl.cdiv(tokens, bm) * bm
    if rows_p != rows:  # zero scales: padded rows come out 0 and are sliced away
        arrays = [jnp.pad(a, ((0, rows_p - rows), (0, 0))) for a in arrays]
    x = jnp.pad(x, ((0, tokens_p - tokens), (0, 0)))
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None

    def kernel(x_ref, *refs):
        *field_refs, o_ref = refs
        f = dict(zip(names, field_refs))

        def body(b, acc):
            for offset, w in units(f, b):
                xs = x_ref[:, pl.ds(b * step + offset, w.shape[1])]  # [bm, size]
                acc += jax.lax.dot_general(xs, w.astype(xs.dtype), (((1,), (1,)), ((), ())),
                                           precision=precision, preferred_element_type=_F32)
            return acc

        acc = jax.lax.fori_loop(0, cols // step, body, jnp.zeros((bm, bn), _F32))
        o_ref[...] = acc.astype(o_ref.dtype)

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
