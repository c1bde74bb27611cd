"""How many prompt tokens a mixed step may carry, so that the running streams' next token comes
within `slowdown` times what a decode step of all the streams takes.

A step's time grows with its tokens (on a 2-core CPU 370 prompt tokens beside 32 decode rows
took 10x the decode step, and every running stream waited that long). The cost is measured, not
configured: a straight line `seconds = fixed + per_token * tokens` fitted to the recent steps
the engine reports. The yardstick is a decode step of the S streams the batch is heading for
(running and waiting, up to max_num_seqs), not of the R rows decoding now: with R rows as the
yardstick a few rows allow few prompt tokens, prompts are admitted as slowly as the few streams
finish, and the batch stays small while the queue grows (32 clients: 12 rows decoding, 19
prompts waiting for seconds). So R rows may take P prompt tokens while
`fixed + per_token * (R + P) <= slowdown * (fixed + per_token * S)`, i.e.
`P <= (slowdown - 1) * fixed / per_token + slowdown * S - R`: every busy step holds about the
same number of tokens, so the gaps between tokens stay even; a device whose steps cost mostly
their fixed part (a GPU) gets a large budget, a CPU whose steps cost their tokens a small one.
Until the fit exists the fixed part is taken as 0 (the smallest budget); the limit never falls
below `min_tokens`, so prompts progress.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class MixedStepBudget:
    def __init__(self, slowdown: float, min_tokens: int = 16, window: int = 64):
        self.slowdown = slowdown
        self.min_tokens = min_tokens
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)

    def observe(self, num_tokens: int, seconds: float):
        """A step of `num_tokens` ran (without compiling) in `seconds`."""
        self.steps.append((num_tokens, seconds))

    def cost(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of a step; None until the steps seen differ."""
        tokens, seconds = np.array(self.steps, float).reshape(-1, 2).T
        if len(tokens) < 8 or np.ptp(tokens) == 0:
            return None
        per_token, fixed = np.polyfit(tokens, seconds, 1)
        return max(fixed, 0.0), per_token

    def prompt_tokens(self, num_decode_rows: int, num_streams: int) -> int | None:
        """The most prompt tokens beside `num_decode_rows` in a batch heading for `num_streams`
        decoding streams; None when the tokens cost nothing measurable (no limit)."""
        cost = self.cost()
        fixed, per_token = cost if cost is not None else (0.0, 1.0)
        if per_token <= 0:
            return None
        streams = max(num_streams, num_decode_rows)
        allowed = (self.slowdown - 1) * fixed / per_token + self.slowdown * streams - num_decode_rows
        return max(self.min_tokens, int(round(allowed, 6)))  # 7.9999999 from the fit: 8
