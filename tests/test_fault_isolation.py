"""A failing engine step costs only the request that breaks it: the others finish with the tokens
they would have had alone, and the engine keeps serving."""
from __future__ import annotations

import pytest

from vllm_jax.config import EngineConfig
from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.engine.scheduler import Scheduler
from vllm_jax.engine.sequence import Sequence
from vllm_jax.sampling_params import SamplingParams, StructuredOutputs

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MARKER = 666  # the seed that marks the request the injected fault blames (greedy: unused)
PROMPTS = ["The quick brown fox", "Hello world! How are you", "Once upon a time there",
           "def f(x):\n    return"]
# one request constrained to a language: its recomputed rows must keep their allowed-token masks
CONSTRAINED = SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputs(
    regex=r"(cat|dog|fox)-[0-9]{2,6}"))
PARAMS = [GREEDY] * 3 + [CONSTRAINED]


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def engine(model_dir):
    config = EngineConfig(model_path=str(model_dir("llama")[0]), dtype="f32", max_model_len=128,
                          kvcache_mem_mb=4, max_num_seqs=8)
    return LLMEngine(config)


@pytest.fixture(scope="module")
def alone(engine):
    """(token ids, finish reason) of each request run by itself."""
    return [results(engine.generate([p], sp))[0] for p, sp in zip(PROMPTS, PARAMS)]


def results(outs) -> list[tuple[list[int], str]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


def inject_fault(engine, monkeypatch, at_output_token: int, after_donation: bool):
    """Steps that hold a marked sequence with at least `at_output_token` outputs raise; after
    the KV cache went into the step and was lost, or before the step was dispatched."""
    run = engine.runner.run
    steps = []

    def faulty_run(batch, *args):
        marked = any(s.params.seed == MARKER and s.num_output_tokens >= at_output_token
                     for s in batch.seqs)
        steps.append((len(batch.seqs), marked))
        if not marked:
            return run(batch, *args)
        if after_donation:
            run(batch, *args)
            for buffer in engine.runner.kv:
                buffer.delete()
        raise InjectedFault("the marked request broke the step")

    monkeypatch.setattr(engine.runner, "run", faulty_run)
    return steps


@pytest.mark.parametrize("at_output_token", [0, 3], ids=["in-prefill", "in-decode"])
@pytest.mark.parametrize("after_donation", [False, True], ids=["before-dispatch", "cache-lost"])
def test_only_the_request_that_breaks_a_step_fails(engine, alone, monkeypatch, at_output_token,
                                                    after_donation):
    steps = inject_fault(engine, monkeypatch, at_output_token, after_donation)
    culprit = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, seed=MARKER)
    prompts = PROMPTS[:2] + ["A request that breaks the step"] + PROMPTS[2:]
    params = PARAMS[:2] + [culprit] + PARAMS[2:]
    outs = engine.generate(prompts, params)
    bad = outs.pop(2)
    assert results(outs) == alone
    assert all(o.error is None for o in outs)
    assert isinstance(bad.error, InjectedFault) and bad.outputs[0].finish_reason == "error"
    assert (1, True) in steps and any(n > 1 and marked for n, marked in steps)
    assert not engine.requests and not engine.scheduler.suspects
    bm = engine.block_manager
    assert bm.num_free == bm.num_blocks
    monkeypatch.undo()
    again = engine.generate(PROMPTS, PARAMS)  # the engine goes on serving, results unchanged
    assert results(again) == alone


def test_after_a_restart_each_suspect_runs_alone_until_it_sampled_then_all_batch_again():
    scheduler = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=8)
    seqs = [Sequence(list(range(1, n + 1)), GREEDY, seed=0) for n in (6, 10, 13)]

    def run(batch):  # what the engine does with a step's result
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(5)

    for seq in seqs:
        scheduler.add(seq)
    run(scheduler.schedule())  # a prefill step: the 8-token budget covers a prompt and a piece
    scheduler.restart(seqs)
    assert not scheduler.running and list(scheduler.waiting) == seqs
    assert scheduler.block_manager.num_free == 32
    alone = []
    for _ in range(5):
        batch = scheduler.schedule()
        assert len(batch.seqs) == 1 and not batch.decode and batch.num_tokens <= 8
        alone.append(batch.seqs[0])
        run(batch)
    assert alone == [seqs[0], seqs[1], seqs[1], seqs[2], seqs[2]]  # prompts in 8-token chunks
    batch = scheduler.schedule()
    assert batch.decode and batch.seqs == seqs
