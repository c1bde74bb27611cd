"""ModelRunner.prepare against a plain per-token construction from the block manager's lists,
across prefix-cache hits, preemption and re-admission (the int32 page mirror must follow), and
with tokens still in flight (placeholders) under async scheduling."""
from __future__ import annotations

import numpy as np
import pytest

from tools.prepare_time import host_runner
from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.scheduler import ScheduledBatch
from vllm_jax.engine.sequence import Sequence
from vllm_jax.models.layers import PAD_TOKEN
from vllm_jax.runner.model_runner import FLOAT_FIELDS, SAMPLING_ATTRS, StepLayout, _unpack
from vllm_jax.sampling_params import SamplingParams

PAGE, PAGES, MAX_LEN = 4, 48, 64
PROMPT = list(range(100, 111))  # 11 tokens: two full pages the prefix cache can share


def reference(runner, batch: ScheduledBatch, layout: StepLayout) -> dict:
    s, t = layout.num_seqs, layout.num_tokens
    ref = {"tokens": [PAD_TOKEN] * t, "prev_row": [-1] * t, "positions": [0] * t,
           "slot_mapping": [PAGES * PAGE] * t, "seq_idx": [s - 1] * t,
           "block_tables": np.zeros((s, layout.max_pages), np.int32),
           "context_lens": [0] * s, "logits_indices": [0] * s, "step": [0] * s,
           "top_k": [0] * s, "min_tokens": [0] * s, "banned": np.full((s, layout.banned), -1),
           "history": np.full((s, layout.penalties), -1), "num_prompt": [0] * s}
    i = 0
    for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            ref["tokens"][i], ref["positions"][i], ref["seq_idx"][i] = seq.token_ids[p], p, row
            ref["slot_mapping"][i] = seq.block_table[p // PAGE] * PAGE + p % PAGE
            if p >= seq.num_known_tokens:  # a placeholder: its step's sampled row holds it
                ref["prev_row"][i] = seq.prev_row
            i += 1
        ref["block_tables"][row, :len(seq.block_table)] = seq.block_table
        ref["context_lens"][row] = seq.num_computed_tokens + n
        ref["logits_indices"][row] = i - 1
        ref["step"][row] = seq.num_output_tokens
        ref["top_k"][row], ref["min_tokens"][row] = seq.params.top_k, seq.params.min_tokens
        if seq.params.min_tokens:
            ban = runner.eos_ids + seq.params.stop_token_ids
            ref["banned"][row, :len(ban)] = ban
        ref["history"][row, :seq.num_tokens] = seq.token_ids
        ref["num_prompt"][row] = seq.num_prompt_tokens
    return ref


def check_prepare(runner, batch: ScheduledBatch, layout: StepLayout):
    ints, floats = runner.prepare(batch, layout)
    got = _unpack(ints, layout.int_sizes())
    for name, want in reference(runner, batch, layout).items():
        np.testing.assert_array_equal(got[name], np.asarray(want).reshape(-1), err_msg=name)
    got_f = _unpack(floats, [(n, layout.num_seqs) for n in FLOAT_FIELDS])
    for name, attr in SAMPLING_ATTRS.items():
        want = [getattr(q.params, attr) for q in batch.seqs]
        np.testing.assert_array_equal(got_f[name][:len(want)], np.float32(want), err_msg=name)


def computed(bm: BlockManager, seq: Sequence, new_token: int):
    """The step computed every token the sequence holds and sampled `new_token`."""
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)
    seq.token_ids.append(new_token)
    bm.may_append(seq)


def layout(num_tokens: int, num_seqs: int, decode: bool) -> StepLayout:
    return StepLayout(num_tokens, num_seqs, -(-MAX_LEN // PAGE), decode, penalties=MAX_LEN)


@pytest.fixture()
def engine_state():
    runner = host_runner(MAX_LEN, PAGES, PAGE)
    bm = BlockManager(PAGES, PAGE)
    params = [SamplingParams(temperature=0.5, top_k=3, min_tokens=2, stop_token_ids=[7, 9]),
              SamplingParams(top_p=0.8, repetition_penalty=1.2),
              SamplingParams(min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.3)]
    seqs = [Sequence(PROMPT + [i], p, seed=2**32 - 1 - i) for i, p in enumerate(params)]
    return runner, bm, seqs


def test_prepare_matches_reference_through_preemption_and_prefix_hits(engine_state):
    runner, bm, (a, b, c) = engine_state
    for seq in (a, c):
        bm.allocate(seq)
        computed(bm, seq, 5)
    check_prepare(runner, ScheduledBatch(True, [a, c], [1, 1], 2), layout(2, 2, True))
    bm.deallocate(c)  # preempted: its pages go back, their KV stays in the prefix cache
    for _ in range(PAGE):  # a grows a page the mirror must pick up
        computed(bm, a, 6)
        check_prepare(runner, ScheduledBatch(True, [a], [1], 1), layout(2, 2, True))
    bm.allocate(b)
    bm.allocate(c)  # re-admitted: recomputes what the cache no longer covers
    assert (b.num_cached_tokens, c.num_cached_tokens) == (2 * PAGE, 3 * PAGE)
    chunks = [1, b.num_tokens - b.num_computed_tokens, c.num_tokens - c.num_computed_tokens]
    check_prepare(runner, ScheduledBatch(False, [a, b, c], chunks, 1), layout(16, 4, False))
    computed(bm, b, 8)
    computed(bm, c, 8)
    check_prepare(runner, ScheduledBatch(True, [a, b, c], [1, 1, 1], 3), layout(4, 4, True))


def in_flight(bm: BlockManager, seq: Sequence, row: int):
    """A step computed every token the sequence holds; its sampled token is not read yet."""
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed(seq)
    seq.add_placeholder(row)
    bm.may_append(seq)


def test_rows_whose_token_is_in_flight_name_its_row_in_the_previous_step(engine_state):
    runner, bm, (a, b, c) = engine_state
    for seq in (a, b, c):
        bm.allocate(seq)
    computed(bm, a, 5)
    in_flight(bm, b, row=1)
    check_prepare(runner, ScheduledBatch(True, [a, b], [1, 1], 2), layout(2, 2, True))
    in_flight(bm, a, row=0)
    chunk = c.num_tokens - c.num_computed_tokens
    check_prepare(runner, ScheduledBatch(False, [b, a, c], [1, 1, chunk], 2),
                  layout(16, 4, False))
    b.fill_placeholder(8)
    assert b.token_ids[-1] == 8 and b.prev_row == -1
    check_prepare(runner, ScheduledBatch(True, [a, b], [1, 1], 2), layout(2, 2, True))
