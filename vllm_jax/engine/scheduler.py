"""Who runs this step: prefill-first continuous batching under a token budget.

A step is either a prefill step (prompt chunks of up to `max_prefill_seqs` sequences, at most
`max_num_batched_tokens` tokens, long prompts split across steps) or a decode step (one token
for every running sequence). When a decode step runs out of pages, the most recently admitted
sequences are preempted: their pages are freed and they are recomputed later.

After a failed step (`restart`), every sequence is recomputed, and the failed batch's ones run
alone, one at a time, until each has sampled a token: a request that breaks the step then
fails by itself, and the others carry on.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vllm_jax.engine.block_manager import BlockManager
from vllm_jax.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    decode: bool
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens computed this step, per sequence

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_prefill_seqs: int = 8):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
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
        return self._schedule_prefill() or self._schedule_decode()

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

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
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
        while (self.waiting and budget > 0 and len(seqs) < self.max_prefill_seqs
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self._admit(self.waiting.popleft())
            take(seq)
        return ScheduledBatch(False, seqs, counts) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled = []
        candidates = list(self.running)
        while candidates:
            seq = candidates.pop(0)
            while not self.block_manager.can_append(seq):
                victim = candidates.pop() if candidates else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        return ScheduledBatch(True, scheduled, [1] * len(scheduled)) if scheduled else None

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
        seq.status = SequenceStatus.FINISHED
