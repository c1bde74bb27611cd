"""Speculative decoding changes nothing but speed: greedy output is identical with and without
it, sampled output has the same distribution, and the rejection sampler's output distribution
is the target's."""
from __future__ import annotations

import copy
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vllm_jax import cli, server
from vllm_jax.api import LLM
from vllm_jax.args import Parser, add_engine_args, engine_config
from vllm_jax.config import ConfigError, EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.engine.speculative import SpeculativeConfig, make_speculator, ngram_proposal
from vllm_jax.runner.rejection import rejection_sample
from vllm_jax.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 1}
P_VALUE = 1e-3  # a chi-square test fails below this: 1 false alarm in 1,000 runs


def make_engine(path, **kw):
    cfg = dict(model_path=str(path), dtype="f32", max_model_len=160, kvcache_mem_mb=4,
               max_num_seqs=16)
    return LLMEngine(EngineConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def llama(model_dir):
    """Small weights: each token depends mostly on the last one, so greedy output falls into
    loops that n-gram proposals predict (and early tokens it does not)."""
    return model_dir("llama", initializer_range=0.05)[0]


@pytest.fixture(scope="module")
def plain(llama):
    return make_engine(llama)


@pytest.fixture(scope="module")
def ngram(llama):
    return make_engine(llama, speculative_config=NGRAM)


@pytest.fixture(scope="module")
def perturbed_draft(model_dir, tmp_path_factory):
    """The target with noise on its layers' weights (same embeddings, head and tokenizer): a
    model that agrees with the target often but not always, as a real draft model does."""
    import torch

    path, model = model_dir("llama", initializer_range=0.05)
    draft = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, w in draft.named_parameters():
            if ".layers." in name:
                w.add_(torch.randn_like(w) * w.std() * 0.1)
    out = tmp_path_factory.mktemp("draft")
    draft.save_pretrained(out, safe_serialization=True)
    for f in path.iterdir():
        if "token" in f.name:
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def drafted(llama, perturbed_draft):
    return make_engine(llama, speculative_config={"model": str(perturbed_draft),
                                                  "num_speculative_tokens": 3})


def random_prompts(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 300, rng.integers(4, 40))] for _ in range(n)]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_ngram_proposal_takes_what_followed_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_proposal(tokens, 2, n_max=3, n_min=1) == [7, 8]  # "2 3" last came before 7 8
    assert ngram_proposal(tokens + [7], 3, n_max=1, n_min=1) == [8, 5, 2]
    assert ngram_proposal([4, 5, 6], 2, n_max=3, n_min=1) == []
    assert ngram_proposal([1, 2, 3, 1, 2], 5, n_max=2, n_min=2) == [3, 1, 2]


@pytest.mark.parametrize("spec, error", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a \"model\""),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
      "prompt_lookup_max": 2}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown"),
])
def test_bad_speculative_config_is_refused(spec, error):
    with pytest.raises(ConfigError, match=error):
        SpeculativeConfig.parse(spec)


def test_speculative_config_defaults_as_vllm():
    assert SpeculativeConfig.parse({"model": "m", "num_speculative_tokens": 3}).method == (
        "draft_model")
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3,
                                 "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)


@pytest.mark.parametrize("argv, error", [
    (["--num-speculative-tokens", "3"], "needs --speculative-model"),
    (["--speculative-model", "smollm2-135m"], "needs --num-speculative-tokens"),
    (["--speculative-model", "/no/such/model", "--num-speculative-tokens", "2"], "not found"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 17}'],
     "num_speculative_tokens must be an integer in \\[1, 16\\]"),
    (["--speculative-config", "[1]"], "expected a JSON object"),
    (["--num-speculative-tokens", "0", "--speculative-model", "x"], "must be positive"),
])
def test_bad_speculative_flags_are_argparse_errors(argv, error, capsys):
    parser = Parser(prog="vllm_jax")
    add_engine_args(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2
    assert re.search(f"vllm_jax: error: .*{error}", capsys.readouterr().err)


@pytest.mark.parametrize("build_parser", [cli.build_parser, server.build_parser])
def test_speculative_flags_become_the_engine_config(build_parser):
    parser = build_parser()
    args = parser.parse_args(["--speculative-model", "smollm2-135m",
                              "--num-speculative-tokens", "3"])
    assert engine_config(args).speculative_config == {"model": "smollm2-135m",
                                                      "num_speculative_tokens": 3}
    args = parser.parse_args(["--speculative-config", json.dumps(NGRAM)])
    assert engine_config(args).speculative_config == NGRAM
    assert engine_config(parser.parse_args([])).speculative_config is None


def test_speculation_off_above_disable_by_batch_size(llama, plain):
    engine = make_engine(llama, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = random_prompts(3, seed=8)
    assert token_ids(engine.generate(prompts, params)) == token_ids(
        plain.generate(prompts, params))
    assert engine.speculator.stats.steps == 0  # three sequences decoded together throughout
    engine.generate(prompts[:2], params)
    assert engine.speculator.stats.steps > 0


def test_no_compiles_after_warmup_with_a_draft_model(llama, perturbed_draft):
    engine = make_engine(llama, max_num_seqs=2, max_num_batched_tokens=32,
                         speculative_config={"model": str(perturbed_draft),
                                             "num_speculative_tokens": 2})
    engine.warmup()
    drafter = engine.speculator.drafter
    compiled = engine.num_compiles, drafter.runner.num_compiles
    prompts = random_prompts(3, seed=9)
    engine.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                  SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20)])
    engine.generate(prompts[2:], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert engine.speculator.stats.steps > 0
    assert (engine.num_compiles, drafter.runner.num_compiles) == compiled


def test_draft_model_with_another_vocabulary_is_refused(llama, model_dir):
    other = model_dir("llama", vocab_size=400)[0]
    with pytest.raises(ConfigError, match="vocabulary"):
        make_engine(llama, speculative_config={"model": str(other),
                                               "num_speculative_tokens": 2})


def test_llm_api_takes_a_speculative_config(llama, plain):
    llm = LLM(str(llama), dtype="f32", max_model_len=160, kvcache_mem_mb=4,
              speculative_config=NGRAM)
    prompts = random_prompts(2, seed=7)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert token_ids(got) == token_ids(plain.generate(prompts, params))
    assert llm.llm_engine.speculator.stats.accepted_tokens > 0


def test_greedy_output_identical_with_ngram_speculation(plain, ngram):
    prompts = random_prompts()
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, logprobs=2)
    before = ngram.speculator.stats.accepted_tokens
    want, got = plain.generate(prompts, params), ngram.generate(prompts, params)
    assert token_ids(got) == token_ids(want)
    assert ngram.speculator.stats.accepted_tokens - before > 40  # proposals were accepted
    for w, g in zip(want, got):
        lw = [e[t].logprob for e, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
        lg = [e[t].logprob for e, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
        np.testing.assert_allclose(lg, lw, atol=1e-4)
        assert [sorted(e) for e in g.outputs[0].logprobs] == [
            sorted(e) for e in w.outputs[0].logprobs]


def test_greedy_penalties_and_min_tokens_identical_with_speculation(plain, ngram):
    """Position j of a verification step is banned and penalised as output token step + j,
    over a history holding the j proposals before it."""
    prompts = random_prompts(4, seed=10)
    out = token_ids(plain.generate(prompts, SamplingParams(temperature=0, max_tokens=40,
                                                           ignore_eos=True)))
    for params in (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                  repetition_penalty=1.2, frequency_penalty=0.1),
                   SamplingParams(temperature=0, max_tokens=40, min_tokens=30,
                                  stop_token_ids=sorted({o[35] for o in out}))):
        before = ngram.speculator.stats.accepted_tokens
        assert token_ids(ngram.generate(prompts, params)) == token_ids(
            plain.generate(prompts, params))
        assert ngram.speculator.stats.accepted_tokens > before


@pytest.mark.parametrize("backend", ["xla", "pallas_interpret"])
def test_greedy_identical_with_speculation_on_each_attention_backend(llama, backend):
    """The verification step's several query tokens a row go through each backend's ragged
    attention (the C++ kernel runs in the tests above)."""
    engine = make_engine(llama, attention_backend=backend, max_num_seqs=2)
    prompts = random_prompts(2, seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    want = token_ids(engine.generate(prompts, params))
    engine.speculator = make_speculator(engine, NGRAM)
    assert token_ids(engine.generate(prompts, params)) == want
    assert engine.speculator.stats.accepted_tokens > 0


def test_preemption_with_speculation_keeps_greedy_output_and_frees_every_page(llama, plain):
    """A KV cache of ~38 pages for 12 sequences of up to 6: proposals only take free pages,
    preempted sequences are recomputed, and every page comes back."""
    engine = make_engine(llama, kvcache_mem_mb=0.3, max_num_seqs=12, mixed_steps=False,
                         speculative_config=NGRAM)
    prompts = random_prompts(12, seed=12)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    assert token_ids(engine.generate(prompts, params)) == token_ids(
        plain.generate(prompts, params))
    assert engine.scheduler.num_preemptions > 0 and engine.speculator.stats.accepted_tokens > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_stops_inside_an_accepted_run_end_the_output_there(plain, ngram):
    prompts = random_prompts(n=4, seed=1)
    free = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for out, prompt in zip(token_ids(plain.generate(prompts, free)), prompts):
        # past token 30 the output loops and n-gram runs are accepted
        for params in (SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[out[40]]),
                       SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                                      stop=[plain.tokenizer.decode(out[35:37])]),
                       SamplingParams(temperature=0, max_tokens=37, ignore_eos=True)):
            want, got = plain.generate([prompt], params)[0], ngram.generate([prompt], params)[0]
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            assert got.outputs[0].text == want.outputs[0].text
            assert got.outputs[0].finish_reason == want.outputs[0].finish_reason


def test_greedy_output_identical_with_a_draft_model(plain, drafted):
    prompts = random_prompts(seed=4)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    before = copy.copy(drafted.speculator.stats)
    assert token_ids(drafted.generate(prompts, params)) == token_ids(
        plain.generate(prompts, params))
    after = drafted.speculator.stats
    accepted = after.accepted_tokens - before.accepted_tokens
    assert 50 < accepted < after.draft_tokens - before.draft_tokens  # some rejected too


def test_target_drafting_for_itself_accepts_every_proposal(llama):
    engine = make_engine(llama, speculative_config={"model": str(llama),
                                                    "num_speculative_tokens": 4})
    for params in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                   SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)):
        engine.generate(random_prompts(4, seed=5), params)  # p = q: min(1, p/q) = 1
    stats = engine.speculator.stats
    assert stats.accepted_tokens == stats.draft_tokens > 100


EDIT_TASK = ("Fix the typos in this text and write it out again: The quick brown fox jumpd over "
             "the lazy dogg. Teh dog was not amused, and it barkd at the fox for a long tmie.")


def test_default_model_greedy_identical_with_ngram_and_self_drafting(real_model):
    """SmolLM2 on an edit task (its answer copies the input): plain, n-gram and the model
    drafting for itself give the same tokens, and the proposals get accepted."""
    path = str(real_model("smollm2-135m"))
    engine = make_engine(path, max_model_len=256, max_num_seqs=2, kvcache_mem_mb=32,
                         speculative_config={"model": path, "num_speculative_tokens": 4})
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": EDIT_TASK}])
    params = SamplingParams(temperature=0, max_tokens=48)
    drafting = engine.speculator
    ngram = make_speculator(engine, NGRAM)
    runs = {}
    for name, speculator in [("plain", None), ("ngram", ngram), ("draft", drafting)]:
        engine.speculator = speculator
        runs[name] = engine.generate([prompt], params)[0].outputs[0]
    assert runs["ngram"].token_ids == runs["plain"].token_ids == runs["draft"].token_ids
    assert "jumped" in runs["plain"].text  # it copies the text, typos fixed
    assert ngram.stats.accepted_tokens > 10
    assert drafting.stats.accepted_tokens == drafting.stats.draft_tokens > 20


def joint_counts(engine, prompt, params, n):
    """How often each run of the first 3 tokens came out over n seeds. Requests go in
    batches of max_num_seqs: speculation runs in steps that only decode."""
    batch = engine.config.max_num_seqs
    outs = [o for _ in range(n // batch) for o in engine.generate([prompt] * batch, params)]
    runs = [tuple(o.outputs[0].token_ids[:3]) for o in outs]
    keys, counts = np.unique(np.array(runs), axis=0, return_counts=True)
    return dict(zip(map(tuple, keys), counts))


def test_sampled_distribution_unchanged_by_ngram_speculation(plain, ngram):
    """Chi-square on the joint distribution of the first 3 tokens (top_k=3: 27 outcomes),
    with a penalty over the history, so proposals change what later positions sample."""
    prompt = plain.generate(random_prompts(1, seed=2), SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].token_ids  # it loops
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=6, ignore_eos=True,
                            presence_penalty=0.5)
    assert_same_distribution(plain, ngram, prompt, params)


def test_sampled_distribution_unchanged_by_a_draft_model(plain, drafted):
    """As above, with proposals drawn from the draft's own distribution q."""
    prompt = random_prompts(1, seed=6)[0]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True)
    assert_same_distribution(plain, drafted, prompt, params)


def assert_same_distribution(plain, speculative, prompt, params):
    """Joint counts of the first tokens over 1,504 seeds each way, proposals mostly accepted;
    chi-square of the two count tables."""
    before = speculative.speculator.stats.accepted_tokens
    want = joint_counts(plain, prompt, params, 1504)
    got = joint_counts(speculative, prompt, params, 1504)
    assert speculative.speculator.stats.accepted_tokens - before > 300
    keys = sorted(set(want) | set(got))
    table = np.array([[want.get(k, 0) for k in keys], [got.get(k, 0) for k in keys]])
    assert stats.chi2_contingency(table).pvalue > P_VALUE, table


def exact_output(p, q):
    """The rejection sampler's exact output for one proposal x ~ q: P(accept x) and
    P(reject, then emit t), each [V]."""
    accept = np.minimum(p, q)  # q(x) min(1, p(x) / q(x))
    residual = np.maximum(p - q, 0)
    return accept, (1 - accept.sum()) * residual / residual.sum()


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampler_output_distribution_is_exact(point_mass):
    rng = np.random.default_rng(3)
    vocab, n = 6, 40_000
    p = rng.dirichlet(np.ones(vocab))
    q = np.eye(vocab)[2] if point_mass else rng.dirichlet(np.ones(vocab))
    accept, reject = exact_output(p, q)
    np.testing.assert_allclose(accept + reject, p, atol=1e-12)  # the target, exactly
    keys = jax.random.split(jax.random.key(0), (n, 2))
    drafts = jax.random.categorical(jax.random.key(1), jnp.log(q), shape=(n, 1)).astype(jnp.int32)
    p_dev = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, 2, vocab))
    q_dev = None if point_mass else jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, 1, vocab))
    tokens, accepted = jax.jit(rejection_sample)(p_dev, drafts, q_dev, keys)
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)[:, 0]
    outcome = np.where(accepted, np.asarray(drafts)[:, 0], vocab + tokens[:, 0])
    observed = np.bincount(outcome, minlength=2 * vocab)
    expected = np.concatenate([accept, reject]) * n
    seen = expected > 0
    assert observed[~seen].sum() == 0
    assert stats.chisquare(observed[seen], expected[seen]).pvalue > P_VALUE
    bonus = np.bincount(tokens[accepted, 1], minlength=vocab)  # after an acceptance: from p
    assert stats.chisquare(bonus, p * accepted.sum()).pvalue > P_VALUE
