"""Stages 2 and 3: every Pallas kernel lowers (and, on a GPU, compiles) at small and realistic
shapes; each agrees with its XLA reference on small ragged batches, bf16 and f32.

Lowering takes shape structs only, so realistic shapes (a 256 x 32k-token cache) cost no memory.
Correctness inputs come from cases.py: unused cache slots are NaN, so an out-of-range or
unmasked read shows up as a NaN or a large error.
"""
from __future__ import annotations

import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bench import packed_shape
from preflight import cases, record
from preflight.cases import LLAMA_8B, PAGE_SIZE, QWEN3_06B, AttnShape
from vllm_jax.kernels import moe, quant
from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels.quant_pallas import fused_qmatmul, grouped_fused_qmatmul

SCALE = 0.125
_I32 = jnp.int32
SMALL_ATTN = AttnShape("gqa-small", 2, 4, 64)


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def field_structs(qtype: str, rows: int, cols: int, lead=()) -> dict:
    """Shape structs of `quant.repack`'s fields for a [*lead, rows, cols] matrix."""
    return packed_shape(qtype, (*lead, rows, cols)).fields


# -- stage 2: lowering --------------------------------------------------------------------------

def _decode_lowering(shape: AttnShape, seqs: int, context: int, dtype, interpret, window=None):
    max_pages = context // PAGE_SIZE
    fn = functools.partial(pa.decode_attention_pallas, scale=SCALE, sliding_window=window,
                           interpret=interpret)
    cache = _struct((shape.kv_heads, seqs * max_pages, PAGE_SIZE, shape.head_dim), dtype)
    args = (_struct((seqs, shape.heads, shape.head_dim), dtype), cache, cache,
            _struct((seqs, max_pages), _I32), _struct((seqs,), _I32))
    return f"decode {shape.name} {seqs}x{context}" + (f" window {window}" if window else ""), \
        fn, args


def _prefill_lowering(shape: AttnShape, tokens: int, seqs: int, context: int, dtype, interpret):
    max_pages = context // PAGE_SIZE
    fn = functools.partial(pa.prefill_attention_pallas, scale=SCALE, interpret=interpret)
    cache = _struct((shape.kv_heads, seqs * max_pages, PAGE_SIZE, shape.head_dim), dtype)
    args = (_struct((tokens, shape.heads, shape.head_dim), dtype), cache, cache,
            _struct((tokens,), _I32), _struct((tokens,), _I32), _struct((seqs, max_pages), _I32),
            _struct((seqs,), _I32))
    return f"prefill {shape.name} {tokens} tokens / {seqs} seqs, ctx {context}", fn, args


def _qmatmul_lowering(qtype, rows, cols, tokens, dtype, interpret):
    fn = functools.partial(fused_qmatmul, qtype=qtype, cols=cols, interpret=interpret)
    args = (_struct((tokens, cols), dtype), field_structs(qtype, rows, cols))
    return f"qmatmul {qtype} [{rows}x{cols}] x {tokens} tokens", fn, args


def _grouped_lowering(qtype, experts, rows, cols, tokens, dtype, interpret):
    fn = functools.partial(grouped_fused_qmatmul, qtype=qtype, cols=cols, interpret=interpret)
    args = (_struct((tokens, cols), dtype), field_structs(qtype, rows, cols, (experts,)),
            _struct((experts,), _I32))
    return f"grouped qmatmul {qtype} {experts}x[{rows}x{cols}] x {tokens} rows", fn, args


def lowering_cases(cpu: bool):
    """(name, fn, arg structs): small shapes always; the models' shapes on a GPU."""
    bf16, interp = jnp.bfloat16, cpu
    small = [
        _decode_lowering(SMALL_ATTN, 4, 128, bf16, interp),
        _prefill_lowering(SMALL_ATTN, 64, 3, 128, bf16, interp),
        *(_qmatmul_lowering(t, 48, 512, 5, bf16, interp) for t in cases.GGUF_TYPES),
        _grouped_lowering("q4_k", 4, 32, 256, 40, bf16, interp),
    ]
    if cpu:
        return small
    h, i = cases.QWQ_HIDDEN, cases.QWQ_INTERMEDIATE
    return small + [
        *(_decode_lowering(LLAMA_8B, s, c, bf16, False) for s in (16, 256) for c in (1024, 32768)),
        _decode_lowering(LLAMA_8B, 16, 32768, bf16, False, window=4096),
        _decode_lowering(LLAMA_8B, 16, 4096, jnp.float32, False),
        _prefill_lowering(QWEN3_06B, 512, 8, 32768, bf16, False),
        _prefill_lowering(LLAMA_8B, 512, 1, 32768, bf16, False),
        *(_qmatmul_lowering(t, h, h, n, bf16, False) for t in cases.GGUF_TYPES for n in (16, 512)),
        *(_qmatmul_lowering("q4_k", r, c, n, bf16, False)
          for r, c in cases.MATMUL_SHAPES[1:] for n in (1, 16, 512)),
        _grouped_lowering("q4_k", 128, 768, 2048, 128, bf16, False),
    ]


def _lower_and_compile(fn, args, compile_too: bool) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        out = dict(lower_s=round(time.perf_counter() - t, 3))
        if compile_too:
            t = time.perf_counter()
            lowered.compile()
            out["compile_s"] = round(time.perf_counter() - t, 3)
    notes = sorted({str(w.message).split(".")[0] for w in caught})
    return {**out, "warnings": notes} if notes else out


def lowering(ctx) -> list[dict]:
    """Lowers every case; compiles too on a GPU (where Triton can still fail: registers, shared
    memory). Interpreted kernels compile in stage 3 anyway."""
    rows = []
    for name, fn, args in lowering_cases(ctx.cpu):
        record(rows, lambda fn=fn, args=args: _lower_and_compile(fn, args, not ctx.cpu),
               case=name)
    return rows


# -- stage 3: correctness -----------------------------------------------------------------------

def _tol(dtype, interpret: bool) -> float:
    """Largest error accepted relative to max |reference|: bf16 rounding, or float32 dots that
    a GPU may run as TF32."""
    if dtype == jnp.bfloat16:
        return 3e-2
    return 1e-5 if interpret else 5e-3


def _compare(got, want, tol) -> dict:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max()) / scale if np.isfinite(got).all() else float("nan")
    return dict(rel_err=err, tol=tol, ok=bool(err <= tol),
                nan=int(np.isnan(got).sum()), ref_nan=int(np.isnan(want).sum()))


def _attention_check(batch, dtype, interpret, prefill: bool, window, **kernel_kw):
    q, k, v = (jnp.asarray(a, dtype) for a in (batch.q, batch.k, batch.v))
    tables, lens = jnp.asarray(batch.block_tables), jnp.asarray(batch.context_lens)
    kw = dict(scale=SCALE, sliding_window=window)
    if prefill:
        meta = (jnp.asarray(batch.seq_idx), jnp.asarray(batch.positions), tables, lens)
        ref_fn, fn = pa.prefill_attention, pa.prefill_attention_pallas
    else:
        meta = (tables, lens)
        ref_fn, fn = pa.decode_attention, pa.decode_attention_pallas
    with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(ref_fn, **kw))(q, k, v, *meta)
    got = jax.jit(functools.partial(fn, interpret=interpret, **kw, **kernel_kw))(q, k, v, *meta)
    return _compare(got, want, _tol(dtype, interpret))


def _qmatmul_check(qtype, dtype, interpret, tokens):
    rows, cols = 40, 512  # a padded row tile; 3 tokens: the decode kernel, 19: prefill
    fields = cases.quantized_matrix(1, qtype, rows, cols)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((tokens, cols)), dtype)
    with jax.default_matmul_precision("highest"):
        want = quant.qmatmul(x, fields, qtype, cols, backend="xla")
    got = jax.jit(functools.partial(fused_qmatmul, qtype=qtype, cols=cols,
                                    interpret=interpret))(x, fields)
    return _compare(got, want, _tol(dtype, interpret))


def _grouped_check(qtype, dtype, interpret, sizes=(5, 0, 21, 7)):
    experts, rows, cols, tokens = len(sizes), 32, 256, 40  # a padding tail past sum(sizes)
    per = [cases.quantized_matrix(10 + e, qtype, rows, cols) for e in range(experts)]
    fields = {k: np.stack([f[k] for f in per]) for k in per[0]}
    x = jnp.asarray(np.random.default_rng(3).standard_normal((tokens, cols)), dtype)
    groups = jnp.asarray(sizes, _I32)
    with jax.default_matmul_precision("highest"):
        want = moe.grouped_qmatmul(x, fields, groups, qtype, cols, backend="xla")
    got = jax.jit(functools.partial(grouped_fused_qmatmul, qtype=qtype, cols=cols,
                                    interpret=interpret))(x, fields, groups)
    return _compare(got, want, _tol(dtype, interpret))


CPU_QTYPES = ("q4_0", "q5_1", "q8_0", "q3_k", "q4_k", "q6_k")  # one of each bit layout
DECODE_CONTEXTS = [1, 15, 16, 53, 0, 80]  # 0: a padding row
PREFILL_CONTEXTS, PREFILL_NEW = [13, 29, 16, 21, 0], [13, 9, 1, 5, 0]  # whole, chunk, 1, chunk


def _attention_rows(rows, ctx, shape, dtype, window=None):
    name = np.dtype(dtype).name
    decode = cases.decode_batch(0, shape, DECODE_CONTEXTS)
    prefill = cases.prefill_batch(1, shape, PREFILL_CONTEXTS, PREFILL_NEW, pad_to=33)
    for kind, batch in (("decode", decode), ("prefill", prefill)):
        record(rows, lambda b=batch, k=kind: _attention_check(b, dtype, ctx.interpret,
                                                             k == "prefill", window),
               case=f"{kind} {shape.name} window {window}", dtype=name)


def correctness(ctx) -> list[dict]:
    rows = []
    dtypes = (jnp.float32, jnp.bfloat16)
    shapes = [cases.TINY] if ctx.cpu else [SMALL_ATTN, AttnShape("mha-128", 2, 1, 128)]
    for shape in shapes:
        for dtype in dtypes:
            _attention_rows(rows, ctx, shape, dtype)
    if not ctx.cpu:
        _attention_rows(rows, ctx, shapes[-1], jnp.bfloat16, window=11)
    batch = cases.decode_batch(0, shapes[0], DECODE_CONTEXTS)
    record(rows, lambda: _attention_check(batch, jnp.float32, ctx.interpret, False, None,
                                          block_k=16, num_splits=3),
           case=f"decode {shapes[0].name} 3 splits of 16-key steps", dtype="float32")
    for qtype in CPU_QTYPES if ctx.cpu else cases.GGUF_TYPES:
        for dtype in dtypes[:1] if ctx.cpu and qtype != "q4_k" else dtypes:
            for tokens in (19,) if ctx.cpu and qtype != "q4_k" else (3, 19):
                record(rows, lambda t=qtype, d=dtype, n=tokens: _qmatmul_check(
                    t, d, ctx.interpret, n), case=f"qmatmul {qtype} x {tokens} tokens",
                       dtype=np.dtype(dtype).name)
    for qtype in ("q4_k",) if ctx.cpu else ("q4_k", "q6_k", "q8_0"):
        record(rows, lambda t=qtype: _grouped_check(t, jnp.float32, ctx.interpret),
               case=f"grouped qmatmul {qtype}", dtype="float32")
    return rows
