"""The C++ CPU kernels (kernels/cpu_*.cc, XLA FFI calls): the quantized matmul (plain and grouped
by expert) and dequantizer against gguf-py's dequantization, the 16-bit-weight matmul against a
float64 product, and paged decode attention against the XLA reference and a float64 softmax,
with NaN in every cache slot outside a sequence's context."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_paged_attention import SCALE, decode_case, dense_attention
from vllm_jax.kernels import cpu
from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels.backend import resolve
from vllm_jax.kernels.quant import QTYPES, qmatmul, quantize, repack

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for the CPU kernels")
ALL = list(QTYPES)
ROOT = Path(__file__).resolve().parents[1]


def _case(qtype, rows, seed):
    elems = QTYPES[qtype][0]
    cols = 2 * elems if elems == 256 else 6 * elems
    rng = np.random.default_rng(seed)
    qt = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    want = gguf.quants.dequantize(qt.raw, QTYPES[qtype][2]).reshape(rows, cols)
    return {k: jnp.asarray(v) for k, v in repack(qt).items()}, want, cols


@pytest.mark.parametrize("qtype", ALL)
def test_weights_are_bit_exact_with_gguf_py(qtype):
    fields, want, cols = _case(qtype, 37, 1)  # 37 rows: ragged for the 4- and 6-row groups
    # x = I: each product is one weight times 1 plus exact zeros, so the kernel's weights come
    # out bit for bit (cols tokens: the sliced many-token path; one row: the few-token paths)
    eye = np.eye(cols, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(cpu.qmatmul(jnp.asarray(eye), fields, qtype)).T,
                                  want)
    for i in (0, cols // 2 + 3):
        one = np.asarray(cpu.qmatmul(jnp.asarray(eye[i:i + 1]), fields, qtype))
        np.testing.assert_array_equal(one[0], want[:, i])


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 16, 19])
def test_qmatmul_matches_float64_reference(qtype, tokens):
    fields, w, cols = _case(qtype, 37, 2)
    x = np.random.default_rng(3).standard_normal((tokens, cols)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, f: cpu.qmatmul(x, f, qtype))(jnp.asarray(x), fields))
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert got.shape == (tokens, 37)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", ALL)
def test_qmatmul_odd_block_counts_and_several_panels(qtype):
    # 70 rows: several row panels (16 / 12 / 6 rows) and a ragged last one; an odd number of
    # blocks (7 of 32 weights, 3 of 256): the few-token path takes legacy blocks two at a time,
    # the many-token tiles decode each next block while multiplying the last. Token counts:
    # each few-token case, one vector of tokens, a padded one, pairs of vectors plus a rest.
    elems = QTYPES[qtype][0]
    rows, cols = 70, (3 if elems == 256 else 7) * elems
    rng = np.random.default_rng(13)
    qt = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    w = gguf.quants.dequantize(qt.raw, QTYPES[qtype][2]).reshape(rows, cols)
    fields = {k: jnp.asarray(v) for k, v in repack(qt).items()}
    fn = jax.jit(lambda x, f: cpu.qmatmul(x, f, qtype))
    for tokens in (1, 2, 3, 4, 16, 17, 33, 48):
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        got = np.asarray(fn(jnp.asarray(x), fields))
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    eye = np.eye(cols, dtype=np.float32)  # weights bit for bit: tiles (48 tokens), fused (1)
    k = cols // 2 - 24
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(eye[k:k + 48]), fields)).T,
                                  w[:, k:k + 48])
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(eye[k + 1:k + 2]), fields))[0],
                                  w[:, k + 1])


@pytest.mark.parametrize("activations", cpu.ACTIVATIONS)
@pytest.mark.parametrize("qtype", ALL)
def test_qmatmul_many_equals_the_calls_one_by_one(qtype, activations):
    # one call for a layer's q, k, v: weights of other types (Q6_K, as Q4_K_M stores v; Q5_K,
    # which int8 activations leave to the float32 path) and row counts that end mid-panel
    rng = np.random.default_rng(17)
    cols = 512
    weights = []
    for q, rows in ((qtype, 37), ("q6_k", 16), ("q5_k", 9), (qtype, 70)):
        qt = quantize(rng.standard_normal((rows, cols)).astype(np.float32), q)
        weights.append(({k: jnp.asarray(v) for k, v in repack(qt).items()}, q))
    qtypes = [q for _, q in weights]
    many = jax.jit(lambda x, fs: cpu.qmatmul_many(x, list(zip(fs, qtypes)), activations))
    one = jax.jit(lambda x, f, q: cpu.qmatmul(x, f, q, activations), static_argnums=2)
    for tokens in (1, 3, 17):
        x = jnp.asarray(rng.standard_normal((tokens, cols)).astype(np.float32))
        got = many(x, [f for f, _ in weights])
        assert len(got) == len(weights)
        for y, (f, q) in zip(got, weights):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(one(x, f, q)))


@pytest.mark.parametrize("kernel", ["f32", "int8", "dense"])
def test_zero_rows_at_the_end_are_skipped(kernel):
    """A step's padding tokens reach the matmuls as zero rows (-0.0 too) after its real ones:
    they come out 0 without being multiplied (a NaN weight shows it: 0 * NaN would be NaN), and
    the rows before them come out as they would alone."""
    rng = np.random.default_rng(23)
    rows, cols = 37, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if kernel == "dense":
        w[5, 7] = np.nan
        weight = jnp.asarray(w)
        call = jax.jit(lambda x, f: cpu.dense_matmul(x, f))
    else:
        fields = dict(repack(quantize(w, "q8_0")))
        d = np.array(fields["d"]).view(np.uint16)
        d[5, 0] = 0x7E00  # a NaN scale
        fields["d"] = d.view(fields["d"].dtype)
        weight = {k: jnp.asarray(v) for k, v in fields.items()}
        call = jax.jit(lambda x, f: cpu.qmatmul(x, f, "q8_0", kernel))
    x = rng.standard_normal((3, cols)).astype(np.float32)
    pad = np.zeros((13, cols), np.float32)
    pad[4] = -0.0
    got = np.asarray(call(jnp.asarray(np.concatenate([x, pad])), weight))
    np.testing.assert_array_equal(got[:3], np.asarray(call(jnp.asarray(x), weight)))
    assert np.isnan(got[:3, 5]).all() and (got[3:] == 0).all()


def test_qmatmul_backend_on_a_prefill_sized_batch():
    fields, w, cols = _case("q4_1", 24, 4)
    x = np.random.default_rng(5).standard_normal((2, 70, cols)).astype(np.float32)  # 3 slices
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    for backend in ("cpu", "auto"):
        got = np.asarray(qmatmul(jnp.asarray(x), fields, "q4_1", cols, backend=backend))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _experts(qtype, experts, rows, seed):
    """E experts' repacked fields stacked on axis 0, and their gguf-py float64 weights."""
    elems = QTYPES[qtype][0]
    cols = 2 * elems
    rng = np.random.default_rng(seed)
    qts = [quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
           for _ in range(experts)]
    ws = [gguf.quants.dequantize(qt.raw, QTYPES[qtype][2]).reshape(rows, cols) for qt in qts]
    packed = [repack(qt) for qt in qts]
    fields = {k: np.stack([f[k] for f in packed]) for k in packed[0]}
    return fields, np.stack(ws).astype(np.float64), cols


def _grouped_reference(x, ws, sizes):
    ref, start = np.zeros((len(x), ws.shape[1])), 0
    for e, n in enumerate(sizes):
        ref[start:start + n] = x[start:start + n].astype(np.float64) @ ws[e].T
        start += n
    return ref  # rows past the groups: 0


GROUPS = {  # tokens -> group sizes of 5 experts: empty experts, one expert, a padding tail
    1: [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
    3: [[1, 0, 1, 0, 1], [0, 3, 0, 0, 0], [0, 0, 2, 0, 0]],
    17: [[4, 0, 7, 0, 6], [0, 0, 0, 0, 17], [2, 1, 1, 9, 0], [5, 0, 0, 0, 5]],
}


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("tokens", sorted(GROUPS))
def test_grouped_qmatmul_matches_float64_reference(qtype, tokens):
    fields, ws, cols = _experts(qtype, 5, 24, 6)
    x = np.random.default_rng(7).standard_normal((tokens, cols)).astype(np.float32)
    fn = jax.jit(lambda x, f, sizes: cpu.grouped_qmatmul(x, f, qtype, sizes))
    for sizes in GROUPS[tokens]:
        got = np.asarray(fn(jnp.asarray(x), {k: jnp.asarray(v) for k, v in fields.items()},
                            jnp.asarray(sizes, jnp.int32)))
        ref = _grouped_reference(x, ws, sizes)
        assert got.shape == (tokens, 24)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert np.all(got[sum(sizes):] == 0)


def test_grouped_qmatmul_group_sizes_from_bincount_and_many_tokens():
    # group sizes computed inside jit (as a MoE layer does); 150 rows in one expert: 3 slices
    fields, ws, cols = _experts("q4_k", 4, 30, 8)
    x = np.random.default_rng(9).standard_normal((200, cols)).astype(np.float32)
    expert = np.sort(np.random.default_rng(10).choice([0, 2, 2, 2, 3], 190))
    fn = jax.jit(lambda x, f, e: cpu.grouped_qmatmul(x, f, "q4_k", jnp.bincount(e, length=4)))
    got = np.asarray(fn(jnp.asarray(x), {k: jnp.asarray(v) for k, v in fields.items()},
                        jnp.asarray(expert, jnp.int32)))
    ref = _grouped_reference(x, ws, np.bincount(expert, minlength=4))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.all(got[190:] == 0)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_grouped_qmatmul_does_not_read_experts_without_rows(qtype):
    fields, ws, cols = _experts(qtype, 5, 24, 11)
    x = np.random.default_rng(12).standard_normal((9, cols)).astype(np.float32)
    sizes = jnp.asarray([3, 0, 6, 0, 0], jnp.int32)
    clean = np.asarray(cpu.grouped_qmatmul(jnp.asarray(x), fields, qtype, sizes))
    poisoned = {k: v.copy() for k, v in fields.items()}
    for e in (1, 3, 4):  # every scale of the unused experts: float16 NaN (0x7e00)
        poisoned["d"][e] = np.uint16(0x7E00).view(np.float16)
    got = np.asarray(cpu.grouped_qmatmul(jnp.asarray(x), poisoned, qtype, sizes))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got, clean)
    np.testing.assert_allclose(got, _grouped_reference(x, ws, [3, 0, 6, 0, 0]), rtol=1e-5,
                               atol=1e-5 * np.abs(got).max())


DENSE = [jnp.bfloat16, jnp.float16, jnp.float32]


@pytest.mark.parametrize("wdtype", DENSE, ids=lambda d: d.__name__)
@pytest.mark.parametrize("xdtype", DENSE, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cols", [70, 71])
def test_dense_matmul_matches_float64_reference(wdtype, xdtype, cols):
    # 53 rows: ragged for the 24-row panels and 12-row tiles (6 and 6 on AVX2); 70 and 71
    # columns: a partial last vector (8 or 16 floats, 32 bfloat16 pairs), 71 half a pair. Token
    # counts: each few-token case's ends (1-8), one vector of tokens, 2 vectors plus 1, 64, a
    # 128-token slice plus a few (130) and plus several vectors (200)
    rng = np.random.default_rng(21)
    w = jnp.asarray(rng.standard_normal((53, cols)), wdtype)
    fn = jax.jit(cpu.dense_matmul)
    for tokens in (1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 130, 200):
        x = jnp.asarray(rng.standard_normal((tokens, cols)), xdtype)
        got = np.asarray(fn(x, w))
        ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        assert got.dtype == np.float32 and got.shape == (tokens, 53)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("wdtype", DENSE, ids=lambda d: d.__name__)
@pytest.mark.parametrize("xdtype", DENSE, ids=lambda d: d.__name__)
def test_dense_matmul_reads_weights_exactly_and_only_its_own_row(wdtype, xdtype):
    # x = I: each output is one weight times 1 plus exact zeros, so the weights come out bit for
    # bit (40 tokens: the tiles, 1: the few-token path)
    rows, cols = 29, 45
    w = np.asarray(np.random.default_rng(22).standard_normal((rows, cols)), np.float32)
    want = np.asarray(jnp.asarray(w, wdtype), np.float32)
    eye = jnp.asarray(np.eye(cols), xdtype)
    fn = jax.jit(cpu.dense_matmul)
    np.testing.assert_array_equal(np.asarray(fn(eye[3:43], jnp.asarray(w, wdtype))).T,
                                  want[:, 3:43])
    for k in (0, cols - 1):
        np.testing.assert_array_equal(np.asarray(fn(eye[k:k + 1], jnp.asarray(w, wdtype)))[0],
                                      want[:, k])
    # every odd row starts with Inf: a row's partial last chunk read past its end (into the next
    # row) would meet it against the zero padding and make a NaN in the row before
    w[1::2, 0] = np.inf
    x = jnp.asarray(np.random.default_rng(23).uniform(0.5, 1.5, (20, cols)), xdtype)
    for x2 in (x, x[:2]):  # tiles and the few-token path
        got = np.asarray(fn(x2, jnp.asarray(w, wdtype)))
        assert np.all(np.isfinite(got[:, 0::2])) and np.all(got[:, 1::2] == np.inf)


@pytest.mark.parametrize("xdtype", DENSE, ids=lambda d: d.__name__)
def test_dense_matmul_many_equals_the_calls_one_by_one(xdtype):
    # weights of one dtype share a call, others get their own; row counts that end mid-panel
    rng = np.random.default_rng(24)
    cols = 72
    ws = [jnp.asarray(rng.standard_normal((rows, cols)), dt) for rows, dt in
          ((29, jnp.bfloat16), (16, jnp.bfloat16), (9, jnp.float32), (70, jnp.bfloat16),
           (5, jnp.float16))]
    many, one = jax.jit(cpu.dense_matmul_many), jax.jit(cpu.dense_matmul)
    for tokens in (1, 3, 17):
        x = jnp.asarray(rng.standard_normal((tokens, cols)), xdtype)
        got = many(x, ws)
        assert len(got) == len(ws)
        for y, w in zip(got, ws):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(one(x, w)))


def test_dense_matmul_arguments():
    w = jnp.ones((4, 6), jnp.bfloat16)
    with pytest.raises(ValueError, match="weight dtype"):
        cpu.dense_matmul(jnp.ones((2, 6)), w.astype(jnp.int8))
    with pytest.raises(ValueError, match="expected"):
        cpu.dense_matmul(jnp.ones((2, 5)), w)
    np.testing.assert_array_equal(np.asarray(cpu.dense_matmul(jnp.ones((2, 6), jnp.int32), w)),
                                  np.full((2, 4), 6.0))  # other dtypes: cast to float32


@pytest.mark.parametrize("kvh,g,hd,lens,window", [
    (3, 3, 64, [1, 17, 40, 0, 33], None),  # SmolLM2's heads; a padding row (length 0)
    (2, 4, 128, [5, 64, 9], 6),  # sliding window
    (1, 1, 32, [16, 15], None),
    (2, 3, 96, [200, 7, 50], 100),  # head_dim 96: the kernel's generic (non-templated) path
    (1, 4, 256, [40, 3, 90], 32),  # Gemma 3: head_dim 256, one KV head, a sliding window
])
def test_decode_attention_matches_reference(kvh, g, hd, lens, window):
    q, k, v, tables, context_lens = decode_case(11, kvh, g, hd, 16, lens)
    args = [jnp.asarray(a) for a in (q, k, v, tables, context_lens)]
    got = np.asarray(pa.decode(*args, scale=SCALE, sliding_window=window, backend="cpu"))
    ref = pa.decode(*args, scale=SCALE, sliding_window=window, backend="xla")
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-5)
    dense = dense_attention(q, k, v, tables, context_lens, np.arange(len(lens)),
                            context_lens - 1, window)
    live = context_lens > 0
    np.testing.assert_allclose(got[live], dense[live], rtol=1e-5, atol=1e-5)
    assert np.all(got[~live] == 0)


@pytest.mark.parametrize("backend", ["cpu", "xla", "pallas_interpret"])
def test_decode_reads_nothing_before_the_window(backend):
    """Block table entries before every row's window point far outside the cache and those
    pages hold NaN: the C++ kernel, which follows the table with raw pointers, would fault if it
    read them; XLA and Pallas clamp indices, so for them this pins the masking."""
    q, k, v, tables, lens = decode_case(13, 1, 4, 64, 16, [90, 70])
    window = 32
    ref = pa.decode(*(jnp.asarray(a) for a in (q, k, v, tables, lens)), scale=SCALE,
                    sliding_window=window, backend="xla")
    k, v = (np.where(np.isfinite(a), a, 0) for a in (k, v))
    poisoned = tables.copy()
    for row, n in enumerate(lens):
        first = (n - window) // 16  # the page holding the row's first key in the window
        poisoned[row, :first] = 2**30
        k[:, tables[row, :first]] = np.nan  # those pages' real contents: NaN
        v[:, tables[row, :first]] = np.nan
    args = [jnp.asarray(a) for a in (q, k, v, poisoned, lens)]
    got = np.asarray(pa.decode(*args, scale=SCALE, sliding_window=window, backend=backend))
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_caches_are_read_as_float32(dtype):
    assert resolve("auto") == "cpu"
    q, k, v, tables, lens = decode_case(12, 2, 2, 64, 16, [9, 30, 0])
    half = [jnp.asarray(a, dtype) for a in (k, v)]
    args = (jnp.asarray(q), *half, jnp.asarray(tables), jnp.asarray(lens))
    out = np.asarray(pa.decode(*args, scale=SCALE))  # auto: the kernel
    ref = np.asarray(pa.decode_attention(*args, scale=SCALE))  # XLA, promoted to float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    dense = dense_attention(q, *(np.asarray(a, np.float32) for a in half), tables, lens,
                            np.arange(3), lens - 1, None)
    np.testing.assert_allclose(out[:2], dense[:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache dtype"):
        pa.decode(args[0], *(a.astype(jnp.int8) for a in half), *args[3:], scale=SCALE,
                  backend="cpu")

LONG = [9000, 1024, 0, 4097, 1025, 2000]  # 1-9 spans of 1024 keys; 0: a padding row


def _long_decode(dtype, window):
    """The long-context decode case -> (inputs, the decode kernel's output)."""
    q, k, v, tables, lens = decode_case(21, 3, 3, 64, 16, LONG)
    k, v = (jnp.asarray(a, dtype) for a in (k, v))  # NaN outside the contexts stays NaN
    out = cpu.decode_attention(jnp.asarray(q), k, v, jnp.asarray(tables), jnp.asarray(lens),
                               scale=SCALE, sliding_window=window)
    return (q, k, v, tables, lens), np.asarray(out)


@pytest.mark.parametrize("dtype,window", [(jnp.float32, None), (jnp.float16, None),
                                          (jnp.bfloat16, 1500)])
def test_long_contexts_split_into_spans(dtype, window):
    """Contexts of 1-9k keys: several 1024-key spans, each span's partial softmax merged by its
    log-sum-exp. The decode call (few rows: (row, KV head, span) items shared by the threads)
    against the float64 softmax and XLA's unsplit float32 reference; the same rows in a ragged
    call beside a 600-token prompt chunk (many rows: a thread takes 16 rows span by span) give
    the same bits, as does each row decoded alone (the threads' shares of its spans change)."""
    (q, k, v, tables, lens), got = _long_decode(dtype, window)
    static = dict(scale=SCALE, sliding_window=window)
    k32, v32 = (np.asarray(a, np.float32) for a in (k, v))
    dense = dense_attention(q, k32, v32, tables, lens, np.arange(len(lens)), lens - 1, window)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
    xla = pa.decode_attention(*map(jnp.asarray, (q, k32, v32, tables, lens)), **static)
    np.testing.assert_allclose(got, np.asarray(xla), rtol=1e-5, atol=1e-5)
    assert np.all(got[lens == 0] == 0)

    chunk = np.arange(1400, 2000, dtype=np.int32)  # the last row's prompt, its final 600 tokens
    seq_idx = np.concatenate([np.arange(len(lens), dtype=np.int32), np.full(600, 5, np.int32)])
    positions = np.concatenate([lens - 1, chunk])
    qr = np.concatenate([q, np.random.default_rng(22).standard_normal((600, 9, 64))]).astype(
        np.float32)
    ragged = np.asarray(cpu.ragged_attention(
        jnp.asarray(qr), k, v, *map(jnp.asarray, (seq_idx, positions, tables, lens)), **static))
    np.testing.assert_array_equal(ragged[:len(lens)], got)
    dense = dense_attention(qr[-600:], k32, v32, tables, lens, seq_idx[-600:], chunk, window)
    np.testing.assert_allclose(ragged[-600:], dense, rtol=1e-5, atol=1e-5)
    pick = np.array([0, 1, 299, 599])  # chunk tokens as decode rows: the same bits
    rows = cpu.decode_attention(*map(jnp.asarray, (qr[-600:][pick], k, v, tables[[5] * 4],
                                                   chunk[pick] + 1)), **static)
    np.testing.assert_array_equal(np.asarray(rows), ragged[-600:][pick])
    for r in (0, 3):
        alone = cpu.decode_attention(*map(jnp.asarray, (q[r:r + 1], k, v, tables[r:r + 1],
                                                        lens[r:r + 1])), **static)
        np.testing.assert_array_equal(np.asarray(alone)[0], got[r])


def test_long_contexts_do_not_depend_on_the_thread_count(tmp_path):
    """The same long-context decode with one kernel thread (a fresh process) gives the same bits
    as with every core: each span's partial and the merge order are fixed by the context."""
    _, got = _long_decode(jnp.float16, None)
    script = ("import sys, numpy as np, jax.numpy as jnp; sys.path.insert(0, 'tests'); "
              "from test_cpu_kernels import _long_decode; "
              f"np.save({str(tmp_path / 'one.npy')!r}, _long_decode(jnp.float16, None)[1])")
    env = dict(os.environ, VLLM_JAX_CPU_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), got)
