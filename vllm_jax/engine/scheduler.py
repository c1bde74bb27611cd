"""Who runs this step: continuous batching under a token budget.

Mixed steps (the default, as vLLM V1 schedules): every running sequence past its prompt gets a
decode row (one token), then prompt chunks of up to `max_prefill_seqs` sequences fill the rest of
`max_num_batched_tokens` (long prompts split across steps; at most `mixed_prefill_tokens` beside
decode rows, when set; else as many as `step_budget` allows: engine/step_cost.py), so running
streams never wait while prompts prefill. A step with no prompt chunk is a pure decode step.
With `mixed=False` a step is either prompt chunks (they go first) or decode rows, never both.

When a decode row finds no free page, the most recently admitted sequences are preempted: their
pages are freed and they are recomputed later; no new sequence is admitted in that step.

A pure decode step runs `decode_steps` steps in one dispatch (each row's sampled token its next
input, on the device) when no prompt waits, no row needs its token on the host before the next
(structured output, penalties) or returns logprobs, every row may sample that many more tokens,
and pages for all of them are free; else one. It spares the host the dispatch, preparation and
read-back of the steps between; a prompt arriving meanwhile waits for the whole run.

After a failed step (`restart`), every sequence is recomputed, and the failed batch's ones run
alone, one at a time, until each has sampled a token: a request that breaks the step then
fails by itself, and the others carry on.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.sequence import Sequence, SequenceStatus
from vllm_jax.engine.step_cost import MixedStepBudget


@dataclass(slots=True)
class ScheduledBatch:
    decode: bool  # only decode rows: the step keeps the decode layout
    seqs: list[Sequence]  # decode rows first, then prompt chunks
    num_new_tokens: list[int]  # tokens computed this step, per sequence
    num_decode_rows: int = 0  # leading rows that decode (all of them when `decode`)
    num_steps: int = 1  # decode steps in this dispatch (several only when `decode`)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_seqs: int = 8, mixed: bool = True,
                 mixed_prefill_tokens: int | None = None,
                 step_budget: MixedStepBudget | None = None, decode_steps: int = 1,
                 max_model_len: int | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.mixed = mixed
        self.mixed_prefill_tokens = mixed_prefill_tokens
        self.step_budget = step_budget
        self.decode_steps = decode_steps
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.suspects: deque[Sequence] = deque()  # to run alone before anything else
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        while self.suspects and self.suspects[0].status is not SequenceStatus.WAITING and (
                not self.suspects[0].is_prefill):
            self.suspects.popleft()  # it sampled a token alone, or it has finished
        if self.suspects:
            return self._schedule_alone(self.suspects[0])
        if self.mixed:
            return self._schedule_mixed()
        chunks = self._prefill_batch(self.max_num_batched_tokens, admit=True)
        return chunks or self._decode_step(self._decode_rows())

    def restart(self, suspects: list[Sequence]):
        """Recompute every running sequence; run `suspects` alone first, one at a time."""
        for seq in reversed(list(self.running)):
            self.preempt(seq)
        self.suspects = deque(s for s in suspects if not s.is_finished)

    def _schedule_alone(self, seq: Sequence) -> ScheduledBatch:
        if seq.status is SequenceStatus.WAITING:
            while not self.block_manager.can_allocate(seq) and self.running:
                self.preempt(self.running[-1])
            self.waiting.remove(seq)
            self._admit(seq)
        n = min(seq.num_tokens - seq.num_computed_tokens, self.max_num_batched_tokens)
        return ScheduledBatch(False, [seq], [n])

    def _admit(self, seq: Sequence):
        self.block_manager.allocate(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _schedule_mixed(self) -> ScheduledBatch | None:
        preemptions = self.num_preemptions
        rows = self._decode_rows()
        budget = self.max_num_batched_tokens - len(rows)
        prompts = self.waiting or any(s.is_prefill for s in self.running)
        cap = self._mixed_prefill_cap(len(rows)) if rows and prompts else None
        if cap:
            budget = min(budget, cap)
        chunks = self._prefill_batch(budget, admit=self.num_preemptions == preemptions)
        if chunks is None:
            return self._decode_step(rows)
        return ScheduledBatch(False, rows + chunks.seqs, [1] * len(rows) + chunks.num_new_tokens,
                              len(rows))

    def _mixed_prefill_cap(self, num_decode_rows: int) -> int | None:
        if self.mixed_prefill_tokens or self.step_budget is None:
            return self.mixed_prefill_tokens
        streams = min(self.max_num_seqs, len(self.running) + len(self.waiting))
        return self.step_budget.prompt_tokens(num_decode_rows, streams)

    def observe(self, batch: ScheduledBatch, seconds: float):
        """`batch` ran in `seconds` (the engine reports steps that did not compile)."""
        if self.step_budget is not None:
            self.step_budget.observe(batch.num_tokens, seconds)

    def _prefill_batch(self, budget: int, admit: bool) -> ScheduledBatch | None:
        """Prompt chunks: running prompts first, then waiting sequences (when `admit`)."""
        seqs, counts = [], []

        def take(seq):
            nonlocal budget
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        for seq in self.running:
            if seq.is_prefill and budget > 0 and len(seqs) < self.max_prefill_seqs:
                take(seq)
        while (admit and self.waiting and budget > 0 and len(seqs) < self.max_prefill_seqs
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self._admit(self.waiting.popleft())
            take(seq)
        return ScheduledBatch(False, seqs, counts) if seqs else None

    def _decode_rows(self) -> list[Sequence]:
        """Every running sequence past its prompt, each with room for one more token; to make
        room, the most recently admitted sequences are preempted."""
        rows = []
        for seq in [s for s in self.running if not s.is_prefill]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted to make room for an earlier row
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                rows.append(seq)
        return rows

    def _decode_step(self, rows: list[Sequence]) -> ScheduledBatch | None:
        if not rows:
            return None
        return ScheduledBatch(True, rows, [1] * len(rows), len(rows), self._run_length(rows))

    def _run_length(self, rows: list[Sequence]) -> int:
        """decode_steps when nothing waits, every row may run that far ahead and the pages for
        all of them are free (they are taken here), else 1."""
        k, bm = self.decode_steps, self.block_manager
        if k == 1 or self.waiting or not all(self._may_run(seq, k) for seq in rows):
            return 1
        if sum(bm.pages_needed(seq.num_tokens + k - 1) - len(seq.block_table)
               for seq in rows) > bm.num_free:
            return 1
        for seq in rows:
            bm.may_append(seq, seq.num_tokens + k - 1)
        return k

    def _may_run(self, seq: Sequence, k: int) -> bool:
        """`seq` may decode k steps in one dispatch: it may sample k more tokens, and no step
        needs what the one before it sampled on the host."""
        p = seq.params
        return (seq.matcher is None and not p.uses_penalties and p.logprobs is None
                and (p.max_tokens is None or seq.num_output_tokens + k <= p.max_tokens)
                and (self.max_model_len is None or seq.num_tokens + k <= self.max_model_len))

    def preempt(self, seq: Sequence):
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence):
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.deallocate(seq)
        seq.drop_placeholders()  # what a step still in flight samples for it is discarded
        seq.status = SequenceStatus.FINISHED

