"""Sampling against its definition: softmax distribution, top-k/p, min-p, penalties, seeds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.runner.sampler import SamplingArrays, apply_penalties, sample
from vllm_jax.sampling_params import SamplingParams

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)


def arrays(n, **kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence=0.0, frequency=0.0,
                repetition=1.0, seed=0, step=0, min_tokens=0)
    base.update(kw)
    cols = {k: jnp.full((n,), v, jnp.int32 if k in ("top_k", "seed", "step", "min_tokens")
                        else jnp.float32) for k, v in base.items()}
    if "seeds" in kw:
        cols["seed"] = jnp.asarray(kw.pop("seeds"), jnp.int32)
    cols.pop("seeds", None)
    return SamplingArrays(**cols, banned=jnp.full((n, 1), -1, jnp.int32))


def draw(n=4000, **kw):
    logits = jnp.tile(LOGITS, (n, 1))
    s = arrays(n, **kw)._replace(seed=jnp.arange(n, dtype=jnp.int32))
    toks, *_ = jax.jit(lambda l, s: sample(l, s, greedy_only=False, want_logprobs=False))(logits, s)
    return np.bincount(np.asarray(toks), minlength=len(LOGITS))


def chi_square(counts, probs):
    mask = probs > 0
    expected = counts.sum() * probs
    assert counts[~mask].sum() == 0
    return float((((counts - expected) ** 2)[mask] / expected[mask]).sum()), int(mask.sum()) - 1


# 99.9% quantiles of the chi-square distribution by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_temperature_sampling_matches_softmax(temperature):
    stat, df = chi_square(draw(temperature=temperature), softmax(LOGITS / temperature))
    assert stat < CHI2_999[df]


def test_top_k_top_p_min_p_restrict_the_distribution():
    p = softmax(LOGITS)
    k3 = np.where(np.arange(8) < 3, p, 0)
    stat, df = chi_square(draw(top_k=3), k3 / k3.sum())
    assert stat < CHI2_999[df]
    keep = (np.cumsum(p) - p) < 0.7  # nucleus: tokens until 70% of the mass is covered
    tp = np.where(keep, p, 0)
    stat, df = chi_square(draw(top_p=0.7), tp / tp.sum())
    assert stat < CHI2_999[df]
    mp = np.where(p >= 0.2 * p.max(), p, 0)
    stat, df = chi_square(draw(min_p=0.2), mp / mp.sum())
    assert stat < CHI2_999[df]


def test_top_k_1_is_greedy():
    counts = draw(n=200, top_k=1, temperature=1.3)
    assert counts[0] == 200


def test_penalties_follow_their_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 10)).astype(np.float32)
    history = np.array([[1, 2, 2, 5, 5, 5, -1], [0, 9, 9, 3, -1, -1, -1]], np.int32)
    num_prompt = np.array([2, 1], np.int32)
    s = arrays(2, presence=0.5, frequency=0.25, repetition=1.3)
    got = np.asarray(apply_penalties(jnp.asarray(logits), s, jnp.asarray(history),
                                     jnp.asarray(num_prompt)))
    want = logits.copy()
    for r in range(2):
        toks = [t for t in history[r] if t >= 0]
        outs = toks[num_prompt[r]:]
        for t in set(toks):
            want[r, t] = want[r, t] / 1.3 if want[r, t] > 0 else want[r, t] * 1.3
        for t in set(outs):
            want[r, t] -= 0.25 * outs.count(t) + 0.5
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.fixture(scope="module")
def engine(model_dir):
    path = model_dir("llama")[0]
    return LLMEngine(EngineConfig(model_path=str(path), dtype="f32", max_model_len=128,
                                  kvcache_mem_mb=4, max_num_seqs=8))


def test_seed_gives_same_tokens_whatever_the_batch(engine):
    rng = np.random.default_rng(0)
    p = [int(t) for t in rng.integers(3, 300, 20)]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    alone = engine.generate([p], seeded)[0].outputs[0].token_ids
    others = [[int(t) for t in rng.integers(3, 300, 30)] for _ in range(5)]
    mix = engine.generate(others[:2] + [p] + others[2:],
                          [SamplingParams(temperature=0.9, max_tokens=20)] * 2 + [seeded]
                          + [SamplingParams(temperature=0, max_tokens=10)] * 3)
    assert mix[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, max_tokens=16, seed=99, ignore_eos=True)
    assert engine.generate([p], other_seed)[0].outputs[0].token_ids != alone


def reference_penalties(logits, prompt, outs, rep, freq, pres):
    want = logits.copy()
    for t in set(prompt + outs):
        want[t] = want[t] / rep if want[t] > 0 else want[t] * rep
    for t in set(outs):
        want[t] -= freq * outs.count(t) + pres
    return want


def test_penalised_greedy_matches_transformers_loop(engine, model_dir):
    import torch

    hf = model_dir("llama")[1]
    p = [5, 6, 7, 8, 9, 10, 5, 6]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                            repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4)
    got = engine.generate([p], params)[0].outputs[0].token_ids
    outs = []
    for _ in range(10):
        with torch.no_grad():
            logits = hf(torch.tensor([p + outs])).logits[0, -1].numpy()
        outs.append(int(np.argmax(reference_penalties(logits, p, outs, 1.5, 0.7, 0.4))))
    assert got == outs
