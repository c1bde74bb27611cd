"""Async scheduling (the next step dispatched before the previous one is read) gives exactly what
synchronous steps give: the same tokens, texts and finish reasons, through stops, n > 1,
preemption and prefix hits, and so do several decode steps in one dispatch; steps that need
their tokens on the host are read at once; a step that fails on the device while the next one
runs still costs only its own request."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from vllm_jax.args import Parser, add_engine_args, engine_config
from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.engine.step_cost import MixedStepBudget
from vllm_jax.sampling_params import SamplingParams, StructuredOutputs

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LOGPROB_TOLERANCE = 1e-4  # batch composition differs by the rows that run one step too many


def make_engine(path, **kw) -> LLMEngine:
    cfg = dict(model_path=str(path), dtype="f32", max_model_len=128, kvcache_mem_mb=4,
               max_num_seqs=16)
    return LLMEngine(EngineConfig(**{**cfg, **kw}))


def prompts(n, seed=0, lo=5, hi=60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 300, rng.integers(lo, hi))] for _ in range(n)]


def generate(engine, prompts, params, async_scheduling: bool):
    engine.config.async_scheduling = async_scheduling
    outs = engine.generate(prompts, params)
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    return outs


def assert_same_outputs(sync, overlapped):
    for a, b in zip(sync, overlapped, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (
                y.token_ids, y.text, y.finish_reason, y.stop_reason)
            assert_logprobs_close(x.logprobs, y.logprobs)
        assert_logprobs_close(a.prompt_logprobs, b.prompt_logprobs)


def assert_logprobs_close(a, b):
    assert (a is None) == (b is None)
    for x, y in zip(a or [], b or [], strict=True):
        assert (x is None) == (y is None) and list(x or {}) == list(y or {})
        for k in x or {}:
            assert x[k].logprob == pytest.approx(y[k].logprob, abs=LOGPROB_TOLERANCE)


@pytest.fixture(scope="module")
def llama(model_dir):
    return model_dir("llama")[0]


@pytest.fixture(scope="module")
def small_cache_engine(llama):
    """15 pages for 16 requests of up to 7 pages: preemption guaranteed."""
    return make_engine(llama, kvcache_mem_mb=0.12)


def workload(engine) -> tuple[list, list]:
    """Prompts of 5-60 tokens, four sharing a 40-token prefix; stops by max_tokens, by a stop
    token id and by a stop string taken from a first synchronous run; n=3 seeded sampling;
    logprobs and prompt logprobs."""
    shared = prompts(1, seed=7, lo=40, hi=41)[0]
    ps = prompts(12) + [shared + p for p in prompts(4, seed=8, lo=3, hi=10)]
    rng = np.random.default_rng(1)
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True)
              for m in rng.integers(1, 40, len(ps))]
    params[3] = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=20, seed=5)
    params[4] = SamplingParams(temperature=0, max_tokens=30, logprobs=2, prompt_logprobs=1)
    probe = generate(engine, ps, params, async_scheduling=False)
    for i in (5, 6, 13):
        out = probe[i].outputs[0]
        params[i] = SamplingParams(temperature=0, max_tokens=39, ignore_eos=True,
                                   stop_token_ids=[out.token_ids[len(out.token_ids) // 2]])
    for i in (7, 8, 14):
        text = probe[i].outputs[0].text
        params[i] = SamplingParams(temperature=0, max_tokens=39, ignore_eos=True,
                                   stop=[text[len(text) // 2:len(text) // 2 + 2]])
    return ps, params


def test_async_steps_give_what_synchronous_steps_give(small_cache_engine):
    engine = small_cache_engine
    ps, params = workload(engine)
    outs = {}
    for mode in (False, True):
        preempted, hits = engine.scheduler.num_preemptions, engine.block_manager.prefix_hits
        outs[mode] = generate(engine, ps, params, mode)
        assert engine.scheduler.num_preemptions > preempted
        assert engine.block_manager.prefix_hits > hits
    assert_same_outputs(outs[False], outs[True])
    reasons = {(c.finish_reason, type(c.stop_reason)) for o in outs[True] for c in o.outputs}
    assert {("length", type(None)), ("stop", int), ("stop", str)} <= reasons


def test_several_decode_steps_per_dispatch_give_what_single_steps_give(small_cache_engine,
                                                                      monkeypatch):
    engine = small_cache_engine
    # the server's cap on prompt tokens staggers the prompts, so that rows decode in runs
    # beside the short cache's preemptions
    monkeypatch.setattr(engine.scheduler, "step_budget", MixedStepBudget(2.0))
    ps, params = workload(engine)
    monkeypatch.setattr(engine.scheduler, "decode_steps", 1)
    single = generate(engine, ps, params, async_scheduling=False)
    monkeypatch.setattr(engine.scheduler, "decode_steps", 4)
    events = recorded(engine, monkeypatch)
    assert_same_outputs(single, generate(engine, ps, params, async_scheduling=True))
    runs = [batch for _, batch in events if batch is not None and batch.num_steps == 4]
    assert runs and any(len(batch.seqs) > 1 for batch in runs)


def recorded(engine, monkeypatch) -> list[tuple[str, object]]:
    """("dispatch", its batch) / ("read", None) in the order the engine dispatches steps and
    reads them back."""
    events, run, device_get = [], engine.runner.run, jax.device_get

    def dispatch(batch, *args, **kwargs):
        events.append(("dispatch", batch))
        return run(batch, *args, **kwargs)

    def read(x):
        events.append(("read", None))
        return device_get(x)

    monkeypatch.setattr(engine.runner, "run", dispatch)
    monkeypatch.setattr(jax, "device_get", read)
    return events


def test_the_next_step_is_dispatched_before_the_previous_one_is_read(llama, monkeypatch):
    engine = make_engine(llama)
    events = recorded(engine, monkeypatch)
    engine.generate(prompts(2), GREEDY)
    kinds = [kind for kind, _ in events]
    assert kinds[:3] == ["dispatch", "dispatch", "read"]
    assert kinds.count("dispatch") == kinds.count("read") + 1  # the last step: never needed
    assert engine.step() == [] and engine.in_flight is None  # nothing to schedule: read it
    events.clear()
    engine.config.async_scheduling = False
    engine.generate(prompts(2), GREEDY)
    assert [kind for kind, _ in events] == ["dispatch", "read"] * (len(events) // 2)


CONSTRAINED = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputs(
    regex=r"(cat|dog)-[0-9]{2,8}"))
PENALIZED = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3,
                           presence_penalty=0.5, ignore_eos=True)


@pytest.mark.parametrize("params", [CONSTRAINED, PENALIZED], ids=["constrained", "penalized"])
def test_rows_that_need_their_last_token_on_the_host_are_read_at_once(llama, monkeypatch,
                                                                       params):
    engine = make_engine(llama)
    ps = prompts(3, seed=4)
    both = [params, GREEDY, GREEDY]
    sync = generate(engine, ps, both, async_scheduling=False)
    events = recorded(engine, monkeypatch)
    assert_same_outputs(sync, generate(engine, ps, both, async_scheduling=True))
    kinds = [kind for kind, _ in events]
    with_row = [i for i, (_, batch) in enumerate(events)
                if batch is not None and any(s.params is params for s in batch.seqs)]
    assert with_row and all(kinds[i + 1] == "read" for i in with_row)
    assert "dispatch" in [kinds[i + 1] for i in range(with_row[-1] + 1, len(kinds) - 1)]


def test_aborting_while_its_step_runs_frees_its_pages_and_discards_the_token(llama):
    engine = make_engine(llama)
    bm = engine.block_manager
    p = prompts(1, seed=2)[0]
    expect = engine.generate([p], GREEDY)[0].outputs[0].token_ids
    rid = engine.add_request(p, GREEDY)
    while engine.in_flight is None or not engine.in_flight.batch.decode:
        engine.step()
    engine.abort_request(rid)
    assert bm.num_free == bm.num_blocks
    assert engine.step() == [] and engine.in_flight is None
    assert engine.generate([p], GREEDY)[0].outputs[0].token_ids == expect


class InjectedFault(RuntimeError):
    pass


@pytest.mark.parametrize("at", ["read", "dispatch"])
def test_a_step_failing_while_another_is_in_flight_costs_only_its_request(llama, monkeypatch,
                                                                          at):
    """read: the fault surfaces when the step is read back, after the next step was dispatched
    on top of its KV cache and sampled tokens. dispatch: the next step fails to dispatch while
    the previous one's tokens are still unread."""
    engine = make_engine(llama)
    ps = prompts(4, seed=3)
    alone = [engine.generate([p], GREEDY)[0].outputs[0].token_ids for p in ps]
    culprit = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, seed=666)
    broken, in_flight, run, device_get = set(), [], engine.runner.run, jax.device_get

    def faulty_run(batch, bitmask, prev_tokens):
        marked = any(s.params.seed == 666 and s.num_output_tokens >= 3 for s in batch.seqs)
        if marked and at == "dispatch":
            in_flight.append(prev_tokens is not None)
            raise InjectedFault("the step failed to dispatch")
        out = run(batch, bitmask, prev_tokens)
        if marked:
            broken.add(id(out))
        return out

    def faulty_read(x):
        if id(x) in broken:
            in_flight.append(engine.in_flight is not None)
            raise InjectedFault("the step failed on the device")
        return device_get(x)

    monkeypatch.setattr(engine.runner, "run", faulty_run)
    monkeypatch.setattr(jax, "device_get", faulty_read)
    outs = engine.generate(ps[:2] + [prompts(1, seed=9)[0]] + ps[2:], [GREEDY] * 2 + [culprit]
                           + [GREEDY] * 2)
    bad = outs.pop(2)
    assert isinstance(bad.error, InjectedFault) and bad.outputs[0].finish_reason == "error"
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert in_flight[0]  # the first fault came while another step was in flight


@pytest.mark.parametrize("argv, expect", [([], True), (["--async-scheduling"], True),
                                          (["--no-async-scheduling"], False)])
def test_async_scheduling_flag(argv, expect):
    p = Parser()
    add_engine_args(p)
    assert engine_config(p.parse_args(argv)).async_scheduling is expect


def test_the_server_defaults_suit_streams_and_the_offline_ones_throughput():
    """A run of K decode steps hands a stream its tokens K at a time: the server's default is
    one step a dispatch; offline entry points run 4."""
    from vllm_jax.server import build_parser

    assert engine_config(build_parser().parse_args([])).decode_steps == 1
    p = Parser()
    add_engine_args(p)
    assert engine_config(p.parse_args([])).decode_steps == 4
    assert engine_config(build_parser().parse_args(["--decode-steps", "4"])).decode_steps == 4
    # and the server caps prompt tokens beside decode rows; offline runs take the whole budget
    assert engine_config(build_parser().parse_args([])).mixed_step_slowdown == 2.0
    assert engine_config(p.parse_args([])).mixed_step_slowdown is None


CHATS = ["What is 2 + 2?", "Name three colors.", "Write a long story about a dragon.",
         "List the planets of the solar system."]


@pytest.mark.parametrize("activations, kvcache_mb, preempts", [("int8", 64, False),
                                                                ("f32", 6, True)])
def test_real_model_async_matches_synchronous(real_model, activations, kvcache_mb, preempts):
    """The default model: chat prompts that end at the end-of-turn token, at max_tokens and at
    a stop string. The two modes batch the last steps differently; the int8 (and int16) panel
    kernels' sums do not depend on that, float32's differ in the last bits only (greedy tokens
    stay). With a KV cache small enough to preempt,
    float32 activations only: a preempted row's KV, recomputed in a prompt step rather than the
    decode steps that first wrote it, differs in the last bits (its float32 logprobs move by
    ~1e-6), and int8 rounding of the next layers' inputs can turn that into another token."""
    engine = LLMEngine(EngineConfig(model_path=str(real_model("smollm2-135m")), dtype="f32",
                                    max_model_len=128, kvcache_mem_mb=kvcache_mb, max_num_seqs=4,
                                    max_num_batched_tokens=64, cpu_activations=activations))
    tok = engine.tokenizer
    ps = [tok.encode_prompt(tok.apply_chat_template([{"role": "user", "content": c}]))
          for c in CHATS]
    params = [SamplingParams(temperature=0, max_tokens=64),
              SamplingParams(temperature=0, max_tokens=64),
              SamplingParams(temperature=0, max_tokens=64),
              SamplingParams(temperature=0, max_tokens=64, stop=["\n"])]
    sync = generate(engine, ps, params, async_scheduling=False)
    preempted = engine.scheduler.num_preemptions
    overlapped = generate(engine, ps, params, async_scheduling=True)
    assert_same_outputs(sync, overlapped)
    assert (preempted > 0 and engine.scheduler.num_preemptions > preempted) == preempts
    reasons = {(c.finish_reason, c.stop_reason) for o in overlapped for c in o.outputs}
    assert {("stop", None), ("stop", "\n"), ("length", None)} <= reasons
