"""In-situ quantization (--quant), its orbax cache and --save-gguf, on tiny random models."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest

from vllm_jax.config import ConfigError, EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.kernels import quant
from vllm_jax.loader import load
from vllm_jax.loader.quantize import parse_quant, pick_qtype, save_engine_gguf
from vllm_jax.sampling_params import SamplingParams

PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 300, 40)]
PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1)


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("VLLM_JAX_CACHE", str(root))
        yield root


def engine_for(path, quant=None, **kw):
    return LLMEngine(EngineConfig(model_path=str(path), dtype="f32", quant=quant,
                                  max_model_len=128, kvcache_mem_mb=2, max_num_seqs=4, **kw))


def run(engine):
    """(greedy tokens, log-probability of each prompt token after its prefix)."""
    out = engine.generate([PROMPT], PARAMS)[0]
    lps = [out.prompt_logprobs[p][PROMPT[p]].logprob for p in range(1, len(PROMPT))]
    return out.outputs[0].token_ids, np.array(lps)


@pytest.fixture(scope="module")
def llama(model_dir):
    path, _ = model_dir("llama")
    return path, run(engine_for(path))


@pytest.fixture
def count_quantize(monkeypatch):
    calls = []
    real = quant.quantize

    def counting(w, qtype):
        calls.append(qtype)
        return real(w, qtype)

    monkeypatch.setattr(quant, "quantize", counting)
    return calls


def test_quant_names_and_aliases():
    for names, qtype in [("q4_0 Q40", "q4_0"), ("q4_1 q41 Q4", "q4_1"), ("q5_0 q50", "q5_0"),
                         ("q5_1 q51 q5", "q5_1"), ("q8_0 Q80 q8", "q8_0"), ("q2k Q2_K", "q2_k"),
                         ("q3k q3_k", "q3_k"), ("Q4K q4_k", "q4_k"), ("q5k q5_K", "q5_k"),
                         ("q6k Q6_K", "q6_k")]:
        for name in names.split():
            assert parse_quant(name) == qtype, name
    assert parse_quant(None) is None
    with pytest.raises(ConfigError, match=r"unknown quantization type 'q3'.*q4_0/q40.*q6_k/q6k"):
        parse_quant("q3")


def test_block_size_fallback_rules():
    assert pick_qtype((8, 512), "q4_k") == "q4_k"
    assert pick_qtype((8, 64), "q4_k") == "q8_0"  # 64 columns: no 256-element K-quant block
    assert pick_qtype((8, 48), "q4_k") is None  # not even a 32-element block: stays dense
    assert pick_qtype((8,), "q8_0") is None


def test_q8_0_stays_close_to_f32(llama):
    """Q8_0 of this random tiny model: measured max |delta logprob| ~0.06 (prompt positions) and
    identical greedy tokens; the bounds leave 3x room. 16/16 tokens equal is required up to the
    first step where the two runs' prompt logprobs already disagree by more than the bound."""
    path, (ref_tokens, ref_lps) = llama
    engine = engine_for(path, "q8_0")
    q = engine.loaded.model.layers[0].self_attn.q_proj
    assert q.qtype == "q8_0"
    assert engine.loaded.model.embed_tokens.linear.qtype is None  # untied: kept dense
    tokens, lps = run(engine)
    assert np.abs(lps - ref_lps).max() < 0.2
    assert sum(a == b for a, b in zip(tokens, ref_tokens)) >= 14


def dequantized_engine(path, qtype, **kw):
    """The engine over a dense model holding gguf-py's dequantization of the cached blocks."""
    import jax.numpy as jnp

    from vllm_jax import models
    from vllm_jax.loader import LoadedModel
    from vllm_jax.loader.quantize import host_weights
    from vllm_jax.tokenizer import Tokenizer

    cls, cfg, host = host_weights(path, qtype)
    weights = {}
    for name, x in host.items():
        if isinstance(x, quant.QuantTensor):
            x = gguf.quants.dequantize(x.raw, quant.QTYPES[x.qtype][2]).reshape(x.shape)
        weights[name] = jnp.asarray(np.asarray(x, np.float32))
    loaded = LoadedModel(cfg, cls(cfg, weights, jnp.float32), Tokenizer.from_dir(path),
                         str(path), 0)
    assert cfg == models.from_dir(path)[1]
    return LLMEngine(EngineConfig(model_path=str(path), dtype="f32", max_model_len=128,
                                  kvcache_mem_mb=2, max_num_seqs=4, **kw), loaded=loaded)


def test_q4_k_blocks_are_gguf_q4_k_and_run(model_dir):
    """Quantization noise of a random model is large (relative weight error 7.2% for q4_k, and
    the logprobs of this chaotic tiny model move by ~1 nat), so the check is exactness instead:
    the packed q4_k engine computes what a dense model of gguf-py's dequantized bytes does."""
    path, _ = model_dir("llama_tied", hidden_size=256, intermediate_size=512)
    engine = engine_for(path, "q4k")
    model = engine.loaded.model
    assert {model.layers[0].mlp.down_proj.qtype, model.layers[1].self_attn.o_proj.qtype} == {"q4_k"}
    assert model.embed_tokens.linear.qtype == "q4_k"  # tied: the lm_head matmul is quantized too
    tokens, lps = run(engine)
    ref_tokens, ref_lps = run(dequantized_engine(path, "q4_k"))
    assert tokens == ref_tokens
    np.testing.assert_allclose(lps, ref_lps, atol=1e-4)


def test_k_quant_falls_back_to_q8_0_on_small_rows(model_dir, caplog):
    path, _ = model_dir("llama_tied")  # hidden 64, intermediate 128
    with caplog.at_level(logging.WARNING, "vllm_jax"):
        loaded = load(str(path), "f32", quant="q6_k")
    assert "q6_k needs in_features % 256 == 0" in caplog.text
    m = loaded.model
    linears = [m.layers[0].self_attn.q_proj, m.layers[0].mlp.down_proj, m.embed_tokens.linear]
    assert [x.qtype for x in linears] == ["q8_0"] * 3


def test_second_load_uses_the_orbax_cache(model_dir, count_quantize, caplog):
    path, _ = model_dir("qwen3")
    first = load(str(path), "f32", quant="q5_0")
    n = len(count_quantize)
    assert n == 2 * 7 + 1  # 7 linear weights per layer and the (untied) lm_head
    with caplog.at_level(logging.INFO, "vllm_jax"):
        second = load(str(path), "f32", quant="q5_0")
    assert len(count_quantize) == n  # nothing quantized again
    assert "loaded quantized weights from cache" in caplog.text
    a, b = first.model.layers[1].mlp.up_proj, second.model.layers[1].mlp.up_proj
    for k, v in a.fields().items():
        np.testing.assert_array_equal(np.asarray(b.fields()[k]), np.asarray(v))
    (path / "config.json").touch()  # a changed source is a different cache key
    load(str(path), "f32", quant="q5_0")
    assert len(count_quantize) == 2 * n


def test_save_gguf_reloads_to_the_same_model(llama, tmp_path):
    path, _ = llama
    engine = engine_for(path, "q4_0")
    out = tmp_path / "tiny-q4_0.gguf"
    save_engine_gguf(engine, out)

    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.1.ffn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F32  # untied: dense
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()

    again = engine_for(out)
    assert again.loaded.config == engine.loaded.config
    text = "Hello world! How are you today?"
    assert again.tokenizer.encode(text) == engine.tokenizer.encode(text)
    assert again.tokenizer.eos_token_ids == engine.tokenizer.eos_token_ids
    tokens, lps = run(engine)
    tokens2, lps2 = run(again)
    assert tokens2 == tokens
    np.testing.assert_allclose(lps2, lps, atol=1e-5)

    with pytest.raises(ConfigError, match="a GGUF file is already quantized"):
        load(str(out), "f32", quant="q8_0")
    with pytest.raises(ConfigError, match="tiny-q4_0.gguf is not one"):
        save_engine_gguf(again, tmp_path / "again.gguf")


GGUF_ROUND_TRIPS = [  # (family, config overrides, quantization)
    ("qwen2", {}, "q8_0"), ("llama31", {}, "q5_1"), ("mistral", {}, "q4_1"),
    ("gemma3", dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=32,
                    rope_parameters=None), "q8_0"),  # the layout llama.cpp's gemma3 assumes
    ("qwen3_moe", {}, "q4_0"), ("mixtral", {}, "q8_0"), ("phi3", {}, "q5_0"),
]


@pytest.mark.parametrize("arch, overrides, qtype", GGUF_ROUND_TRIPS,
                         ids=[a for a, _, _ in GGUF_ROUND_TRIPS])
def test_save_gguf_reloads_every_weight_bit_for_bit(model_dir, tmp_path, arch, overrides, qtype):
    """The writer reads the architecture's declarations: fused tensors (Phi-3's attn_qkv),
    stacked experts, Gemma's 1 + w norms and rope factor tensors all come back as they went."""
    from flax import nnx

    from vllm_jax.loader.gguf_writer import save_gguf
    from vllm_jax.loader.quantize import host_weights

    path, _ = model_dir(arch, **overrides)
    cls, cfg, host = host_weights(path, qtype)
    out = tmp_path / f"{arch}.gguf"
    save_gguf(out, cls, cfg, host, path)
    a, b = load(str(path), "f32", quant=qtype), load(str(out), "f32", keep_quantized=True)
    assert type(b.model) is type(a.model)
    fields = [f for f in a.config.__dataclass_fields__ if "rope" not in f]
    assert {f: getattr(b.config, f) for f in fields} == {f: getattr(a.config, f) for f in fields}
    for rope_a, rope_b in ((a.config.rope_for(i), b.config.rope_for(i))
                           for i in range(cfg.num_layers)):
        for max_len in (None, 10**6):  # LongRoPE: short and long factors
            np.testing.assert_allclose(rope_b.inv_freq(max_len), rope_a.inv_freq(max_len),
                                       rtol=1e-6)
        assert rope_b.attention_factor() == pytest.approx(rope_a.attention_factor(), rel=1e-6)
    ref, got = (nnx.to_flat_state(nnx.state(m.model)) for m in (a, b))
    assert [k for k, _ in got] == [k for k, _ in ref]
    for (k, x), (_, y) in zip(ref, got):
        np.testing.assert_array_equal(np.asarray(y.get_value()), np.asarray(x.get_value()),
                                      err_msg=str(k))


@pytest.mark.parametrize("backend", ["cpu", "xla", "pallas_interpret"])
def test_quantized_experts_compute_their_dequantized_model(model_dir, backend):
    """--quant packs every expert; each kernel backend's grouped matmul equals a dense model of
    gguf-py's dequantization of the same blocks."""
    path, _ = model_dir("qwen3_moe")
    engine = engine_for(path, "q8_0", kernel_backend=backend)
    experts = engine.loaded.model.layers[0].mlp.gate_proj
    assert experts.qtype == "q8_0" and next(iter(experts.fields().values())).shape[0] == 8
    tokens, lps = run(engine)
    ref_tokens, ref_lps = run(dequantized_engine(path, "q8_0", kernel_backend=backend))
    assert tokens == ref_tokens
    np.testing.assert_allclose(lps, ref_lps, atol=1e-4)
