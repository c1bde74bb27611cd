"""One generated sequence: its tokens, its pages, how much of it the KV cache holds.

`block_table` only grows by append while the sequence holds its pages; releasing them replaces
the list. `block_array` relies on that to mirror it into int32 incrementally.

Under async scheduling a token sampled by a step still in flight sits at the tail of `token_ids`
as a PLACEHOLDER (`num_placeholders` of them) until the engine reads it; `prev_row` is the row
of the newest one in that step's sampled tokens, where the next step's input is gathered on the
device. Placeholders count as tokens for scheduling (pages, positions, the sampler's step index),
never for what a request sees.
"""
from __future__ import annotations

import itertools
from enum import Enum, auto

import numpy as np

from vllm_jax.sampling_params import SamplingParams

PLACEHOLDER = -1  # a sampled token not yet read back from the device


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 request_id: str = "", index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n outputs
        self.params = params
        self.seed = seed
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self._mirrored: list[int] | None = None  # the block_table list `_pages` mirrors
        self._pages = np.zeros(0, np.int32)
        self._num_mirrored = 0
        self.block_hashes: list[int] = []  # hash chain of the full pages whose KV is computed
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.output_logprobs: list = []  # per output token: {id: Logprob}, built once
        self.prompt_logprobs: list = []  # per prompt position >= 1
        self.cumulative_logprob = 0.0
        self.matcher = None  # an llguidance matcher over the outputs when the output is constrained
        self.num_placeholders = 0
        self.prev_row = -1  # the newest placeholder's row in its step's sampled tokens

    def __len__(self):
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens read back (or given): all but the placeholders."""
        return len(self.token_ids) - self.num_placeholders

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:self.num_known_tokens]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefill(self) -> bool:
        """More than the last token still needs its KV computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def add_placeholder(self, row: int):
        self.token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1
        self.prev_row = row

    def fill_placeholder(self, token: int):
        """The oldest placeholder becomes the token read back for it."""
        self.token_ids[self.num_known_tokens] = token
        self.num_placeholders -= 1
        if not self.num_placeholders:
            self.prev_row = -1

    def drop_placeholders(self):
        """Forget tokens still in flight (the sequence finished, or the step failed)."""
        if self.num_placeholders:
            del self.token_ids[-self.num_placeholders:]
            self.num_placeholders, self.prev_row = 0, -1

    def block_array(self) -> np.ndarray:
        """block_table as int32 without rebuilding it each step: only appended pages are copied."""
        table = self.block_table
        if table is not self._mirrored or len(table) < self._num_mirrored:
            self._mirrored, self._num_mirrored = table, 0
        n, done = len(table), self._num_mirrored
        if n > done:
            if n > len(self._pages):
                grown = np.zeros(max(n, 2 * len(self._pages)), np.int32)
                grown[:done] = self._pages[:done]
                self._pages = grown
            self._pages[done:n] = table[done:n]
            self._num_mirrored = n
        return self._pages[:n]

    def page_tokens(self, i: int, page_size: int) -> list[int]:
        return self.token_ids[i * page_size:(i + 1) * page_size]
