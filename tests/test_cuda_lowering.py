"""Every Pallas kernel and one whole engine step lower for CUDA without a GPU, at the real
per-layer shapes of Llama-3.1-8B (bf16), Qwen3-0.6B (bf16) and QwQ-32B (Q4_K), for 1, 16 and
256 sequences and a 32k-token context (kernels/lowering.py: jax 0.10 as is, an abstract H100 on
jax >= 0.11). A kernel that no longer lowers to Triton fails here: each exported module must call
exactly as many Triton kernels as the Pallas calls it was built from, and a step of several
layers only those of its distinct layers (models/layer_once.py)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from tools.bench import SHAPES, packed_shape
from tools.lowering_time import abstract_runner
from vllm_jax import models
from vllm_jax.kernels import moe
from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels import quant
from vllm_jax.kernels.lowering import export_for_cuda, triton_calls
from vllm_jax.runner.model_runner import StepLayout

pytest.importorskip("jax.experimental.pallas.triton")

MODELS = {"llama3.1-8b": None, "qwen3-0.6b": None, "qwq-32b": "q4_k"}  # name -> GGUF type
SEQS = (1, 16, 256)
TOKENS = (1, 16, 256)
PREFILL_TOKENS = 512  # the default --max-num-batched-tokens
CONTEXT = 32768
PAGE = 16
MAX_PAGES = CONTEXT // PAGE
BF16, I32 = jnp.bfloat16, jnp.int32
Shape = jax.ShapeDtypeStruct


def config(name: str, layers: int | None = None):
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    return models.from_hf(shape)


def attention_args(name: str, num_queries: int, seqs: int):
    """q [num_queries, heads, head_dim] and one layer's K and V caches with room for `seqs`
    sequences of CONTEXT tokens."""
    cfg = config(name)[1]
    cache = Shape((cfg.num_kv_heads, seqs * MAX_PAGES, PAGE, cfg.head_dim), BF16)
    return Shape((num_queries, cfg.num_heads, cfg.head_dim), BF16), cache, cache, cfg.head_dim


@pytest.mark.parametrize("seqs", SEQS)
@pytest.mark.parametrize("name", MODELS)
def test_decode_attention_lowers_for_cuda(name, seqs):
    q, k, v, hd = attention_args(name, seqs, seqs)
    decode = functools.partial(pa.decode, scale=hd ** -0.5, backend="pallas")
    exported = export_for_cuda(decode, q, k, v, Shape((seqs, MAX_PAGES), I32), Shape((seqs,), I32))
    assert triton_calls(exported) == 1


@pytest.mark.parametrize("seqs", SEQS)
@pytest.mark.parametrize("name", MODELS)
def test_prefill_attention_lowers_for_cuda(name, seqs):
    q, k, v, hd = attention_args(name, PREFILL_TOKENS, seqs)
    prefill = functools.partial(pa.prefill, scale=hd ** -0.5, backend="pallas")
    tokens = Shape((PREFILL_TOKENS,), I32)
    exported = export_for_cuda(prefill, q, k, v, tokens, tokens, Shape((seqs, MAX_PAGES), I32),
                               Shape((seqs,), I32))
    assert triton_calls(exported) == 1


def model_matrices(name: str):
    """(rows, cols) of a model's distinct projections: q/o, k/v, gate/up, down."""
    cfg = config(name)[1]
    hidden, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    return [(hidden, hidden), (kv, hidden), (inter, hidden), (hidden, inter)]


MATMUL_TOKENS = (1, 16, 17, PREFILL_TOKENS)  # the decode kernel up to 16, prefill past it


def assert_dequant_matmul_lowers(qtype, rows, cols):
    fields = packed_shape(qtype, (rows, cols)).fields
    matmul = functools.partial(quant.qmatmul, qtype=qtype, cols=cols, backend="pallas")
    for tokens in MATMUL_TOKENS:
        exported = export_for_cuda(matmul, Shape((tokens, cols), BF16), fields)
        kernel = "qmatmul_decode_split_k" if tokens <= 16 else "qmatmul_prefill"
        assert triton_calls(exported) == 1, (rows, cols, tokens)
        assert f'name = "{kernel}"' in exported.mlir_module(), (rows, cols, tokens)
        assert exported.out_avals[0].shape == (tokens, rows)


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_dequant_matmul_lowers_for_cuda_at_qwq_shapes(qtype):
    for rows, cols in model_matrices("qwq-32b"):
        assert_dequant_matmul_lowers(qtype, rows, cols)


def test_q4_k_dequant_matmul_lowers_for_cuda_at_llama_shapes():
    for rows, cols in model_matrices("llama3.1-8b"):
        assert_dequant_matmul_lowers("q4_k", rows, cols)


@pytest.mark.parametrize("qtype", quant.QTYPES)
def test_grouped_dequant_matmul_lowers_for_cuda_at_qwen3_moe_shapes(qtype):
    cfg = config("qwen3-30b-a3b")[1]
    e, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for rows, cols in [(inter, hidden), (hidden, inter)]:
        fields = packed_shape(qtype, (e, rows, cols)).fields
        for tokens in TOKENS:
            n = tokens * cfg.num_experts_per_tok
            matmul = functools.partial(moe.grouped_qmatmul, qtype=qtype, cols=cols,
                                       backend="pallas")
            exported = export_for_cuda(matmul, Shape((n, cols), BF16), fields, Shape((e,), I32))
            assert triton_calls(exported) == 1, (rows, cols, tokens)


@pytest.fixture(scope="module", params=list(MODELS))
def runner(request):
    """A 1-layer ModelRunner of the named shape over abstract weights (nothing allocated but a
    64-page cache), sized for 256 sequences of CONTEXT tokens."""
    qtype = MODELS[request.param]
    runner, _ = abstract_runner(request.param, qtype, 1, CONTEXT)
    runner.kernels_per_step = 1 + (7 + 1 if qtype else 0)  # attention, 7 projections, lm_head
    return runner


@pytest.mark.parametrize("layout", [
    StepLayout(2, 2, MAX_PAGES, True), StepLayout(16, 16, MAX_PAGES, True),
    StepLayout(256, 256, MAX_PAGES, True), StepLayout(PREFILL_TOKENS, 8, MAX_PAGES, False)],
    ids=["decode-2", "decode-16", "decode-256", "prefill-512x8"])
def test_engine_step_lowers_for_cuda(runner, layout):
    exported = runner.export_step(layout)
    assert triton_calls(exported) == runner.kernels_per_step
    # each row's sampled token, padded to the most rows a step has (the next step reads them)
    assert exported.out_avals[-1].shape == (runner.max_rows,)


DEEP_LAYOUTS = [StepLayout(16, 16, MAX_PAGES, True), StepLayout(PREFILL_TOKENS, 8, MAX_PAGES, False)]


@pytest.mark.parametrize("layout", DEEP_LAYOUTS, ids=["decode-16", "prefill-512x8"])
def test_deep_step_lowers_each_kernel_once(layout):
    """4 QwQ-32B Q4_K layers lower the Triton kernels of one: the layer is one function the
    step calls 4 times (models/layer_once.py), not 4 copies of it."""
    one, _ = abstract_runner("qwq-32b", "q4_k", 1, CONTEXT)
    deep, _ = abstract_runner("qwq-32b", "q4_k", 4, CONTEXT)
    assert triton_calls(deep.export_step(layout)) == triton_calls(one.export_step(layout))


@pytest.mark.parametrize("layout", DEEP_LAYOUTS, ids=["decode-16", "prefill-512x8"])
def test_sliding_and_global_layers_lower_one_attention_kernel_each(layout):
    """Gemma 3's 6-layer pattern (5 sliding, 1 global; dense bf16, so attention is the only
    Pallas kernel): one attention kernel per distinct layer type, not per layer."""
    runner, layers = abstract_runner("gemma3-270m", None, 6, CONTEXT)
    kinds = {runner.cfg.layer_type(i) for i in range(layers)}
    assert len(kinds) == 2
    assert triton_calls(runner.export_step(layout)) == len(kinds)
