"""GGUF block formats kept quantized on the device.

A loader hands over a `QuantTensor` (the GGUF bytes of an [out_features, in_features] matrix,
blocks running along the columns); `repack` splits each block into a dict of plain arrays, all
with `rows` as leading dim, so row gathers (embeddings) and row sharding work on the dict;
`qmatmul` multiplies by them without materializing the float weight on GPU (Pallas kernels in
`quant_pallas.py`: a split-K GEMV for decode, a GEMM for prefill, picked by token count) and
through `dequantize` + dot elsewhere.

Field layouts, each [rows, ...] (n = blocks per row; quant bytes keep GGUF's order: in q4_0..q5_1
byte j of a block holds values j (low nibble) and j + 16; in q4_k/q5_k byte j of 32-byte chunk c
holds values 64c + j and 64c + 32 + j):
  q4_0  d f16 [n], qs u8 [n*16]               q4_1  + m f16 [n]
  q5_0  d, qh u32 [n] (bit i = elem i), qs    q5_1  + m
  q8_0  d f16 [n], qs i8 [n*32]
  q2_k  d, dmin f16 [n], sc u8 [n*16] (low nibble scale, high nibble min), qs u8 [n*64]
  q3_k  d f16 [n], sc i8 [n*16] (unpacked, -32..31), hmask u8 [n*32], qs u8 [n*64]
  q4_k  d, dmin f16 [n], sc u8 [n*8], m u8 [n*8] (unpacked 6-bit), qs u8 [n*128]
  q5_k  as q4_k + qh u8 [n*32]
  q6_k  d f16 [n], sc i8 [n*16], ql u8 [n*128], qh u8 [n*64]
Scales stay float16 and are widened to float32 before use, in the order gguf-py multiplies, so
`dequantize` is bit-exact against `gguf.quants.dequantize`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.kernels import backend as kernel_backend

_T = gguf.GGMLQuantizationType
QK_K = 256

QTYPES: dict[str, tuple[int, int, gguf.GGMLQuantizationType]] = {
    "q4_0": (32, 18, _T.Q4_0),
    "q4_1": (32, 20, _T.Q4_1),
    "q5_0": (32, 22, _T.Q5_0),
    "q5_1": (32, 24, _T.Q5_1),
    "q8_0": (32, 34, _T.Q8_0),
    "q2_k": (QK_K, 84, _T.Q2_K),
    "q3_k": (QK_K, 110, _T.Q3_K),
    "q4_k": (QK_K, 144, _T.Q4_K),
    "q5_k": (QK_K, 176, _T.Q5_K),
    "q6_k": (QK_K, 210, _T.Q6_K),
}


@dataclass(frozen=True)
class QuantTensor:
    """GGUF bytes on the host: shape (rows, cols) = [out_features, in_features], or
    (experts, rows, cols); raw is uint8 [..., rows, cols // block_elems * block_bytes]."""
    qtype: str
    shape: tuple
    raw: np.ndarray


class PackedWeight(NamedTuple):
    """A quantized matrix on the device: `repack`'s fields ([rows, ...], or [experts, rows, ...])."""
    qtype: str
    cols: int
    fields: dict


def qtype_name(ggml_type: gguf.GGMLQuantizationType) -> str:
    for name, (_, _, t) in QTYPES.items():
        if t == ggml_type:
            return name
    raise ValueError(f"unsupported GGML type {ggml_type!r}")


def can_quantize(shape, qtype: str) -> bool:
    return shape[-1] % QTYPES[qtype][0] == 0


def nbytes(fields) -> int:
    return sum(int(v.nbytes) for v in fields.values())


# ---------------------------------------------------------------------------------------------
# repack: GGUF bytes -> dict of row-major fields


def _k_scales_unpack(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # b [..., 12]: 8 six-bit scales and 8 six-bit mins of q4_k / q5_k
    lo, hi, mix = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, m


def _k_scales_pack(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    hi = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    mix = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return np.concatenate([lo, hi, mix], axis=-1).astype(np.uint8)


def _q3_scales_unpack(b: np.ndarray) -> np.ndarray:
    # b [..., 12] -> int8 [..., 16]: value i has its low nibble in byte i % 8, top bits in 8 + i % 4
    low = np.concatenate([b[..., :8] & 15, b[..., :8] >> 4], axis=-1)
    high = np.concatenate([(b[..., 8:] >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


def _q3_scales_pack(l: np.ndarray) -> np.ndarray:
    # l [..., 16] in 0..63
    low = (l[..., :8] & 15) | ((l[..., 8:] & 15) << 4)
    h = (l >> 4).reshape(*l.shape[:-1], 4, 4)
    high = h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)
    return np.concatenate([low, high], axis=-1).astype(np.uint8)


# per type: (name, first byte, end byte, dtype) of each plain field inside a block
_SPANS = {
    "q4_0": [("d", 0, 2, np.float16), ("qs", 2, 18, np.uint8)],
    "q4_1": [("d", 0, 2, np.float16), ("m", 2, 4, np.float16), ("qs", 4, 20, np.uint8)],
    "q5_0": [("d", 0, 2, np.float16), ("qh", 2, 6, "<u4"), ("qs", 6, 22, np.uint8)],
    "q5_1": [("d", 0, 2, np.float16), ("m", 2, 4, np.float16), ("qh", 4, 8, "<u4"),
             ("qs", 8, 24, np.uint8)],
    "q8_0": [("d", 0, 2, np.float16), ("qs", 2, 34, np.int8)],
    "q2_k": [("sc", 0, 16, np.uint8), ("qs", 16, 80, np.uint8), ("d", 80, 82, np.float16),
             ("dmin", 82, 84, np.float16)],
    "q3_k": [("hmask", 0, 32, np.uint8), ("qs", 32, 96, np.uint8), ("d", 108, 110, np.float16)],
    "q4_k": [("d", 0, 2, np.float16), ("dmin", 2, 4, np.float16), ("qs", 16, 144, np.uint8)],
    "q5_k": [("d", 0, 2, np.float16), ("dmin", 2, 4, np.float16), ("qh", 16, 48, np.uint8),
             ("qs", 48, 176, np.uint8)],
    "q6_k": [("ql", 0, 128, np.uint8), ("qh", 128, 192, np.uint8), ("sc", 192, 208, np.int8),
             ("d", 208, 210, np.float16)],
}


def repack(qt: QuantTensor) -> dict[str, np.ndarray]:
    """GGUF bytes -> {field: [..., rows, ...]} (leading dims as in qt.shape)."""
    *lead, cols = qt.shape
    rows = int(np.prod(lead))
    elems, size, _ = QTYPES[qt.qtype]
    blocks = np.asarray(qt.raw, dtype=np.uint8).reshape(rows, cols // elems, size)
    fields = {
        name: np.ascontiguousarray(blocks[:, :, a:b]).view(dt).reshape(rows, -1)
        for name, a, b, dt in _SPANS[qt.qtype]
    }
    if qt.qtype == "q3_k":
        fields["sc"] = _q3_scales_unpack(blocks[:, :, 96:108]).reshape(rows, -1)
    elif qt.qtype in ("q4_k", "q5_k"):
        sc, m = _k_scales_unpack(blocks[:, :, 4:16])
        fields["sc"], fields["m"] = sc.reshape(rows, -1), m.reshape(rows, -1)
    return {k: v.reshape(*lead, -1) for k, v in fields.items()}


# ---------------------------------------------------------------------------------------------
# XLA dequantization (the reference beside the Pallas kernel)


def _f32(a):
    return a.astype(jnp.float32)


def _bits(b, n: int, width: int):
    """b [..., k] -> [..., n, k]: field g of every byte/word is (b >> width * g) & mask."""
    shifts = (jnp.arange(n, dtype=b.dtype) * width)[:, None]
    return (b[..., None, :] >> shifts) & ((1 << width) - 1)


def _nibbles(qs, r, nb, half):  # [r, nb, 2 * half]: low nibbles first, then high
    return _bits(qs.reshape(r, nb, half), 2, 4).reshape(r, nb, 2 * half)


def _qh32(qh):  # u32 [r, nb] -> [r, nb, 32] of 0/1
    return ((qh[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.int32)


def _dq_legacy(f, r, nb, qtype):
    if qtype == "q8_0":
        return _f32(f["qs"].reshape(r, nb, 32)) * _f32(f["d"])[..., None]
    q = _nibbles(f["qs"], r, nb, 16).astype(jnp.int32)
    if qtype in ("q5_0", "q5_1"):
        q = q | (_qh32(f["qh"]) << 4)
    d = _f32(f["d"])[..., None]
    if qtype in ("q4_0", "q5_0"):
        return d * _f32(q - (8 if qtype == "q4_0" else 16))
    return d * _f32(q) + _f32(f["m"])[..., None]


def _dq_q2_k(f, r, nb):
    sc = f["sc"].reshape(r, nb, 16)
    dl = _f32(f["d"])[..., None] * _f32(sc & 15)
    ml = _f32(f["dmin"])[..., None] * _f32(sc >> 4)
    q = _bits(f["qs"].reshape(r, nb, 2, 32), 4, 2).reshape(r, nb, 16, 16)
    return dl[..., None] * _f32(q) - ml[..., None]


def _dq_q3_k(f, r, nb):
    ql = _bits(f["qs"].reshape(r, nb, 2, 32), 4, 2).reshape(r, nb, 16, 16)
    hb = _bits(f["hmask"].reshape(r, nb, 32), 8, 1).reshape(r, nb, 16, 16)
    q = ql.astype(jnp.int32) - 4 + 4 * hb.astype(jnp.int32)
    dl = _f32(f["d"])[..., None] * _f32(f["sc"].reshape(r, nb, 16))
    return dl[..., None] * _f32(q)


def _dq_q45_k(f, r, nb, qtype):
    q = _bits(f["qs"].reshape(r, nb, 4, 32), 2, 4).reshape(r, nb, 8, 32)
    if qtype == "q5_k":
        q = q | (_bits(f["qh"].reshape(r, nb, 32), 8, 1) << 4)
    dl = _f32(f["d"])[..., None] * _f32(f["sc"].reshape(r, nb, 8))
    dm = _f32(f["dmin"])[..., None] * _f32(f["m"].reshape(r, nb, 8))
    return dl[..., None] * _f32(q) - dm[..., None]


def _dq_q6_k(f, r, nb):
    ql = _bits(f["ql"].reshape(r, nb, 2, 64), 2, 4).reshape(r, nb, QK_K)
    qh = _bits(f["qh"].reshape(r, nb, 2, 32), 4, 2).reshape(r, nb, QK_K)
    q = ((ql | (qh << 4)).astype(jnp.int32) - 32).reshape(r, nb, 16, 16)
    dl = _f32(f["d"])[..., None] * _f32(f["sc"].reshape(r, nb, 16))
    return dl[..., None] * _f32(q)


def dequantize(fields: dict, qtype: str, cols: int, dtype=jnp.float32) -> jax.Array:
    """Repacked fields -> dense [rows, cols] weight; rows from the fields' leading dim."""
    r = next(iter(fields.values())).shape[0]
    nb = cols // QTYPES[qtype][0]
    f = {k: jnp.asarray(v) for k, v in fields.items()}
    if qtype in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        w = _dq_legacy(f, r, nb, qtype)
    elif qtype in ("q4_k", "q5_k"):
        w = _dq_q45_k(f, r, nb, qtype)
    else:
        w = {"q2_k": _dq_q2_k, "q3_k": _dq_q3_k, "q6_k": _dq_q6_k}[qtype](f, r, nb)
    return w.reshape(r, cols).astype(dtype)


def qmatmul(x: jax.Array, fields: dict, qtype: str, cols: int, *, backend: str = "auto",
            activations: str = "f32"):
    """x [..., cols] @ W.T -> [..., rows] on a kernels.backend backend (XLA where the Pallas
    kernel does not compile); activations: the C++ kernel's (cpu.qmatmul)."""
    backend = kernel_backend.resolve(backend)
    x2 = x.reshape(-1, cols)  # [tokens, cols]
    if backend == "cpu":
        from vllm_jax.kernels import cpu

        y = cpu.qmatmul(x2, fields, qtype, activations)
    elif backend != "xla" and _pallas_runs(backend, x2, fields, qtype, cols):
        y = _fused_qmatmul(x2, fields, qtype, cols, interpret=backend == "pallas_interpret")
    else:
        w = dequantize(fields, qtype, cols, dtype=x.dtype)
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[:-1], -1)


def qmatmul_many(x: jax.Array, fields: list[dict], qtypes: list[str], cols: int, *,
                 backend: str = "auto", activations: str = "f32") -> list[jax.Array]:
    """[qmatmul(x, f, q, cols, ...) for f, q in zip(fields, qtypes)], bit-identical; on the cpu
    backend in one kernel call (cpu.qmatmul_many), elsewhere one by one."""
    if kernel_backend.resolve(backend) != "cpu":
        return [qmatmul(x, f, q, cols, backend=backend, activations=activations)
                for f, q in zip(fields, qtypes)]
    from vllm_jax.kernels import cpu

    ys = cpu.qmatmul_many(x.reshape(-1, cols), list(zip(fields, qtypes)), activations)
    return [y.astype(x.dtype).reshape(*x.shape[:-1], -1) for y in ys]


def _fused_qmatmul(*args, **kwargs):
    from vllm_jax.kernels.quant_pallas import fused_qmatmul  # Pallas only where it runs

    return fused_qmatmul(*args, **kwargs)


def _pallas_runs(backend, x2, fields, qtype, cols) -> bool:
    """Whether the Pallas kernel for x2's token count (decode or prefill) compiles: each falls
    back to XLA on its own."""
    from vllm_jax.kernels.quant_pallas import regime

    return kernel_backend.pallas_runs(
        backend, f"dequant-matmul {regime(x2.shape[0])}",
        lambda x2, f: _fused_qmatmul(x2, f, qtype, cols), (x2, fields), (qtype, cols))


# ---------------------------------------------------------------------------------------------
# host-side quantizers (numpy). Legacy types reproduce ggml's reference bytes exactly; k-quants
# follow llama.cpp's recipe: per-sub-block least-squares scale search, then the sub-block scales
# quantized against one float16 super-block scale.


def _roundf(v: np.ndarray) -> np.ndarray:  # C roundf: halves away from zero
    a = np.abs(v)
    fl = np.floor(a)
    return np.copysign(np.where(a - fl >= 0.5, fl + 1, fl), v)


def _safe_inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack(q: np.ndarray, width: int, dtype=np.uint8) -> np.ndarray:
    """q [..., n, k] -> [..., k]: field g of each output word is q[..., g, :] (inverse of _bits)."""
    out = np.zeros(q.shape[:-2] + q.shape[-1:], dtype)
    for g in range(q.shape[-2]):
        out |= q[..., g, :].astype(dtype) << dtype(width * g)
    return out


def _f16_bytes(d: np.ndarray) -> np.ndarray:  # [...] -> uint8 [..., 2]
    return d.astype(np.float16)[..., None].view(np.uint8)


def _quantize_legacy(x: np.ndarray, qtype: str) -> np.ndarray:
    """x [n, 32] float32 -> uint8 [n, block_bytes], the bytes of ggml's reference quantizer."""
    parts = []
    if qtype == "q8_0":
        d = np.abs(x).max(axis=-1) / np.float32(127)
        q = _roundf(x * _safe_inv(d)[:, None]).astype(np.int8).view(np.uint8)
        return np.concatenate([_f16_bytes(d), q], axis=-1)
    nmax = 16 if qtype.startswith("q4") else 32
    if qtype in ("q4_0", "q5_0"):
        peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]
        d = peak / np.float32(-nmax // 2)
        q = np.trunc(x * _safe_inv(d)[:, None] + np.float32(nmax // 2 + 0.5))
        parts.append(_f16_bytes(d))
    else:
        lo, hi = x.min(axis=-1), x.max(axis=-1)
        d = (hi - lo) / np.float32(nmax - 1)
        q = np.trunc((x - lo[:, None]) * _safe_inv(d)[:, None] + np.float32(0.5))
        parts += [_f16_bytes(d), _f16_bytes(lo)]
    q = np.minimum(q, nmax - 1).astype(np.uint8)
    if nmax == 32:
        parts.append(_pack((q >> 4)[:, :, None], 1, np.uint32).astype("<u4").view(np.uint8))
    parts.append(_pack((q & 15).reshape(-1, 2, 16), 4))
    return np.concatenate(parts, axis=-1)


def _dot(a, b):  # sum over the last axis of a * b (einsum: no temporary, 3x faster than sum)
    return np.einsum("...i,...i->...", a, b)


def _fit_asym(x, w, nmax, deltas):
    """Per sub-block (x [..., n]) x ~ s * L - m, L in 0..nmax, s >= 0, m >= 0; weights w."""
    lo = np.minimum(x.min(axis=-1), 0)
    span = x.max(axis=-1) - lo
    wx = w * x
    sw, sx, sxx = w.sum(-1), wx.sum(-1), _dot(wx, x)
    inv_span = _safe_inv(span)
    best = (np.full(lo.shape, np.inf, np.float32), span / nmax, lo)
    xs = x - lo[..., None]
    for delta in deltas:
        L = np.clip(np.rint(xs * ((nmax + delta) * inv_span)[..., None]), 0, nmax)
        sl, sll, sxl = _dot(w, L), _dot(w * L, L), _dot(wx, L)
        det = sw * sll - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (sw * sxl - sx * sl) / det
            m = (sll * sx - sl * sxl) / det
            s = np.where(m > 0, sxl / sll, s)
        m = np.minimum(m, 0)
        err = s * s * sll + 2 * s * m * sl - 2 * s * sxl + m * m * sw - 2 * m * sx + sxx
        take = (det > 0) & (err < best[0])
        best = tuple(np.where(take, new, old) for new, old in zip((err, s, m), best))
    return np.where(span > 0, np.maximum(best[1], 0), 0), -best[2]


def _fit_sym(x, w, nmax, deltas):
    """Per sub-block x ~ s * L, L in -nmax..nmax-1 (s signed: the extreme value maps to -nmax)."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    inv_peak = _safe_inv(peak)
    score, best = np.zeros(peak.shape, np.float32), np.zeros(peak.shape, np.float32)
    wx = w * x
    for delta in deltas:
        L = np.clip(np.rint(x * (-(nmax + delta) * inv_peak)[..., None]), -nmax, nmax - 1)
        sxl, sll = _dot(wx, L), _dot(w * L, L)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = sxl / sll
        take = (sll > 0) & (s * sxl > score)
        score, best = np.where(take, s * sxl, score), np.where(take, s, best)
    return best


def _requant(x, dl, dm, lo, hi):
    """Final integers with the stored (rounded) scales: round((x + dm) / dl), 0 where dl == 0."""
    return np.clip(np.rint((x + dm[..., None]) * _safe_inv(dl)[..., None]), lo, hi).astype(np.int16)


def _f16_scale(v):
    """float16 super-block scale rounded away from zero, so the largest sub-block scale still fits
    its integer range (matters where float16 turns subnormal: tiny weights stay nonzero)."""
    d = v.astype(np.float16)
    away = np.nextafter(d, np.copysign(np.inf, v).astype(np.float16))
    return np.where(np.abs(d) < np.abs(v), away, d)


def _int_scales(s, d, lo, hi):
    """Sub-block scales s [n, k] as integers of the stored float16 super-scale d [n]: dividing by
    the rounded d (not the exact one) absorbs its rounding, which matters in float16 subnormals."""
    return np.clip(np.rint(s * _safe_inv(d.astype(np.float32))[:, None]), lo, hi)


def _quantize_k(x: np.ndarray, qtype: str) -> np.ndarray:
    """x [n, 256] float32 -> uint8 [n, block_bytes]."""
    n = x.shape[0]
    if qtype in ("q4_k", "q5_k", "q2_k"):
        nmax, sub, sbits = {"q4_k": (15, 32, 6), "q5_k": (31, 32, 6), "q2_k": (3, 16, 4)}[qtype]
        xs = x.reshape(n, -1, sub)
        if qtype == "q2_k":
            w, deltas = np.abs(xs), np.arange(-0.5, 1.05, 0.2, dtype=np.float32)
        else:
            w = np.abs(xs) + np.sqrt((x * x).mean(-1))[:, None, None]
            deltas = np.arange(-1, 1.05, 0.2, dtype=np.float32)
        s, m = _fit_asym(xs, w, nmax, deltas)
        top = (1 << sbits) - 1
        d, dmin = _f16_scale(s.max(-1) / top), _f16_scale(m.max(-1) / top)
        ls = _int_scales(s, d, 0, top).astype(np.uint8)
        lm = _int_scales(m, dmin, 0, top).astype(np.uint8)
        dl = d.astype(np.float32)[:, None] * ls
        dm = dmin.astype(np.float32)[:, None] * lm
        L = _requant(xs, dl, dm, 0, nmax).astype(np.uint8).reshape(n, QK_K)
        if qtype == "q2_k":
            qs = _pack(L.reshape(n, 2, 4, 32), 2).reshape(n, 64)
            return np.concatenate([ls | (lm << 4), qs, _f16_bytes(d), _f16_bytes(dmin)], -1)
        qs = _pack((L & 15).reshape(n, 4, 2, 32), 4).reshape(n, 128)
        head = [_f16_bytes(d), _f16_bytes(dmin), _k_scales_pack(ls, lm)]
        if qtype == "q5_k":
            head.append(_pack((L >> 4).reshape(n, 8, 32), 1))
        return np.concatenate(head + [qs], axis=-1)
    nmax, top = {"q6_k": (32, 128), "q3_k": (4, 32)}[qtype]
    xs = x.reshape(n, 16, 16)
    s = _fit_sym(xs, xs * xs, nmax, np.arange(-0.9, 0.95, 0.2, dtype=np.float32))
    peak = np.take_along_axis(s, np.abs(s).argmax(axis=-1)[:, None], axis=-1)[:, 0]
    d = _f16_scale(peak / -top)
    ls = _int_scales(s, d, -top, top - 1).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * ls
    L = (_requant(xs, dl, np.zeros_like(dl), -nmax, nmax - 1) + nmax).astype(np.uint8)
    L = L.reshape(n, QK_K)
    if qtype == "q6_k":
        ql = _pack((L & 15).reshape(n, 2, 2, 64), 4).reshape(n, 128)
        qh = _pack((L >> 4).reshape(n, 2, 4, 32), 2).reshape(n, 64)
        return np.concatenate([ql, qh, ls.view(np.uint8), _f16_bytes(d)], axis=-1)
    hmask = _pack((L >> 2).reshape(n, 8, 32), 1)
    qs = _pack((L & 3).reshape(n, 2, 4, 32), 2).reshape(n, 64)
    sc = _q3_scales_pack((ls.astype(np.int16) + 32).astype(np.uint8))
    return np.concatenate([hmask, qs, sc, _f16_bytes(d)], axis=-1)


def quantize(w: np.ndarray, qtype: str) -> QuantTensor:
    """float32 [..., rows, cols] -> QuantTensor (host numpy; processed in chunks of blocks)."""
    *lead, cols = w.shape
    elems, size, _ = QTYPES[qtype]
    if not can_quantize(w.shape, qtype):
        raise ValueError(f"{qtype} needs cols % {elems} == 0, got shape {w.shape}")
    blocks = np.asarray(w, dtype=np.float32).reshape(-1, elems)
    fn = _quantize_k if qtype.endswith("_k") else _quantize_legacy
    step = 1 << 14 if elems == 32 else 1 << 10  # blocks per chunk: temporaries stay in cache
    raw = np.concatenate([fn(blocks[i:i + step], qtype) for i in range(0, len(blocks), step)])
    return QuantTensor(qtype, tuple(w.shape), raw.reshape(*lead, cols // elems * size))
