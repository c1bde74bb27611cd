"""Model numerics against transformers (float32): every prompt position and 32 greedy steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.sampling_params import SamplingParams

CASES = {
    "llama_sharded": ("llama", {"shards": True}),
    "llama_tied": ("llama_tied", {}),
    "llama31_rope_scaling": ("llama31", {}),
    "mistral_sliding_window": ("mistral", {}),
    "qwen2_bias": ("qwen2", {}),
    "qwen3_qk_norm": ("qwen3", {}),
    "gemma3_sliding_and_global_layers": ("gemma3", {}),
    "qwen3_moe_with_a_dense_layer": ("qwen3_moe", {}),
    "qwen3_moe_every_second_layer_sparse": ("qwen3_moe", {
        "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": []}),
    "mixtral_moe_sliding_window": ("mixtral", {}),
    "phi3_fused_weights_longrope_short": ("phi3", {}),
}
PROMPT_LEN = 40  # longer than the sliding windows of Mistral (24) and the Gemma 3 model (12)


def engine_for(path, **kw):
    cfg = dict(model_path=str(path), dtype="f32", max_model_len=256, kvcache_mem_mb=4,
               max_num_seqs=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(model_dir, case):
    arch, opts = CASES[case]
    check_against_transformers(*model_dir(arch, **opts))


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_every_attention_backend_keeps_gemma3_per_layer_windows(model_dir, backend):
    """Sliding and global layers through the XLA reference and the Pallas kernels (the tests
    above run the C++ kernels), each layer with its own window."""
    check_against_transformers(*model_dir("gemma3"), kernel_backend=backend, max_tokens=8)


def check_against_transformers(path, hf, max_tokens=32, **engine_options):
    engine = engine_for(path, **engine_options)
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 300, PROMPT_LEN)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=20,
                            prompt_logprobs=20)
    out = engine.generate([prompt], params)[0]
    tokens = out.outputs[0].token_ids

    with torch.no_grad():
        ref_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)[0, PROMPT_LEN:]
    assert tokens == ref_tokens.tolist()

    ref = torch.log_softmax(torch.tensor(hf_logits(hf, prompt + tokens)), -1).numpy()
    scale = np.abs(hf_logits(hf, prompt)).max()
    # prompt positions: the log-probabilities of the top 20 tokens after every prefix
    for p in range(1, PROMPT_LEN):
        for tok, lp in out.prompt_logprobs[p].items():
            assert abs(lp.logprob - ref[p - 1, tok]) <= 1e-4 * scale, (p, tok)
    # decode steps: the same through the paged decode path
    for i, step in enumerate(out.outputs[0].logprobs):
        assert len(step) >= 20
        for tok, lp in step.items():
            assert abs(lp.logprob - ref[PROMPT_LEN - 1 + i, tok]) <= 1e-4 * scale, (i, tok)


# the cache rounds K and V to 11 (f16) or 8 (bf16) significant bits: bounds a few times that
HALF_KV_BOUND = {"f16": 2e-3, "bf16": 2e-2}


@pytest.mark.parametrize("kv,backend", [("f16", "auto"), ("bf16", "auto"), ("f16", "xla")])
def test_half_kv_cache_stays_close_to_transformers(model_dir, kv, backend):
    path, hf = model_dir("llama")
    engine = engine_for(path, kv_cache_dtype=kv, kernel_backend=backend)
    assert engine.runner.kv[0].dtype == {"f16": np.float16, "bf16": "bfloat16"}[kv]
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 300, PROMPT_LEN)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    out = engine.generate([prompt], params)[0]
    tokens = out.outputs[0].token_ids
    ref = torch.log_softmax(torch.tensor(hf_logits(hf, prompt + tokens)), -1).numpy()
    scale = np.abs(hf_logits(hf, prompt)).max()
    worst = max(abs(lp.logprob - ref[PROMPT_LEN - 1 + i, tok]) / scale
                for i, step in enumerate(out.outputs[0].logprobs) for tok, lp in step.items())
    assert 0 < worst <= HALF_KV_BOUND[kv], worst


def test_unsupported_architecture_is_one_line(tmp_path):
    from vllm_jax.config import ConfigError
    from vllm_jax.models import from_hf

    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'.*Llama"):
        from_hf({"architectures": ["GPT2LMHeadModel"]})


def test_phi3_longrope_long_factors_past_the_original_context(model_dir):
    """Past original_max_position_embeddings (256) LongRoPE switches to its long factors: the
    engine chooses them once for max_model_len 512, transformers for a sequence over 256."""
    path, hf = model_dir("phi3")
    engine = engine_for(path, max_model_len=512, kvcache_mem_mb=8)
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 300, 300)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=5)
    out = engine.generate([prompt], params)[0]
    ref = torch.log_softmax(torch.tensor(hf_logits(hf, prompt)), -1).numpy()
    scale = np.abs(hf_logits(hf, prompt)).max()
    for p in range(1, len(prompt)):
        for tok, lp in out.prompt_logprobs[p].items():
            assert abs(lp.logprob - ref[p - 1, tok]) <= 1e-4 * scale, (p, tok)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_router_logits_and_choices_match_transformers(model_dir, arch):
    from flax import nnx

    from vllm_jax import forward_logits, load_model

    path, hf = model_dir(arch)
    model, cfg, _ = load_model(str(path), "f32")
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 300, PROMPT_LEN)]
    capture = nnx.capture(forward_logits, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, seen = capture(model, np.asarray([prompt]))
    ours = [np.asarray(v.get_value()[0][0]) for k, v in nnx.to_flat_state(seen)
            if k[-1] == "route"]  # each call's (router logits, weights, experts)
    with torch.no_grad():
        theirs = [r.float().numpy() for r in
                  hf(torch.tensor([prompt]), output_router_logits=True).router_logits]
    assert len(ours) == len(theirs) == sum(cfg.is_moe(i) for i in range(cfg.num_layers))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
        k = cfg.num_experts_per_tok
        assert (np.sort(np.argsort(-a, -1)[:, :k], -1) == np.sort(np.argsort(-b, -1)[:, :k], -1)).all()


def test_gemma3_text_tower_of_a_conditional_generation_checkpoint(tmp_path):
    """Gemma3ForConditionalGeneration files nest the text config and prefix the language
    model's tensors (language_model.model.*); the vision tower is ignored."""
    import transformers
    from conftest import save_tokenizer

    tok = save_tokenizer(tmp_path)
    n = len(tok)
    text = dict(vocab_size=n, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=12,
                initializer_range=0.02, rms_norm_eps=1e-5)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=n - 1,
                                       boi_token_index=n - 2, eoi_token_index=n - 3)
    torch.manual_seed(5)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    check_against_transformers(tmp_path, hf, max_tokens=8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_checkpoints_stay_16_bit_on_the_cpu(model_dir, tmp_path, dtype):
    """A bf16/f16 checkpoint run in float32 keeps its matrices 16-bit (the C++ kernel widens
    them in registers: exact products, float32 sums) and computes transformers' float32 model
    of the same weights."""
    import copy

    import transformers

    path, hf = model_dir("llama")
    half = copy.deepcopy(hf).to(getattr(torch, dtype))
    half.save_pretrained(tmp_path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (path / f).exists():
            (tmp_path / f).write_bytes((path / f).read_bytes())
    engine = engine_for(tmp_path)
    layer = engine.loaded.model.layers[0]
    assert layer.mlp.up_proj.weight[...].dtype == dtype  # 16-bit in memory
    assert layer.input_layernorm.weight[...].dtype == "float32"
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    check_against_transformers(tmp_path, reference.eval(), max_tokens=8)


def test_bf16_compute_keeps_an_f16_cache_on_the_cpu(model_dir):
    """XLA's CPU scatters bf16 by converting the whole cache to float32 and back; auto picks
    f16 there (an explicit bf16 cache is kept)."""
    path, _ = model_dir("llama")
    assert engine_for(path, dtype="bf16").runner.kv[0].dtype == np.float16
    assert engine_for(path, dtype="bf16", kv_cache_dtype="bf16").runner.kv[0].dtype == "bfloat16"
