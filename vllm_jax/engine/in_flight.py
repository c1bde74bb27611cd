"""A dispatched step whose sampled tokens the host has not read yet.

Dispatching a step advances its sequences at once, before anything is read back: each row's
computed tokens count, its full pages go to the prefix cache (any later step that reads them runs
after this one on the device), and a row that samples gets a placeholder token. So the next step
can be scheduled and dispatched while this one runs (async scheduling); reading the step later
fills the placeholders in dispatch order. A dispatch of several decode steps (num_steps) advances
each row by that many tokens and gives it that many placeholders.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.scheduler import ScheduledBatch


@dataclass(slots=True)
class InFlight:
    batch: ScheduledBatch
    out: dict  # the step's device arrays ("tokens" [max rows], logprobs, prompt logprobs;
    # "sampled" [num_steps, rows] after several decode steps)
    starts: list[int]  # each row's num_computed_tokens before the step
    sampled: list[bool]  # each row's step sampled a token (it reached the sequence's end)
    dispatched_at: float  # time.perf_counter() when the step was handed to the runner
    compiled: bool  # its dispatch compiled a new step shape

    @property
    def prev_tokens(self):
        return self.out["tokens"]


def dispatched(batch: ScheduledBatch, out: dict, block_manager: BlockManager,
               dispatched_at: float, compiled: bool = False) -> InFlight:
    starts, sampled = [], []
    for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        starts.append(seq.num_computed_tokens)
        seq.num_computed_tokens += n
        block_manager.register_computed(seq)
        sampled.append(seq.num_computed_tokens >= seq.num_tokens)
        if sampled[-1]:
            seq.add_placeholder(row)
        for _ in range(batch.num_steps - 1):  # each next step computes the token before it
            seq.num_computed_tokens += 1
            seq.add_placeholder(row)
    return InFlight(batch, out, starts, sampled, dispatched_at, compiled)
