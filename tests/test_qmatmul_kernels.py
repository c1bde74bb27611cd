"""The dense dequant-matmul Pallas kernels (interpret mode) against the XLA dequantize-then-dot
reference: the split-K decode kernel (<= 16 tokens) and the prefill kernel (128-token tiles,
units merged into deep dots over a permuted x), every GGUF type, ragged token counts, row
counts that pad, more than one tile and split; and the decode grid sizes at real model shapes."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax.kernels import quant_pallas as qp
from vllm_jax.kernels.quant import QTYPES, qmatmul, quantize, repack

ALL = list(QTYPES)
ROWS = 37  # pads to whole row tiles: padded rows must come out zero and be cut


def packed(qtype, rows, cols, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return repack(quantize(w, qtype))


def reference(x, fields, qtype, cols):
    with jax.default_matmul_precision("highest"):
        return np.asarray(qmatmul(x, fields, qtype, cols, backend="xla"), np.float32)


def assert_close(got, want, tol):
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def tokens_of(n, cols, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, cols)), dtype)


@pytest.mark.parametrize("qtype", ALL)
def test_decode_kernel_matches_xla_over_row_tiles_and_k_splits(qtype):
    cols = 2 * QTYPES[qtype][0] if qtype.endswith("_k") else 96  # 2 super-blocks / 3 blocks
    splits = 2 if qtype.endswith("_k") else 3
    fields = packed(qtype, ROWS, cols)
    run = jax.jit(functools.partial(qp.decode_qmatmul, qtype=qtype, cols=cols, interpret=True,
                                    block_rows=16, splits=splits))
    for tokens in (1, 3, 16):
        x = tokens_of(tokens, cols)
        assert_close(run(x, fields), reference(x, fields, qtype, cols), 1e-5)


@pytest.mark.parametrize("qtype", ALL)
def test_prefill_kernel_matches_xla_on_ragged_token_tiles(qtype):
    cols = 2 * QTYPES[qtype][0] if qtype.endswith("_k") else 128  # legacy: 4 blocks, 128 deep
    fields = packed(qtype, ROWS, cols)
    x = tokens_of(130, cols)  # two 128-token tiles, the second holding 2 tokens
    got = jax.jit(functools.partial(qp.prefill_qmatmul, qtype=qtype, cols=cols,
                                    interpret=True))(x, fields)
    assert_close(got, reference(x, fields, qtype, cols), 1e-5)


@pytest.mark.parametrize("qtype, cols", [("q4_0", 96), ("q8_0", 192), ("q5_1", 64)])
def test_prefill_kernel_takes_shallower_steps_where_blocks_do_not_divide(qtype, cols):
    fields = packed(qtype, 24, cols, seed=2)  # 3, 6, 2 blocks: steps of 1, 2, 2 blocks
    x = tokens_of(17, cols)
    got = qp.prefill_qmatmul(x, fields, qtype, cols, interpret=True)
    assert_close(got, reference(x, fields, qtype, cols), 1e-5)


def test_both_kernels_in_bfloat16_over_several_tiles():
    fields = packed("q4_k", 64, 512, seed=3)
    for tokens in (5, 70):  # decode: 2 row tiles x 2 splits; prefill: 2 row x 3 token tiles
        x = tokens_of(tokens, 512, jnp.bfloat16)
        if tokens <= qp.DECODE_MAX_TOKENS:
            got = qp.decode_qmatmul(x, fields, "q4_k", 512, interpret=True, splits=2)
        else:
            got = qp.prefill_qmatmul(x, fields, "q4_k", 512, interpret=True, block_rows=32,
                                     block_tokens=32)
        assert got.dtype == jnp.bfloat16
        assert_close(got, reference(x.astype(jnp.float32), fields, "q4_k", 512), 2e-2)


def test_qmatmul_takes_the_kernel_of_its_token_count():
    fields = packed("q8_0", ROWS, 64)
    for tokens, kernel in ((16, "qmatmul_decode_split_k"), (17, "qmatmul_prefill")):
        jaxpr = jax.make_jaxpr(functools.partial(qmatmul, qtype="q8_0", cols=64,
                                                 backend="pallas_interpret"))(
            tokens_of(tokens, 64), fields)
        assert kernel in str(jaxpr) and qp.regime(tokens) in kernel


# (rows, cols) of every projection of Llama-3.1-8B and QwQ-32B: q/o, k/v, gate/up, down
MODEL_MATRICES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336),
                  (5120, 5120), (1024, 5120), (27648, 5120), (5120, 27648)]


def test_prefill_grid_fills_every_sm():
    for rows, _ in MODEL_MATRICES:
        for tokens in (17, 130, 512):
            bm, bn = qp.prefill_tiling(rows, tokens)
            assert bm >= min(tokens, 128) and bn >= 16
            most = -(-rows // 16) * -(-tokens // bm)  # 16-row tiles: the narrowest dot
            assert -(-rows // bn) * -(-tokens // bm) >= min(qp.SMS, most), (rows, tokens)


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0", "q4_0"])
def test_decode_grid_fills_every_sm_with_bounded_partial_sums(qtype):
    step, block_bytes = QTYPES[qtype][:2]
    for rows, cols in MODEL_MATRICES:
        n_blocks = cols // step
        row_bytes = n_blocks * (block_bytes + (4 if qtype in ("q4_k", "q5_k") else 0))
        for tokens in (1, 16):
            bn, splits = qp.decode_tiling(rows, tokens, n_blocks, step, row_bytes)
            programs = -(-rows // bn) * splits
            assert n_blocks % splits == 0
            assert programs >= qp.SMS, (rows, cols, tokens, programs)
            if splits > 1:
                assert splits * tokens * rows * 4 <= rows * row_bytes / 4
                assert cols // splits >= 256
