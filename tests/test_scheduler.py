"""The scheduler's policy, without a model: which rows a step carries under the token budget."""
from __future__ import annotations

from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.scheduler import Scheduler
from vllm_jax.engine.sequence import Sequence
from vllm_jax.engine.step_cost import MixedStepBudget
from vllm_jax.sampling_params import SamplingParams

PAGE = 4


def make_scheduler(num_blocks=64, budget=16, mixed=True, max_prefill_seqs=2, **kw):
    bm = BlockManager(num_blocks, PAGE, enable_prefix_caching=False)
    return Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget,
                     max_prefill_seqs=max_prefill_seqs, mixed=mixed, **kw)


def request(n, first=0):
    return Sequence(list(range(first, first + n)), SamplingParams(), seed=0)


def run(batch):
    """What the engine does after a step: the KV is computed, a finished prompt samples a token."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


def decoding(sched, *lengths):
    seqs = [request(n, first=10 * i) for i, n in enumerate(lengths)]
    for seq in seqs:
        sched.add(seq)
    while any(s.is_prefill or s.num_computed_tokens == 0 for s in seqs):
        run(sched.schedule())
    return seqs


def test_a_step_with_waiting_prompts_carries_every_decode_row_first():
    sched = make_scheduler(budget=16)
    running = decoding(sched, 3, 5, 2)
    waiting = [request(30, first=100), request(9, first=200)]
    for seq in waiting:
        sched.add(seq)
    batch = sched.schedule()
    assert not batch.decode and batch.num_decode_rows == 3
    assert batch.seqs[:3] == running and batch.num_new_tokens[:3] == [1, 1, 1]
    assert batch.seqs[3:] == [waiting[0]]  # prompt chunks fill the rest of the budget
    assert batch.num_new_tokens[3:] == [16 - 3]
    assert batch.num_tokens == 16


def test_every_step_of_a_long_prompt_keeps_the_decode_rows():
    sched = make_scheduler(budget=8)
    running = decoding(sched, 3, 2)
    long = request(40, first=100)
    sched.add(long)
    chunks = 0
    while long.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch.seqs[:2] == running and batch.num_decode_rows == 2
        chunks += batch.seqs[2:] == [long]
        run(batch)
    assert chunks == -(-40 // 6)


def test_mixed_prefill_tokens_caps_prompt_tokens_beside_decode_rows_only():
    sched = make_scheduler(budget=16, mixed_prefill_tokens=5)
    sched.add(request(30, first=100))
    assert sched.schedule().num_new_tokens == [16]  # no decode rows: the whole budget
    sched = make_scheduler(budget=16, mixed_prefill_tokens=5)
    decoding(sched, 3, 2)
    sched.add(request(30, first=100))
    batch = sched.schedule()
    assert batch.num_decode_rows == 2 and batch.num_new_tokens[2:] == [5]


def test_without_prompts_a_step_is_a_pure_decode_step():
    sched = make_scheduler()
    running = decoding(sched, 3, 6)
    batch = sched.schedule()
    assert batch.decode and batch.seqs == running and batch.num_new_tokens == [1, 1]


def test_separate_steps_put_prompts_first_without_decode_rows():
    sched = make_scheduler(mixed=False)
    decoding(sched, 3, 5)
    fresh = request(6, first=100)
    sched.add(fresh)
    batch = sched.schedule()
    assert batch.seqs == [fresh] and batch.num_decode_rows == 0


def test_out_of_pages_a_decode_row_preempts_the_newest_and_admits_nobody():
    sched = make_scheduler(num_blocks=3, budget=16)
    old, new = decoding(sched, 4, 4)  # a full page each, plus a sampled token
    sched.add(request(2, first=100))
    batch = sched.schedule()
    assert sched.num_preemptions == 1 and new in sched.waiting
    assert batch.decode and batch.seqs == [old]



def test_with_nothing_waiting_a_decode_step_runs_several_steps_with_their_pages():
    sched = make_scheduler(decode_steps=4, max_model_len=64)
    running = decoding(sched, 3, 6)  # 4 and 7 tokens: positions up to 6 and 9 next
    batch = sched.schedule()
    assert batch.decode and batch.seqs == running and batch.num_steps == 4
    assert batch.num_new_tokens == [1, 1]  # what the first step computes
    assert [len(s.block_table) for s in running] == [2, 3]  # pages for 7 and 10 tokens


def near_end(sched, **params):
    seq = Sequence(list(range(5)), SamplingParams(**params), seed=0)
    sched.add(seq)
    run(sched.schedule())
    return seq


def test_a_decode_step_runs_alone_when_a_prompt_waits_or_a_row_may_not_run_ahead():
    for params in [None, dict(max_tokens=4), dict(logprobs=1), dict(presence_penalty=0.5)]:
        sched = make_scheduler(decode_steps=4, max_model_len=64)
        decoding(sched, 3)
        near_end(sched, **params or {})
        if params is None:  # a prompt waits for a free row: it would wait for the whole run
            sched.max_num_seqs = 2
            sched.add(request(5, first=200))
        assert sched.schedule().num_steps == 1, params
    sched = make_scheduler(decode_steps=4, max_model_len=9)  # 6 tokens: 3 more fit
    decoding(sched, 5)
    assert sched.schedule().num_steps == 1
    sched = make_scheduler(num_blocks=2, decode_steps=4)  # 7 tokens: 10 need a third page
    decoding(sched, 6)
    batch = sched.schedule()
    assert batch.num_steps == 1 and sched.num_preemptions == 0


def measured_budget(slowdown=2.0, min_tokens=4, fixed=0.05, per_token=0.01):
    """A budget that has seen steps of 2 to 24 tokens costing `fixed + per_token * tokens`."""
    budget = MixedStepBudget(slowdown, min_tokens=min_tokens)
    for tokens in range(2, 26, 2):
        budget.observe(tokens, fixed + per_token * tokens)
    return budget


def test_measured_costs_cap_prompt_tokens_to_the_allowed_slowdown():
    # 3 streams decoding take 0.05 + 0.03 s; 2x that allows 0.08 s more: 8 prompt tokens
    assert measured_budget(slowdown=2.0).prompt_tokens(3, 3) == 8
    assert measured_budget(slowdown=1.5).prompt_tokens(3, 3) == 4
    assert measured_budget(slowdown=2.0).prompt_tokens(13, 13) == 18  # more rows, more room
    # a device whose steps cost mostly their fixed part: a large budget
    assert measured_budget(fixed=1.0, per_token=0.001).prompt_tokens(3, 3) >= 1000


def test_the_yardstick_is_a_decode_step_of_every_stream_the_batch_is_heading_for():
    # 3 rows decoding, 13 streams once the waiting prompts run: 2 * (0.05 + 0.13) s allows
    # 0.36 - 0.05 s of tokens, 31 of them, 28 beside the 3 rows
    assert measured_budget(slowdown=2.0).prompt_tokens(3, 13) == 28
    # so a busy step holds the same tokens however many rows decode yet
    budget = measured_budget(slowdown=2.0)
    assert {r + budget.prompt_tokens(r, 13) for r in (1, 3, 8, 13)} == {31}
    # unmeasured, the fixed part counts as nothing: 2 * 13 tokens a step
    assert MixedStepBudget(2.0).prompt_tokens(3, 13) == 23
    assert MixedStepBudget(2.0, min_tokens=16).prompt_tokens(3, 3) == 16  # never below the floor


def test_few_rows_decoding_still_admit_a_queue_of_prompts_at_the_pace_of_all_streams():
    """8 rows decoding and 24 prompts waiting: measured against the 8 rows, a step could carry
    only ~8 prompt tokens, the queue drained as slowly as the 8 streams finished and the batch
    never grew; measured against the 32 streams it is heading for, it carries ~56."""
    budget = measured_budget(slowdown=2.0, fixed=0.0, per_token=0.01)
    sched = make_scheduler(num_blocks=512, budget=512, max_prefill_seqs=8, step_budget=budget)
    sched.max_num_seqs = 32
    decoding(sched, *[4] * 8)
    for i in range(24):
        sched.add(request(40, first=100 + 40 * i))
    batch = sched.schedule()
    assert batch.num_decode_rows == 8
    assert batch.num_tokens - batch.num_decode_rows == 2 * 32 - 8


def test_steps_all_of_one_size_do_not_yet_fit_a_cost():
    budget = MixedStepBudget(2.0)
    for _ in range(20):
        budget.observe(32, 0.1)
    assert budget.cost() is None


def test_the_step_budget_caps_mixed_steps_and_prompts_still_finish():
    budget = measured_budget(slowdown=1.5, min_tokens=2)
    sched = make_scheduler(budget=32, step_budget=budget)
    running = decoding(sched, 3, 2)
    long = request(40, first=100)
    sched.add(long)
    while long.num_output_tokens == 0:
        allowed = budget.prompt_tokens(2, 3)  # heading for 3 streams: the long one too
        batch = sched.schedule()
        assert batch.seqs[:2] == running
        assert batch.num_tokens - batch.num_decode_rows <= allowed
        sched.observe(batch, 0.05 + 0.01 * batch.num_tokens)  # what the costs predict
        run(batch)


def test_a_slow_prompt_token_still_gets_the_minimum_into_each_mixed_step():
    sched = make_scheduler(budget=32, step_budget=measured_budget(
        slowdown=1.5, min_tokens=4, fixed=0.0, per_token=10.0))
    decoding(sched, 3)
    sched.add(request(40, first=100))
    assert sched.schedule().num_new_tokens == [1, 4]


def test_a_fixed_mixed_prefill_tokens_overrides_the_step_budget():
    sched = make_scheduler(budget=32, mixed_prefill_tokens=12,
                           step_budget=measured_budget(slowdown=1.5, min_tokens=4))
    decoding(sched, 3)
    sched.add(request(40, first=100))
    assert sched.schedule().num_new_tokens == [1, 12]
