"""GGUF loading: tiny models written as GGUF here (the way llama.cpp's converter lays them out)
must load to the safetensors model exactly; the real SmolLM2 Q4_1 file must match transformers."""
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
import torch
from flax import nnx

from vllm_jax.config import ConfigError, EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.loader import load
from vllm_jax.loader import safetensors as st
from vllm_jax.models.layers import AttnMetadata
from vllm_jax.models.llama import LlamaForCausalLM
from vllm_jax.runner.model_runner import kv_cache_shape
from vllm_jax.sampling_params import SamplingParams

ARCHS = ["llama", "llama_tied", "llama31", "mistral", "qwen2", "qwen3"]


def smollm2_path() -> Path:
    return Path(os.environ.get("VLLM_JAX_SMOLLM2")
                or Path.home() / ".cache/vllm_jax/SmolLM2-135M-Instruct.Q4_1.gguf")


# ---- an independent GGUF writer (llama.cpp's layout, written from its documentation) -------

LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def to_gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base in TOP:
        return f"{TOP[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{LAYER[rest]}.{kind}"


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
    name = {"llama": "llama", "mistral": "llama"}.get(c.model_type, c.model_type)
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
    w.add_float32(p + "rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_float32(p + "attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if getattr(c, "sliding_window", None) and c.model_type == "mistral":
        w.add_uint32(p + "attention.sliding_window", c.sliding_window)

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
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings or "rotary" in hf_name:
            continue
        x = t.float().numpy()
        if name == "llama" and "q_proj" in hf_name:
            x = interleave_rows(x, c.num_attention_heads)
        elif name == "llama" and "k_proj" in hf_name:
            x = interleave_rows(x, c.num_key_value_heads)
        if qtype is not None and x.ndim == 2:
            w.add_tensor(to_gguf_name(hf_name), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(to_gguf_name(hf_name), x)
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
            folder, hf = model_dir(arch)
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


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_q8_0_gguf_stays_quantized_and_computes_its_dequantized_model(tiny, arch):
    """The packed Q8_0 path equals a dense model holding gguf-py's dequantized weights (to f32
    rounding). Against the f32 model itself only quantization noise remains: measured max 4%,
    mean 0.6% of the logit range for these random tiny models (no structure to preserve)."""
    folder, _, path = tiny(arch, "q8_0")
    ref, got = load(str(folder), "f32"), load(str(path), "f32", keep_quantized=True)
    assert got.model.layers[0].self_attn.q_proj.qtype == "q8_0"
    assert got.model.embed_tokens.linear.qtype == "q8_0"
    assert got.weight_bytes < 0.35 * ref.weight_bytes  # 34 bytes per 32 weights vs 4 per weight

    q8 = gguf.GGMLQuantizationType.Q8_0
    weights = {}
    specs = LlamaForCausalLM.weights(ref.config)
    for spec, x in st.read_weights(st.checkpoint_files(folder), specs):
        x = np.asarray(x, np.float32)
        weights[spec.name] = jnp.asarray(gguf.quants.dequantize(gguf.quants.quantize(x, q8), q8)
                                         if x.ndim == 2 else x)
    dequantized = SimpleNamespace(config=ref.config,
                                  model=LlamaForCausalLM(ref.config, weights, jnp.float32))
    f32, dq, packed = (Prefill(m, 3, 64)(PROMPTS) for m in (ref, dequantized, got))
    for a, b, c in zip(f32, dq, packed):
        scale = np.abs(a).max()
        np.testing.assert_allclose(c, b, rtol=0, atol=1e-5 * scale)
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


# ---- SmolLM2-135M-Instruct Q4_1 against transformers -----------------------------------------

CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "Explain gravity in one sentence."]
PASSAGE = ("The history of astronomy is long and rich. Ancient civilizations watched the night sky "
           "and tracked the motions of the Sun, the Moon and the planets. They built calendars, "
           "predicted eclipses and told stories about the constellations. Much later, telescopes "
           "revealed moons around Jupiter, the phases of Venus and countless faint stars, and the "
           "idea that the Earth moves around the Sun slowly became accepted by scholars. Today, "
           "space telescopes study galaxies whose light left them billions of years ago.")
STEPS = 24


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if not path.is_file():
        pytest.skip(f"no {path} (set VLLM_JAX_SMOLLM2 or run the CLI once to fetch it)")
    return path


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                 dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def smollm2_run(smollm2, smollm2_hf):
    """One engine step batch: 3 chat prompts decoded greedily, and the passage's prompt logprobs."""
    tok, _ = smollm2_hf
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": c}], tokenize=True,
                                            add_generation_prompt=True, return_dict=True)
                    ["input_ids"]) for c in CHATS]
    passage = tok.encode(PASSAGE)
    engine = LLMEngine(EngineConfig(model_path=str(smollm2), dtype="f32", max_model_len=256,
                                    kvcache_mem_mb=16, max_num_seqs=4))  # packed by default
    return (engine, prompts, passage) + (_greedy_and_passage(engine, prompts, passage),)


def _greedy_and_passage(engine, prompts, passage):
    params = [SamplingParams(temperature=0, max_tokens=STEPS)] * len(prompts)
    params.append(SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    return engine.generate(prompts + [passage], params)


def test_smollm2_weights_stay_quantized(smollm2_run, smollm2):
    loaded = smollm2_run[0].loaded
    assert loaded.model.layers[0].mlp.up_proj.qtype == "q4_1"
    assert loaded.model.embed_tokens.linear.qtype == "q8_0"  # tied: also the lm_head
    assert 0.9 < loaded.weight_bytes / smollm2.stat().st_size < 1.05


def test_smollm2_unpacked_weights_compute_the_same(smollm2_run, smollm2):
    """keep_quantized=False unpacks the blocks at load (gguf-py's dequantization) and runs XLA's
    dense dots: same tokens, and prompt logprobs equal to f32 rounding, as the packed path
    (the CPU kernel here) that the tests above pin to transformers."""
    engine = LLMEngine(EngineConfig(model_path=str(smollm2), dtype="f32", max_model_len=256,
                                    kvcache_mem_mb=16, max_num_seqs=4, keep_quantized=False))
    assert engine.loaded.model.layers[0].mlp.up_proj.qtype is None
    assert engine.loaded.weight_bytes > 3 * smollm2.stat().st_size
    _, prompts, passage, packed = smollm2_run
    unpacked = _greedy_and_passage(engine, prompts, passage)
    for a, b in zip(packed[:-1], unpacked[:-1]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    lp_a, lp_b = ([out[-1].prompt_logprobs[p][passage[p]].logprob for p in range(1, len(passage))]
                  for out in (packed, unpacked))
    np.testing.assert_allclose(lp_b, lp_a, atol=1e-4)


def test_smollm2_tokenizer_matches_transformers(smollm2_run, smollm2_hf):
    ours, (ref, _) = smollm2_run[0].tokenizer, smollm2_hf
    for text in ["Hello world!", "  two spaces, tabs\tand\nnewlines", "café 你好 👍🏽",
                 PASSAGE, "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == ref.encode(text), text
    chat = [{"role": "user", "content": CHATS[0]}]
    text = ours.apply_chat_template(chat)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text) == smollm2_run[1][0]


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_run, smollm2_hf):
    """transformers' logits over each prompt followed by our continuation (one padded batch):
    teacher forcing, so greedy agreement is checked step by step without a generate loop."""
    _, hf = smollm2_hf
    _, prompts, passage, outs = smollm2_run
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)] + [passage]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits.float().numpy()
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


def test_smollm2_greedy_matches_transformers(smollm2_run, smollm2_ref):
    """Each generated token is transformers' argmax after the same prefix, up to the first
    near-tie of the reference (top-2 logit margin < 1e-3), where f32 rounding may pick either."""
    _, prompts, _, outs = smollm2_run
    for ids, out, logits in zip(prompts, outs, smollm2_ref):
        ours = out.outputs[0].token_ids
        steps = logits[len(ids) - 1:len(ids) - 1 + len(ours)]  # the logits each token came from
        top2 = np.sort(steps, -1)[:, -2:]
        ties = np.flatnonzero(top2[:, 1] - top2[:, 0] < 1e-3)
        n = int(ties[0]) if ties.size else len(ours)
        assert n >= 8 or n == len(ours), "a near-tie this early leaves too little to compare"
        assert ours[:n] == steps.argmax(-1)[:n].tolist()


def test_smollm2_prompt_perplexity_matches_transformers(smollm2_run, smollm2_ref):
    _, _, ids, outs = smollm2_run
    assert 90 <= len(ids) <= 128
    ours = [outs[-1].prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]
    lp = torch.log_softmax(torch.from_numpy(smollm2_ref[-1]), -1).numpy()
    ref = [lp[p - 1, ids[p]] for p in range(1, len(ids))]
    ppl_ours, ppl_ref = math.exp(-np.mean(ours)), math.exp(-np.mean(ref))
    assert abs(ppl_ours / ppl_ref - 1) < 0.005, (ppl_ours, ppl_ref)
