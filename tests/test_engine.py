"""Batching, preemption, prefix caching, chunked prefill and compile counts never change results."""
from __future__ import annotations

import numpy as np
import pytest

from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_engine(path, **kw):
    cfg = dict(model_path=str(path), dtype="f32", max_model_len=128, kvcache_mem_mb=4,
               max_num_seqs=16)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def prompts(n, seed=0, lo=5, hi=60):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 300, rng.integers(lo, hi))] for _ in range(n)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llama(model_dir):
    return model_dir("llama")[0]


# every family: sliding windows (gemma3, mixtral), experts (qwen3_moe, mixtral), fused weights
@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen3_moe", "mixtral", "phi3"])
def family(request, model_dir):
    return model_dir(request.param)[0]


@pytest.fixture(scope="module")
def alone(family):
    """Each of 16 prompts run by itself."""
    engine = make_engine(family, enable_prefix_caching=False)
    return {i: tokens(engine.generate([p], GREEDY))[0] for i, p in enumerate(prompts(16))}


def test_batching_never_changes_results(family, alone):
    engine = make_engine(family)
    together = tokens(engine.generate(prompts(16), GREEDY))
    assert together == [alone[i] for i in range(16)]


def test_small_kv_cache_preempts_and_completes(family, alone):
    engine = make_engine(family, kvcache_mem_mb=0.12 * engine_kv_scale(family))
    assert engine.block_manager.num_blocks < 40  # ~15 pages for 16 requests of ~5 pages
    outs = engine.generate(prompts(16), GREEDY)
    assert tokens(outs) == [alone[i] for i in range(16)]
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


def test_padding_tokens_stay_zero_through_the_layers(family):
    """The CPU matmuls skip the zero rows at the end of a step (kernels/cpu_common.h): a step's
    padding tokens embed as 0 and attend to nothing, so in every family their hidden states stay
    0 to the end, whichever row they follow (a prompt chunk, a decode row)."""
    engine = make_engine(family)
    runner, hidden = engine.runner, []
    build = runner.model

    def spying(leaves):
        model = build(leaves)

        def call(*args):
            out = model(*args)
            hidden.append(np.asarray(out[0]))
            return out
        return type("Spy", (), {"__call__": staticmethod(call),
                                "__getattr__": lambda _, name: getattr(model, name)})()

    runner.model = spying
    engine.add_request(prompts(1, seed=4, lo=20, hi=21)[0], GREEDY)
    batch = engine.scheduler.schedule()  # 20 prompt tokens: a bucket of 32
    layout = runner.layout_for(batch)
    ints, _ = runner.prepare(batch, layout)
    runner._forward_pass(runner.leaves, runner.kv, ints, layout, runner.no_prev_tokens)
    (h,) = hidden
    assert h.shape[0] == layout.num_tokens > 20
    assert (h[20:] == 0).all() and (np.abs(h[:20]).max(axis=1) > 0).all()


def engine_kv_scale(path) -> float:
    """KV bytes per token relative to the 2-layer, 2 x 16-wide KV-head llama."""
    cfg = make_engine(path, kvcache_mem_mb=1).model_config
    return cfg.num_layers * cfg.num_kv_heads * cfg.head_dim / (2 * 2 * 16)


def test_prefix_caching_reuses_pages_and_output(family):
    shared = prompts(1, seed=7, lo=70, hi=71)[0]
    second = shared + [11, 12, 13]
    cold = make_engine(family, enable_prefix_caching=False)
    expect = tokens(cold.generate([second], GREEDY))
    engine = make_engine(family)
    engine.generate([shared], GREEDY)
    hits_before = engine.block_manager.prefix_hits
    out = engine.generate([second], GREEDY)
    assert engine.block_manager.prefix_hits - hits_before == len(shared) // 16
    assert out[0].num_cached_tokens == len(shared) // 16 * 16
    assert tokens(out) == expect


def test_chunked_prefill_matches_unchunked(family):
    ps = prompts(4, seed=3, lo=50, hi=100)
    whole = tokens(make_engine(family, max_num_batched_tokens=128).generate(ps, GREEDY))
    chunked = tokens(make_engine(family, max_num_batched_tokens=16).generate(ps, GREEDY))
    assert chunked == whole


def staggered(engine, groups, every=3):
    """Each group of prompts arrives `every` steps after the one before, while the earlier ones
    decode -> (token ids per prompt, how many steps carried decode rows and prompt chunks)."""
    schedule, mixed_steps = engine.scheduler.schedule, []

    def recording():
        batch = schedule()
        mixed_steps.append(batch is not None and not batch.decode and batch.num_decode_rows > 0)
        return batch

    engine.scheduler.schedule = recording
    pending, ids, done, steps = list(groups), [], {}, 0
    while pending or len(done) < len(ids):
        if pending and steps % every == 0:
            ids += [engine.add_request(p, GREEDY) for p in pending.pop(0)]
        done.update((o.request_id, o) for o in engine.step() if o.finished)
        steps += 1
    return tokens(done[i] for i in ids), sum(mixed_steps)


@pytest.mark.parametrize("name", ["llama", "gemma3"])  # gemma3: sliding-window layers
def test_mixed_steps_match_separate_prefill_and_decode_steps(model_dir, name):
    path = model_dir(name)[0]
    groups = [prompts(3, seed=11), prompts(2, seed=12, lo=40, hi=90), prompts(3, seed=13)]
    kw = dict(max_num_batched_tokens=32, enable_prefix_caching=False)
    separate, none_mixed = staggered(make_engine(path, mixed_steps=False, **kw), groups)
    mixed, num_mixed = staggered(make_engine(path, **kw), groups)
    assert none_mixed == 0 and num_mixed >= 3
    assert mixed == separate


def test_no_compiles_after_warmup(llama):
    engine = make_engine(llama, max_num_seqs=8, max_num_batched_tokens=64)
    engine.warmup()
    compiled = engine.num_compiles
    mixed = [(p, GREEDY) for p in prompts(5, seed=5)]
    mixed += [(p, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=20, seed=1))
              for p in prompts(3, seed=6, lo=60, hi=120)]
    mixed += [(prompts(1, seed=8)[0], SamplingParams(n=2, temperature=1.0, max_tokens=12))]
    outs = engine.generate([p for p, _ in mixed], [s for _, s in mixed])
    assert all(o.finished for o in outs)
    assert engine.num_compiles == compiled


def test_step_updates_the_kv_cache_in_place(llama):
    """Every layer's K and V, donated to the step, are its outputs' buffers (XLA's aliasing):
    the layers, called as one function per distinct layer, update the cache in place."""
    from vllm_jax.engine.scheduler import ScheduledBatch
    from vllm_jax.runner.model_runner import StepLayout

    runner = make_engine(llama).runner
    for layout in (StepLayout(2, 2, runner.max_pages, True), StepLayout(16, 2, runner.max_pages,
                                                                          False)):
        ints, floats = runner.prepare(ScheduledBatch(False, [], []), layout)
        compiled = runner._step.lower(runner.leaves, runner.kv, ints, floats, layout,
                                    runner.no_prev_tokens).compile()
        memory = compiled.memory_analysis()
        assert memory.alias_size_in_bytes >= sum(c.nbytes for c in runner.kv)
        assert memory.temp_size_in_bytes < runner.kv[0].nbytes


def test_decode_warmup_leaves_only_prompt_steps_to_compile(llama, caplog):
    """--warmup decode compiles the decode buckets at start; later only prefill-shaped steps
    (prompt chunks, mixed steps) compile, each once."""
    engine = make_engine(llama, max_num_seqs=8, max_num_batched_tokens=64, warmup="decode")
    work = prompts(6, seed=5)
    with caplog.at_level("DEBUG", logger="vllm_jax"):
        engine.generate(work, GREEDY)
        compiled = engine.num_compiles
        engine.generate(work, GREEDY)
    assert engine.num_compiles == compiled
    layouts = [r.args[1] for r in caplog.records if r.msg.startswith("compiling")]
    assert layouts and not any(layout.decode for layout in layouts)


def test_unknown_warmup_is_a_config_error(llama):
    from vllm_jax.config import ConfigError

    with pytest.raises(ConfigError, match="warmup='eager'"):
        make_engine(llama, warmup="eager")


def test_the_step_budget_learns_only_from_steps_that_did_not_compile(llama):
    engine = make_engine(llama, max_num_seqs=8, max_num_batched_tokens=64, mixed_step_slowdown=2)
    run, quiet = engine.runner.run, []  # per dispatched step: it compiled nothing

    def counting_run(*args, **kwargs):
        compiled = engine.num_compiles
        out = run(*args, **kwargs)
        quiet.append(engine.num_compiles == compiled)
        return out

    engine.runner.run = counting_run
    engine.generate(prompts(4, seed=21), GREEDY)
    # a step dispatched before its rows were known to be finished is never read, nor measured
    quiet = sum(quiet) - (engine.in_flight is not None and not engine.in_flight.compiled)
    steps = engine.scheduler.step_budget.steps
    assert 0 < len(steps) == min(quiet, steps.maxlen)
    assert all(seconds > 0 for _, seconds in steps)


def test_stop_strings_max_tokens_and_eos(llama):
    engine = make_engine(llama)
    p = prompts(1, seed=9)[0]
    full = engine.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop and len(text) > 6
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.find(stop)]
    assert full.outputs[0].finish_reason == "length" and len(full.outputs[0].token_ids) == 24
    tok = full.outputs[0].token_ids[3]
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == full.outputs[0].token_ids[:4] and out.stop_reason == tok
    decode = engine.tokenizer.decode  # as vLLM: the stopping token is counted, its text left out
    assert out.text == decode(out.token_ids[:3]) != decode(out.token_ids)
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               stop_token_ids=[tok], min_tokens=10))[0]
    assert tok not in out.outputs[0].token_ids[:10]
    # past the 8 ids a step bans per row by default: every listed id stays banned
    vocab = engine.model_config.vocab_size
    produced = list(dict.fromkeys(full.outputs[0].token_ids[:10]))
    fillers = [t for t in range(vocab) if t not in full.outputs[0].token_ids][:10]
    many = fillers + produced
    out = engine.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                               stop_token_ids=many, min_tokens=10))[0]
    assert not set(out.outputs[0].token_ids) & set(many)


def test_over_long_prompt_is_rejected(llama):
    engine = make_engine(llama)
    with pytest.raises(ValueError, match="maximum context length is 128 tokens"):
        engine.add_request(list(range(3, 200)), GREEDY)
    assert not engine.has_unfinished_requests()
