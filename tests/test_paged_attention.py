"""Paged attention: the Pallas kernels (interpreted on the CPU) against the XLA reference, and
the reference against dense softmax attention over each sequence's gathered KV.

Every cache slot that holds no token of a sequence's context is NaN, and unused block-table
entries point at random pages, so an unmasked or out-of-range read shows up as NaN.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels.check_inputs import poisoned_cache as make_cache, ragged_chunks

SCALE = 0.17
TOL = dict(rtol=1e-5, atol=1e-5)


def dense_attention(q, k, v, tables, context_lens, seq_idx, positions, window):
    """float64 softmax attention per token over its sequence's keys [start, position]."""
    kvh, _, page_size, hd = k.shape
    t, h, _ = q.shape
    out = np.zeros((t, h, hd))
    for i, (s, p) in enumerate(zip(seq_idx, positions)):
        start = 0 if window is None else max(0, p - window + 1)
        kpos = np.arange(start, min(p + 1, context_lens[s]))
        if not len(kpos):
            continue
        pages, offsets = tables[s, kpos // page_size], kpos % page_size
        for head in range(h):
            kk = k[head * kvh // h, pages, offsets].astype(np.float64)  # [n, hd]
            vv = v[head * kvh // h, pages, offsets].astype(np.float64)
            scores = kk @ q[i, head] * SCALE
            w = np.exp(scores - scores.max())
            out[i, head] = (w / w.sum()) @ vv
    return out


def decode_case(seed, kvh, g, hd, page_size, context_lens):
    rng = np.random.default_rng(seed)
    max_pages = max(-(-c // page_size) for c in context_lens) + 2
    k, v, tables = make_cache(rng, kvh, hd, page_size, context_lens, max_pages)
    q = rng.standard_normal((len(context_lens), kvh * g, hd)).astype(np.float32)
    return q, k, v, tables, np.asarray(context_lens, np.int32)


def prefill_case(seed, kvh, g, hd, page_size, context_lens, new_tokens, num_tokens,
                 shuffle=False):
    """Each row's last new_tokens positions as one chunk (its earlier tokens already cached),
    then padding tokens the way the runner writes them (last row, position 0)."""
    rng = np.random.default_rng(seed)
    max_pages = max(-(-c // page_size) for c in context_lens) + 2
    k, v, tables = make_cache(rng, kvh, hd, page_size, context_lens, max_pages)
    seq_idx, positions = ragged_chunks(context_lens, new_tokens, num_tokens)
    if shuffle:
        order = rng.permutation(num_tokens)
        seq_idx, positions = seq_idx[order], positions[order]
    q = rng.standard_normal((num_tokens, kvh * g, hd)).astype(np.float32)
    return q, k, v, seq_idx, positions, tables, np.asarray(context_lens, np.int32)


def run(fn, case, window, **kw):
    f = jax.jit(functools.partial(fn, scale=SCALE, sliding_window=window, **kw))
    return np.asarray(f(*map(jnp.asarray, case)))


PS = 8
CONTEXTS = [1, PS - 1, PS, 3 * PS + 5, 0, 5 * PS]  # 0 = padding row
# (kv heads, queries per kv head, head_dim, page_size, window)
SHAPES = [
    (2, 1, 64, PS, None),  # MHA
    (2, 2, 128, PS, 11),
    (1, 4, 64, 16, None),
    (2, 4, 32, 16, 20),
]


@pytest.mark.parametrize("kvh,g,hd,ps,window", SHAPES)
def test_decode_pallas_matches_reference(kvh, g, hd, ps, window):
    contexts = [1, ps - 1, ps, 3 * ps + 5, 0, 5 * ps]
    case = decode_case(1, kvh, g, hd, ps, contexts)
    ref = run(pa.decode_attention, case, window)
    # 16-key steps and 3 splits: several steps per program, splits that start past a context.
    out = run(pa.decode_attention_pallas, case, window, interpret=True, block_k=16,
                     num_splits=3)
    assert not np.isnan(ref).any()
    np.testing.assert_allclose(out, ref, **TOL)


def test_decode_pallas_default_tiles_and_odd_group_match_reference():
    case = decode_case(2, 2, 3, 64, 16, [3, 17, 100, 0])  # 3 queries per KV head, padded to 16
    ref = run(pa.decode_attention, case, 40)
    out = run(pa.decode_attention_pallas, case, 40, interpret=True)
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("window", [None, 11])
def test_decode_reference_matches_dense(window):
    q, k, v, tables, lens = case = decode_case(3, 2, 2, 64, PS, CONTEXTS)
    ref = run(pa.decode_attention, case, window)
    dense = dense_attention(q, k, v, tables, lens, np.arange(len(lens)), lens - 1, window)
    np.testing.assert_allclose(ref, dense, **TOL)


# Row 0 a whole prompt, row 1 a chunk after 20 cached tokens, row 2 one token after 15,
# row 3 a chunk ending mid-page after 2 full pages, row 4 a padding row; 5 padding tokens.
PREFILL_CONTEXTS = [13, 29, 16, 21, 0]
PREFILL_NEW = [13, 9, 1, 5, 0]
PREFILL_TOKENS = 33


@pytest.mark.parametrize("kvh,g,hd,ps,window", SHAPES)
def test_prefill_pallas_matches_reference(kvh, g, hd, ps, window):
    case = prefill_case(4, kvh, g, hd, ps, PREFILL_CONTEXTS, PREFILL_NEW, PREFILL_TOKENS)
    ref = run(pa.prefill_attention, case, window)
    # 16-row tiles (not dividing 33 tokens) that straddle sequences; 16-key steps.
    out = run(pa.prefill_attention_pallas, case, window, interpret=True, block_m=16,
                      block_k=16)
    assert not np.isnan(ref).any()
    np.testing.assert_allclose(out, ref, **TOL)


def test_prefill_pallas_handles_interleaved_tokens_and_real_last_row():
    # Padding tokens land on the last row, here a real sequence; tokens in random order;
    # 7 queries per KV head (padded to 8), default tiles.
    contexts, new = [13, 29, 21], [13, 9, 5]
    case = prefill_case(5, 1, 7, 64, PS, contexts, new, 32, shuffle=True)
    ref = run(pa.prefill_attention, case, 7)
    out = run(pa.prefill_attention_pallas, case, 7, interpret=True)
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_reference_matches_dense(window):
    case = prefill_case(6, 2, 2, 32, PS, PREFILL_CONTEXTS, PREFILL_NEW, PREFILL_TOKENS)
    q, k, v, seq_idx, positions, tables, lens = case
    ref = run(pa.prefill_attention, case, window)
    dense = dense_attention(q, k, v, tables, lens, seq_idx, positions, window)
    np.testing.assert_allclose(ref, dense, **TOL)


# A mixed step: decode rows first (one token each, at the end of their context), then prompt
# chunks (one whole prompt, one continuing after a cached prefix), a padding row, padding tokens.
MIXED_CONTEXTS = [9, 1, 3 * PS + 5, 2 * PS, 5 * PS - 3, 0]
MIXED_NEW = [1, 1, 1, 2 * PS, 13, 0]


def _ragged_backend(backend):
    if backend == "cpu":
        from vllm_jax.kernels import cpu

        if not cpu.available():
            pytest.skip("no C++ compiler for the CPU kernels")
    return functools.partial(pa.prefill, backend=backend)


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret", "cpu"])
@pytest.mark.parametrize("kvh,g,hd,window", [(3, 3, 64, None), (2, 2, 32, 11)])
def test_mixed_decode_rows_and_prompt_chunks_match_dense(backend, kvh, g, hd, window):
    attend = _ragged_backend(backend)
    case = prefill_case(8, kvh, g, hd, PS, MIXED_CONTEXTS, MIXED_NEW, 48)
    q, k, v, seq_idx, positions, tables, lens = case
    out = run(attend, case, window)
    dense = dense_attention(q, k, v, tables, lens, seq_idx, positions, window)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, dense, **TOL)


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret", "cpu"])
def test_ragged_decode_rows_equal_decode_attention(backend):
    """1-token chunks through the ragged path give what the decode path gives those rows."""
    attend = _ragged_backend(backend)
    contexts = [1, PS - 1, 3 * PS + 5, 0, 5 * PS]
    q, k, v, tables, lens = decode_case(9, 2, 3, 64, PS, contexts)
    seq_idx = np.arange(len(contexts), dtype=np.int32)
    decode = run(pa.decode_attention, (q, k, v, tables, lens), None)
    ragged = run(attend, (q, k, v, seq_idx, lens - 1, tables, lens), None)
    np.testing.assert_allclose(ragged, decode, **TOL)


def test_backend_names_resolve():
    from vllm_jax.kernels import cpu
    from vllm_jax.kernels.backend import resolve

    want = {"gpu": "pallas", "cpu": "cpu" if cpu.available() else "xla"}
    assert resolve("auto") == want.get(jax.default_backend(), "xla")
    assert resolve("xla") == "xla"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve("triton")


def test_dispatch_runs_the_chosen_backend_and_falls_back_on_unsupported_shapes():
    case = decode_case(7, 2, 2, 64, PS, [5, 19])
    ref = run(pa.decode_attention, case, None)
    out = run(pa.decode, case, None, backend="pallas_interpret")
    np.testing.assert_allclose(out, ref, **TOL)
    odd = decode_case(7, 2, 2, 48, PS, [5, 19])  # head_dim 48: no power of two
    np.testing.assert_allclose(run(pa.decode, odd, None, backend="auto"),
                               run(pa.decode_attention, odd, None), **TOL)
    with pytest.raises(ValueError, match="head_dim 48"):
        run(pa.decode, odd, None, backend="pallas_interpret")


def test_model_attention_uses_the_configured_backend():
    from vllm_jax.config import ModelConfig
    from vllm_jax.models.layers import AttnMetadata
    from vllm_jax.models.llama import LlamaForCausalLM
    from vllm_jax.runner.model_runner import kv_cache_shape

    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16)
    rng = np.random.default_rng(8)
    shapes = {"embed_tokens": (32, 64), "norm": (64,), "layers.0.input_layernorm": (64,),
              "layers.0.post_attention_layernorm": (64,), "layers.0.self_attn.q_proj": (64, 64),
              "layers.0.self_attn.k_proj": (32, 64), "layers.0.self_attn.v_proj": (32, 64),
              "layers.0.self_attn.o_proj": (64, 64), "layers.0.mlp.gate_proj": (64, 64),
              "layers.0.mlp.up_proj": (64, 64), "layers.0.mlp.down_proj": (64, 64)}
    weights = {f"{n}.weight": jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32)
               for n, s in shapes.items()}
    page_size, num_pages = 8, 6
    slots = [*range(8, 18), *range(24, 30)]  # row 0 on pages 1, 2; row 1 on page 3
    meta = AttnMetadata(positions=jnp.arange(16) % 10, slot_mapping=jnp.asarray(slots),
                        seq_idx=jnp.asarray([0] * 10 + [1] * 6),
                        block_tables=jnp.asarray([[1, 2, 0], [3, 0, 0]]),
                        context_lens=jnp.asarray([10, 6]))
    tokens = jnp.asarray(rng.integers(0, 32, 16))
    kv = [(jnp.zeros(kv_cache_shape(cfg, num_pages, page_size)),) * 2]
    outs = []
    for backend in ("xla", "pallas_interpret"):
        model = LlamaForCausalLM(cfg, weights, backend=backend)
        assert model.layers[0].self_attn.backend == backend
        hidden, _ = model(tokens, kv, meta, decode=False)
        outs.append(np.asarray(hidden))
    np.testing.assert_allclose(outs[1], outs[0], **TOL)




@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_write_kv_puts_each_token_in_its_slot_and_drops_out_of_range_slots(tokens):
    rng = np.random.default_rng(tokens)
    kvh, pages, page_size, hd = 2, 4, 8, 16
    k_cache, v_cache = (rng.standard_normal((kvh, pages, page_size, hd)).astype(np.float32)
                        for _ in range(2))
    k, v = (rng.standard_normal((tokens, kvh, hd)).astype(np.float32) for _ in range(2))
    slots = rng.choice(pages * page_size, tokens, replace=False)
    slots[-1] = pages * page_size  # a padding row: dropped
    k_out, v_out = pa.write_kv(*map(jnp.asarray, (k_cache, v_cache, k, v)),
                               jnp.asarray(slots, jnp.int32))
    for cache, new, out in ((k_cache, k, k_out), (v_cache, v, v_out)):
        want = cache.reshape(kvh, pages * page_size, hd).copy()
        want[:, slots[:-1]] = new[:-1].swapaxes(0, 1)
        np.testing.assert_array_equal(np.asarray(out), want.reshape(cache.shape))


def test_one_token_kv_write_updates_a_donated_cache_in_place():
    """A 1-slot scatter is what a 1-sequence decode step does: XLA must not copy the cache."""
    shape = (3, 512, 16, 64)
    write = jax.jit(pa.write_kv, donate_argnums=(0, 1))
    args = (jax.ShapeDtypeStruct(shape, jnp.float32),) * 2 + (
        jax.ShapeDtypeStruct((1, 3, 64), jnp.float32),) * 2 + (
        jax.ShapeDtypeStruct((1,), jnp.int32),)
    hlo = write.lower(*args).compile().as_text()
    cache_copies = [ln for ln in hlo.splitlines()
                    if " copy(" in ln and "f32[3,8192,64]" in ln.split("copy(")[0]]
    assert not cache_copies, cache_copies
