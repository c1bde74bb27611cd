"""GGUF block formats: bit-exact dequant vs gguf-py, byte-exact legacy quantizers, k-quant error
bounds, and the grouped (MoE) Pallas kernel in interpret mode against gguf-py (the dense ones:
test_qmatmul_kernels.py)."""
from __future__ import annotations


import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax.kernels.quant import (QTYPES, QuantTensor, can_quantize, dequantize, nbytes,
                                    qmatmul, qtype_name, quantize, repack)

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
ALL = LEGACY + KQUANTS
QK = 256

# byte offsets of the float16 fields inside one GGUF block (ggml-common.h)
F16_OFFSETS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0],
               "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}

# RMS(dequant(quant(w)) - w) / RMS(w) on N(0, 1) data, measured 0.287 / 0.153 / 0.072 / 0.036 /
# 0.0177 with these quantizers (llama.cpp's reference quantizers land within a few percent of
# the same); bounds leave ~8% headroom. For scale: q4_1 gives 0.078, q5_1 0.038, q8_0 0.0054.
K_ERROR_BOUNDS = {"q2_k": 0.31, "q3_k": 0.165, "q4_k": 0.078, "q5_k": 0.039, "q6_k": 0.0192}


def random_raw(qtype, rows, n_blocks, seed=0):
    """Random GGUF blocks whose float16 scales are finite (zero, subnormal, tiny and large too)."""
    rng = np.random.default_rng(seed)
    elems, size, _ = QTYPES[qtype]
    raw = rng.integers(0, 256, (rows, n_blocks, size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        mag = rng.choice([0.0, 1e-7, 1e-4, 0.01, 1.0, 3000.0], (rows, n_blocks))
        d = (rng.standard_normal((rows, n_blocks)) * mag).astype(np.float16)
        raw[:, :, off:off + 2] = d[..., None].view(np.uint8)
    return QuantTensor(qtype, (rows, n_blocks * elems), raw.reshape(rows, -1))


def gguf_dequant(qt: QuantTensor) -> np.ndarray:
    return gguf.quants.dequantize(qt.raw, QTYPES[qt.qtype][2]).reshape(qt.shape)


def jit_dequant(fields, qtype, cols):
    return np.asarray(jax.jit(dequantize, static_argnums=(1, 2))(fields, qtype, cols))


def assert_bits_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    bad = a.view(np.uint32) != b.view(np.uint32)
    assert not bad.any(), f"{bad.sum()} values differ, e.g. {a[bad][:4]} vs {b[bad][:4]}"


def test_qtype_tables_match_gguf():
    for name, (elems, size, ggml_type) in QTYPES.items():
        assert gguf.GGML_QUANT_SIZES[ggml_type] == (elems, size)
        assert qtype_name(ggml_type) == name
    with pytest.raises(ValueError):
        qtype_name(gguf.GGMLQuantizationType.IQ2_XXS)
    assert can_quantize((3, 64), "q4_0") and not can_quantize((3, 48), "q4_0")
    assert not can_quantize((3, 288), "q4_k")
    with pytest.raises(ValueError):
        quantize(np.zeros((2, 48), np.float32), "q4_0")


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_is_bit_exact_vs_gguf(qtype):
    qt = random_raw(qtype, rows=13, n_blocks=5 if qtype in LEGACY else 3)
    fields = repack(qt)
    assert_bits_equal(jit_dequant(fields, qtype, qt.shape[1]), gguf_dequant(qt))


@pytest.mark.parametrize("qtype", ALL)
def test_repack_fields_lead_with_rows_and_row_gather_commutes(qtype):
    qt = random_raw(qtype, rows=11, n_blocks=2, seed=1)
    fields = repack(qt)
    assert all(v.shape[0] == 11 and v.ndim == 2 for v in fields.values())
    assert nbytes(fields) <= qt.raw.nbytes * 1.04  # unpacked k-quant scales cost <= 4 bytes/block
    idx = np.array([5, 0, 10, 5])
    gathered = jit_dequant({k: v[idx] for k, v in fields.items()}, qtype, qt.shape[1])
    assert_bits_equal(gathered, jit_dequant(fields, qtype, qt.shape[1])[idx])


def legacy_test_matrix():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    w[1] = 0.0  # zero blocks: d = 0
    w[2] = 0.75  # constant blocks: max == min
    w[3, :64] = np.tile([-1.0, 1.0], 32)  # |max| ties between signs: the first one wins
    w[4] = np.round(rng.uniform(-127, 127, 256) * 2) / 2  # exact .5 products: roundf ties
    w[4, ::32] = 127.0
    w[5] *= 1e-30  # scales below float16 range
    w[6] = np.abs(w[6])
    w[7] = -np.abs(w[7]) - 2
    w[8] = rng.integers(-8, 8, 256)  # exactly representable grid for q4_0 ties at x * id + 8.5
    return w


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_quantize_is_byte_exact_vs_gguf(qtype):
    w = legacy_test_matrix()
    qt = quantize(w, qtype)
    expected = gguf.quants.quantize(w, QTYPES[qtype][2])
    assert qt.shape == w.shape and qt.raw.dtype == np.uint8
    np.testing.assert_array_equal(qt.raw, expected)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_k_quant_round_trip_error_is_bounded(qtype):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 1024)).astype(np.float32)
    qt = quantize(w, qtype)
    assert qt.raw.shape == (96, 4 * QTYPES[qtype][1])
    back = gguf_dequant(qt)
    rel = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
    assert rel < K_ERROR_BOUNDS[qtype], rel
    assert_bits_equal(jit_dequant(repack(qt), qtype, 1024), back)


@pytest.mark.parametrize("qtype", KQUANTS)
def test_k_quant_handles_degenerate_rows(qtype):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 512)).astype(np.float32)
    w[0] = 0.0
    w[1] = -1.5  # constant
    w[2] *= 1e-4  # tiny: super-block scales are float16 subnormals
    w[3, 256:] = 0.0
    w[3, 7] = 40.0  # one outlier per super-block
    w[4] = np.abs(w[4]) * 1e3
    back = gguf_dequant(quantize(w, qtype))
    assert np.isfinite(back).all()
    assert not back[0].any() and not back[3, 256:].any()
    for row in (2, 4):
        rel = np.sqrt(np.mean((back[row] - w[row]) ** 2) / np.mean(w[row] ** 2))
        assert rel < 1.5 * K_ERROR_BOUNDS[qtype], (row, rel)
    np.testing.assert_allclose(back[1], -1.5, rtol=0.02)


@pytest.mark.parametrize("qtype", ALL)
def test_qmatmul_xla_matches_numpy_reference(qtype):
    elems = QTYPES[qtype][0]
    cols = 2 * elems if elems == QK else 4 * elems
    rng = np.random.default_rng(6)
    qt = quantize(rng.standard_normal((21, cols)).astype(np.float32), qtype)
    x = rng.standard_normal((2, 3, cols)).astype(np.float32)
    y = jax.jit(qmatmul, static_argnums=(2, 3), static_argnames="backend")(
        jnp.asarray(x), repack(qt), qtype, cols, backend="xla")
    ref = x.astype(np.float64) @ gguf_dequant(qt).T.astype(np.float64)
    assert y.shape == (2, 3, 21) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def stacked_experts(qtype, n_experts, rows, cols, seed):
    """E random experts -> (stacked fields [E, rows, ...], gguf-py weights [E, rows, cols] f64)."""
    qts = [random_raw(qtype, rows, cols // QTYPES[qtype][0], seed=seed + e)
           for e in range(n_experts)]
    per = [repack(qt) for qt in qts]
    fields = {k: np.stack([f[k] for f in per]) for k in per[0]}
    return fields, np.stack([gguf_dequant(qt).astype(np.float64) for qt in qts])


@pytest.mark.parametrize("qtype", ALL)
def test_grouped_pallas_interpret_matches_numpy_reference(qtype):
    from vllm_jax.kernels.quant_pallas import grouped_fused_qmatmul

    cols = 2 * QTYPES[qtype][0] if qtype in KQUANTS else 96
    fields, w = stacked_experts(qtype, 4, 32, cols, seed=10)  # two 16-row tiles per expert
    x = np.random.default_rng(11).standard_normal((40, cols)).astype(np.float32)
    run = jax.jit(grouped_fused_qmatmul, static_argnums=(3, 4), static_argnames="interpret")
    # empty experts, a padding tail (7 rows), a 2-tile expert, one expert owning every row
    for sizes in ([5, 0, 21, 7], [0, 40, 0, 0], [17, 16, 1, 6], [0, 0, 0, 0]):
        got = np.asarray(run(jnp.asarray(x), fields, jnp.asarray(sizes, jnp.int32), qtype, cols,
                             interpret=True))
        ref = np.zeros((40, 32))
        ends = np.cumsum(sizes)
        for e, (lo, hi) in enumerate(zip(ends - sizes, ends)):
            ref[lo:hi] = x[lo:hi].astype(np.float64) @ w[e].T
        assert got.shape == (40, 32) and got.dtype == np.float32
        assert not got[ends[-1]:].any()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=str(sizes))


def test_grouped_layout_gives_decode_tiles_only_to_chosen_experts():
    from vllm_jax.kernels.quant_pallas import _group_layout

    layout = jax.jit(_group_layout, static_argnums=(1, 2, 3))
    rng = np.random.default_rng(12)
    chosen = np.stack([rng.choice(128, 8, replace=False) for _ in range(16)])  # 16 tokens, top-8
    sizes = np.bincount(chosen.ravel(), minlength=128)
    tiles, tile_expert, src, dest = map(np.asarray, layout(jnp.asarray(sizes), 128, 128, 16))
    used = tile_expert[tile_expert >= 0]
    assert tiles == 128 and sorted(used) == sorted(set(chosen.ravel()))  # one tile per expert
    assert (np.diff(used) > 0).all() and (tile_expert[len(used):] == -1).all()
    np.testing.assert_array_equal(src[dest], np.arange(128))  # every row makes the round trip
    for n_experts, tokens in ((3, 50), (64, 40), (8, 1)):  # the static tile count always suffices
        for seed in range(20):
            cuts = np.sort(np.random.default_rng(seed).integers(0, tokens + 1, n_experts))
            sizes = np.diff(cuts, prepend=0)  # sum <= tokens: the rest is padding
            tiles, tile_expert, src, dest = map(
                np.asarray, layout(jnp.asarray(sizes), n_experts, tokens, 16))
            assert (tile_expert >= 0).sum() == (-(-sizes // 16)).sum() <= tiles
            real = np.arange(tokens) < sizes.sum()
            np.testing.assert_array_equal(src[dest[real]], np.arange(tokens)[real])
            assert (dest[~real] == tiles * 16).all()


def test_auto_backend_on_cpu_is_xla():
    fields = repack(quantize(np.ones((16, 32), np.float32), "q8_0"))
    y = qmatmul(jnp.ones((1, 32)), fields, "q8_0", 32)
    np.testing.assert_allclose(np.asarray(y), 32.0, rtol=1e-3)  # d = 1/127 rounded to float16
    with pytest.raises(ValueError):
        qmatmul(jnp.ones((1, 32)), fields, "q8_0", 32, backend="cuda")


@pytest.mark.parametrize("name, wanted, types", [
    ("smollm2-135m", {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight",
                      "blk.29.attn_k.weight"}, {"q8_0", "q4_1"}),
    ("gemma3-270m", {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_v.weight",
                     "blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.5.ffn_down.weight"},
     {"q8_0", "q5_0", "q4_k", "q6_k"}),
])
def test_real_model_tensors_dequantize_bit_exact(real_model, name, wanted, types):
    reader = gguf.GGUFReader(real_model(name))
    seen = set()
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        seen.add(qtype_name(t.tensor_type))
        raw = np.asarray(t.data)[:1024]  # first rows only: token_embd has 49152 or 262144
        cols = int(t.shape[0])
        qt = QuantTensor(qtype_name(t.tensor_type), (raw.shape[0], cols), raw)
        assert_bits_equal(jit_dequant(repack(qt), qt.qtype, cols), gguf_dequant(qt))
    assert seen == types
