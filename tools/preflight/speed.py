"""Stage 4: kernel speed at the shapes that decide decode throughput, as GB/s of the bytes each
call must read, and as a fraction of the device's measured read bandwidth.

Decode attention (Llama-3.1-8B heads, bf16 cache) at 16 and 256 sequences x 1k-32k context,
Pallas against the XLA reference; the Q4_K dequant-matmul at QwQ-32B's and Llama-3.1-8B's
shapes for 1 and 16 tokens (the split-K decode kernel) and 512 (the prefill kernel), Pallas
against XLA's dequantize-then-dot and a dense bf16 matmul. Every timing is
the median of several calls after warm-up runs, each ended by block_until_ready. With --cpu the
shapes are tiny and the kernels interpreted: the rows say so ("meaningful": false).
"""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from bench import measure_bandwidth, packed_shape, random_packed
from preflight import cases, record
from preflight.cases import LLAMA_8B, PAGE_SIZE, TINY
from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels import quant
from vllm_jax.kernels.quant_pallas import fused_qmatmul, regime

SCALE = 0.125


def time_call(fn, *args, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of fn(*args) after warm-up calls (the first compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rate(nbytes: int, seconds: float, bandwidth: float) -> dict:
    gbs = nbytes / seconds / 1e9
    return dict(ms=round(1e3 * seconds, 4), gb_s=round(gbs, 1),
                of_read_bw=round(gbs / (bandwidth / 1e9), 3))


class _Cache:
    """One bf16 K and V cache for every case; block tables take pages in a shuffled order, as a
    long-running engine leaves them. The cache stays under 2^31 elements, the size of a real
    layer's cache (256 x 32k tokens of Llama-3.1-8B would be 16 GiB per layer, and offsets past
    2^31 may not be what the kernels were written for). Past that, sequences share pages, as
    with a common prefix: at 256 x 32k each page serves 4 sequences 64 apart, too far apart in
    time for the L2 cache to serve the repeats."""

    def __init__(self, shape, seqs: int, context: int):
        per_page = shape.kv_heads * PAGE_SIZE * shape.head_dim
        self.pages = min(seqs * context // PAGE_SIZE, (2**31 - 1) // per_page)
        dims = (shape.kv_heads, self.pages, PAGE_SIZE, shape.head_dim)
        self.k = jnp.full(dims, 0.01, jnp.bfloat16)
        self.v = jnp.full(dims, 0.02, jnp.bfloat16)
        self.order = jax.random.permutation(jax.random.key(0), self.pages).astype(jnp.int32)

    def tables(self, seqs: int, context: int):
        per_seq = context // PAGE_SIZE
        return self.order[jnp.arange(seqs * per_seq) % self.pages].reshape(seqs, per_seq)


def _decode_rows(rows, ctx, bandwidth):
    shape = TINY if ctx.cpu else LLAMA_8B
    seqs_list, contexts = ((2,), (256,)) if ctx.cpu else ((16, 256), (1024, 4096, 32768))
    cache = _Cache(shape, max(seqs_list), max(contexts))
    impls = {"pallas": functools.partial(pa.decode_attention_pallas, interpret=ctx.interpret),
             "xla": pa.decode_attention}
    for seqs in seqs_list:
        for context in contexts:
            tables = cache.tables(seqs, context)
            lens = jnp.full((seqs,), context, jnp.int32)
            q = jnp.ones((seqs, shape.heads, shape.head_dim), jnp.bfloat16)
            nbytes = 2 * seqs * context * shape.kv_heads * shape.head_dim * 2  # K and V, bf16
            for impl, fn in impls.items():
                run = jax.jit(functools.partial(fn, scale=SCALE))
                record(rows, lambda run=run, t=tables, lens=lens, q=q, n=nbytes: _rate(
                    n, time_call(run, q, cache.k, cache.v, t, lens), bandwidth),
                       case=f"decode attention {shape.name} {seqs}x{context}", impl=impl,
                       mib_read=round(nbytes / 2**20, 1))


def _matmul_rows(rows, ctx, bandwidth):
    qtype = "q4_k"
    shapes = [(256, 512)] if ctx.cpu else cases.MATMUL_SHAPES
    token_counts = (1, 20) if ctx.cpu else (1, 16, 512)
    for r, c in shapes:
        fields = random_packed(jax.random.key(r), packed_shape(qtype, (r, c))).fields
        dense = jax.random.normal(jax.random.key(c), (r, c), jnp.bfloat16) * 0.02
        impls = {  # the kernel itself, not quant.qmatmul: that may fall back to XLA
            "pallas": (jax.jit(functools.partial(fused_qmatmul, qtype=qtype, cols=c,
                                                 interpret=ctx.interpret)), fields,
                       quant.nbytes(fields)),
            "xla dequant": (jax.jit(functools.partial(quant.qmatmul, qtype=qtype, cols=c,
                                                      backend="xla")), fields,
                            quant.nbytes(fields)),
            "dense bf16": (jax.jit(lambda x, w: x @ w.T), dense, dense.nbytes),
        }
        for tokens in token_counts:
            x = jax.random.normal(jax.random.key(tokens), (tokens, c), jnp.bfloat16)
            for impl, (fn, w, nbytes) in impls.items():
                def measure(fn=fn, w=w, nbytes=nbytes, x=x):
                    seconds = time_call(fn, x, w)
                    return {**_rate(nbytes, seconds, bandwidth),
                            "tflop_s": round(2 * tokens * r * c / seconds / 1e12, 2)}
                record(rows, measure, case=f"{qtype} matmul [{r}x{c}] x {tokens} tokens",
                       impl=f"pallas {regime(tokens)}" if impl == "pallas" else impl,
                       mib_read=round(nbytes / 2**20, 1))


def speed(ctx) -> list[dict]:
    rows = []
    nbytes = 64 * 2**20 if ctx.cpu else 2**31
    bandwidth = measure_bandwidth(nbytes)
    rows.append(dict(case=f"device read ({nbytes // 2**20} MiB jitted sum)", ok=True,
                     gb_s=round(bandwidth / 1e9, 1)))
    _decode_rows(rows, ctx, bandwidth)
    _matmul_rows(rows, ctx, bandwidth)
    if ctx.cpu:
        for row in rows:
            row["meaningful"] = False
    return rows
