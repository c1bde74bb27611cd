"""GGUF loading: tiny models written as GGUF here (the way llama.cpp's converter lays them out)
must load to the safetensors model exactly (the real models: test_real_models.py)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vllm_jax.config import ConfigError, EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.kernels.backend import Backends
from vllm_jax.loader import load
from vllm_jax.loader import safetensors as st
from vllm_jax.models.layers import AttnMetadata
from vllm_jax.runner.model_runner import kv_cache_shape
from vllm_jax.sampling_params import SamplingParams

ARCHS = ["llama", "llama_tied", "llama31", "mistral", "qwen2", "qwen3", "gemma3_6_layers",
         "qwen3_moe", "mixtral"]
# llama.cpp's gemma3 fixes every 6th layer global, query_pre_attn_scalar = head_dim and the
# local rotary base; a tiny Gemma 3 that a GGUF file can describe (linear scaling on the globals)
VARIANTS = {"gemma3_6_layers": ("gemma3", dict(
    num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=32, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))}


# ---- an independent GGUF writer (llama.cpp's layout, written from its documentation) -------

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
         "block_sparse_moe.gate": "ffn_gate_inp"}
GEMMA_LAYER = {**LAYER, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "gemma3_text": "gemma3",
             "qwen3_moe": "qwen3moe"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def to_gguf_name(hf: str, layer_names: dict = LAYER) -> str:
    base, kind = hf.rsplit(".", 1)
    if base in TOP:
        return f"{TOP[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{layer_names[rest]}.{kind}"


def expert_tensors(name: str, x: np.ndarray) -> dict:
    """transformers' in-memory experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]) ->
    llama.cpp's ffn_{gate,up,down}_exps."""
    layer = name.split(".")[2]
    if name.endswith("gate_up_proj"):
        half = x.shape[1] // 2
        return {f"blk.{layer}.ffn_gate_exps.weight": x[:, :half],
                f"blk.{layer}.ffn_up_exps.weight": x[:, half:]}
    return {f"blk.{layer}.ffn_down_exps.weight": x}


def interleave_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k order: in each head, the rotate-half pairs (j, j + d/2) become adjacent."""
    d = w.shape[0] // n_head
    order = [h * d + k * (d // 2) + j for h in range(n_head) for j in range(d // 2) for k in (0, 1)]
    return w[order]


def llama3_rope_divisors(c) -> np.ndarray:
    s, dim = c.rope_parameters, c.head_dim
    old, factor = s["original_max_position_embeddings"], s["factor"]
    low_wave, high_wave = old / s["low_freq_factor"], old / s["high_freq_factor"]
    out = []
    for i in range(0, dim, 2):
        wave = 2 * math.pi * c.rope_parameters["rope_theta"] ** (i / dim)
        if wave < high_wave:
            out.append(1.0)
        elif wave > low_wave:
            out.append(factor)
        else:
            low, high = s["low_freq_factor"], s["high_freq_factor"]
            smooth = (old / wave - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_tiny_gguf(path: Path, folder: Path, hf, arch: str, qtype=None):
    c = hf.config
    name = GGUF_ARCH.get(c.model_type, c.model_type)
    w = gguf.GGUFWriter(str(path), name)
    p = name + "."
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for key, value in [("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("block_count", c.num_hidden_layers),
                       ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads),
                       ("attention.key_length", head_dim), ("attention.value_length", head_dim)]:
        w.add_uint32(p + key, value)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_float32(p + "rope.freq_base", rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_string(p + "rope.scaling.type", "linear")
        w.add_float32(p + "rope.scaling.factor", rope["factor"])
    w.add_float32(p + "attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if getattr(c, "sliding_window", None) and c.model_type in ("mistral", "mixtral", "gemma3_text"):
        w.add_uint32(p + "attention.sliding_window", c.sliding_window)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_uint32(p + "expert_count", experts)
        w.add_uint32(p + "expert_used_count", c.num_experts_per_tok)
    if c.model_type == "qwen3_moe":
        w.add_uint32(p + "expert_feed_forward_length", c.moe_intermediate_size)
        w.add_bool(p + "expert_weights_norm", c.norm_topk_prob)

    tj = json.loads((folder / "tokenizer.json").read_text())
    tokens = {i: t for t, i in tj["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, 1)
    for a in tj["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", [tokens[i] for i in range(len(tokens))])
    w.add_array("tokenizer.ggml.token_type", [types[i] for i in range(len(tokens))])
    w.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m)
                                            for m in tj["model"]["merges"]])
    w.add_uint32("tokenizer.ggml.bos_token_id", c.bos_token_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", c.eos_token_id)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", (folder / "chat_template.jinja").read_text())

    if (c.rope_parameters or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_divisors(c))
    tensors = {}
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings or "rotary" in hf_name:
            continue
        x = t.float().numpy()
        if name == "llama" and "q_proj" in hf_name:
            x = interleave_rows(x, c.num_attention_heads)
        elif name == "llama" and "k_proj" in hf_name:
            x = interleave_rows(x, c.num_key_value_heads)
        if name == "gemma3" and "norm" in hf_name:
            x = x + np.float32(1)  # llama.cpp's converter stores Gemma's 1 + w
        if ".experts." in hf_name:
            tensors.update(expert_tensors(hf_name, x))
        else:
            tensors[to_gguf_name(hf_name, GEMMA_LAYER if name == "gemma3" else LAYER)] = x
    for gguf_name, x in tensors.items():
        if qtype is not None and x.ndim >= 2 and "gate_inp" not in gguf_name:
            w.add_tensor(gguf_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- the model run directly: one prefill over whole sequences -------------------------------

class Prefill:
    """logits at every position of a few sequences, padded to `length` (one compile)."""

    def __init__(self, loaded, num_seqs: int, length: int, page_size: int = 16):
        cfg, model = loaded.config, loaded.model
        self.s, self.length = num_seqs, length
        self.pages = length // page_size
        graphdef, self.state = nnx.split(model)
        shape = kv_cache_shape(cfg, num_seqs * self.pages, page_size)
        self.kv = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]

        @jax.jit
        def run(state, kv, tokens, positions, slots, seq_idx, tables, lens):
            model = nnx.merge(graphdef, state)
            hidden, _ = model(tokens, kv, AttnMetadata(positions, slots, seq_idx, tables, lens),
                              False)
            return model.logits(hidden)

        self.run = run

    def __call__(self, seqs: list[list[int]]) -> list[np.ndarray]:
        s, n = self.s, self.length
        tokens = np.zeros((s, n), np.int32)
        lens = np.zeros(s, np.int32)
        for i, ids in enumerate(seqs):
            tokens[i, :len(ids)], lens[i] = ids, len(ids)
        pos = np.tile(np.arange(n, dtype=np.int32), s)
        tables = np.arange(s * self.pages, dtype=np.int32).reshape(s, self.pages)
        slots = np.arange(s * n, dtype=np.int32)
        slots = np.where(pos < np.repeat(lens, n), slots, s * n)  # padding: dropped
        seq_idx = np.repeat(np.arange(s, dtype=np.int32), n)
        logits = np.asarray(self.run(self.state, self.kv, tokens.reshape(-1), pos, slots, seq_idx,
                                     tables, lens)).reshape(s, n, -1)
        return [logits[i, :len(ids)] for i, ids in enumerate(seqs)]


# ---- tiny models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(model_dir, tmp_path_factory):
    """(arch, variant) -> (folder, transformers model, GGUF path); variants f32 and q8_0."""
    cache = {}

    def get(arch, variant="f32"):
        if (arch, variant) not in cache:
            family, overrides = VARIANTS.get(arch, (arch, {}))
            folder, hf = model_dir(family, **overrides)
            path = tmp_path_factory.mktemp("gguf") / f"{arch}-{variant}.gguf"
            qtype = gguf.GGMLQuantizationType.Q8_0 if variant == "q8_0" else None
            write_tiny_gguf(path, folder, hf, arch, qtype)
            cache[arch, variant] = (folder, hf, path)
        return cache[arch, variant]

    return get


PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(3, 300, 20 + 9 * i)]
           for i in range(3)]


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_loads_to_the_safetensors_model(tiny, arch):
    folder, _, path = tiny(arch)
    ref, got = load(str(folder), "f32"), load(str(path), "f32")
    fields = [f for f in ref.config.__dataclass_fields__ if f != "rope"]
    same = {f: getattr(ref.config, f) for f in fields}
    assert {f: getattr(got.config, f) for f in fields} == same
    np.testing.assert_allclose(got.config.rope.inv_freq(), ref.config.rope.inv_freq(), rtol=1e-6)

    ref_w, got_w = (nnx.to_flat_state(nnx.state(m.model)) for m in (ref, got))
    assert [k for k, _ in got_w] == [k for k, _ in ref_w]
    for (k, a), (_, b) in zip(ref_w, got_w):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()),
                                      err_msg=str(k))

    ref_logits = Prefill(ref, 3, 64)(PROMPTS)
    got_logits = Prefill(got, 3, 64)(PROMPTS)
    for a, b in zip(ref_logits, got_logits):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def engine_for(path, **kw):
    return LLMEngine(EngineConfig(model_path=str(path), dtype="f32", max_model_len=128,
                                  kvcache_mem_mb=2, max_num_seqs=4, **kw))


def test_f32_gguf_engine_generates_what_the_folder_does(tiny):
    folder, _, path = tiny("qwen2")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = "Once upon a time there was a little model"
    ref, got = engine_for(folder), engine_for(path)
    assert got.tokenizer.encode(prompt) == ref.tokenizer.encode(prompt)
    a, b = ref.generate([prompt], params)[0], got.generate([prompt], params)[0]
    assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert b.outputs[0].text == a.outputs[0].text


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_moe"])
def test_q8_0_gguf_stays_quantized_and_computes_its_dequantized_model(tiny, arch):
    """The packed Q8_0 path with float32 activations equals a dense model holding gguf-py's
    dequantized weights (to f32 rounding). Against the f32 model itself only quantization noise
    remains: measured max 4%, mean 0.6% of the logit range for these random tiny models (no
    structure to preserve); more with experts, where the noise flips some of the router's
    choices."""
    folder, _, path = tiny(arch, "q8_0")
    ref = load(str(folder), "f32")
    got = load(str(path), "f32", keep_quantized=True, backend=Backends(cpu_activations="f32"))
    assert got.model.layers[0].self_attn.q_proj.qtype == "q8_0"
    assert got.model.embed_tokens.linear.qtype == "q8_0"
    assert got.weight_bytes < 0.35 * ref.weight_bytes  # 34 bytes per 32 weights vs 4 per weight

    q8 = gguf.GGMLQuantizationType.Q8_0
    weights = {}
    cls = type(ref.model)
    for spec, x in st.read_weights(st.checkpoint_files(folder), cls.weights(ref.config)):
        x = np.asarray(x, np.float32)
        packed = x.ndim >= 2 and not spec.name.endswith("router.weight")
        weights[spec.name] = jnp.asarray(gguf.quants.dequantize(gguf.quants.quantize(x, q8), q8)
                                         if packed else x)
    dequantized = SimpleNamespace(config=ref.config, model=cls(ref.config, weights, jnp.float32))
    f32, dq, packed = (Prefill(m, 3, 64)(PROMPTS) for m in (ref, dequantized, got))
    for a, b, c in zip(f32, dq, packed):
        scale = np.abs(a).max()
        np.testing.assert_allclose(c, b, rtol=0, atol=1e-5 * scale)
        if arch != "qwen3_moe":
            assert np.abs(c - a).max() < 0.08 * scale and np.abs(c - a).mean() < 0.015 * scale


# ---- damaged files --------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [3, 100, 5000, -1000])
def test_truncated_gguf_is_one_config_error(tiny, tmp_path, cut):
    _, _, path = tiny("llama")
    data = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ConfigError, match=str(bad).replace(".", r"\.")):
        load(str(bad), "f32")


def test_garbage_and_unsupported_files_are_config_errors(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match="garbage.gguf"):
        load(str(bad), "f32")
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'.*qwen3"):
        load(str(other), "f32")


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_fast_reader_reads_what_gguf_py_reads(real_model, name):
    """loader.gguf.Reader (plain ndarray slices, arrays read in one pass) against gguf-py's own
    GGUFReader on the real files: every field's contents and every tensor."""
    from vllm_jax.loader.gguf import open_gguf

    path = real_model(name)
    ours, ref = open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(ref.fields)
    for key in ref.fields:
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    assert len(ours.fields["tokenizer.ggml.tokens"].data) == len(ref.fields["tokenizer.ggml.tokens"].data)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, list(a.shape), a.data_offset) == \
            (b.name, b.tensor_type, list(b.shape), b.data_offset)
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
