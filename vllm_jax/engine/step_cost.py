"""How many prompt tokens a mixed step may carry so that the running streams' next token comes
within `slowdown` times a pure decode step.

A step's time grows with its prompt tokens (on the CPU about linearly: 370 prompt tokens beside
32 decode rows took 10x a decode step, and every running stream waited that long). The costs are
measured, not configured: moving averages of the step times the engine reports, one for pure
decode steps and one per prompt token added to a decode step, so the same policy fits a slow
CPU, a fast one and a GPU. Until both are measured there is no limit; the limit never falls
below `min_tokens`, so prompts keep progressing however slow a prompt token is.
"""
from __future__ import annotations


class MixedStepBudget:
    def __init__(self, slowdown: float, min_tokens: int = 16, smoothing: float = 0.2):
        self.slowdown = slowdown
        self.min_tokens = min_tokens
        self.smoothing = smoothing  # weight of the newest observation
        self.decode_seconds: float | None = None  # a pure decode step
        self.token_seconds: float | None = None  # one prompt token beside decode rows

    def observe(self, num_decode_rows: int, num_prompt_tokens: int, seconds: float):
        """A step ran (without compiling) in `seconds`."""
        if num_prompt_tokens == 0:
            self.decode_seconds = self._average(self.decode_seconds, seconds)
        elif num_decode_rows and self.decode_seconds is not None:
            extra = max(seconds - self.decode_seconds, 0.0) / num_prompt_tokens
            self.token_seconds = self._average(self.token_seconds, extra)

    def prompt_tokens(self) -> int | None:
        """The most prompt tokens beside decode rows; None while unmeasured (no limit)."""
        if self.decode_seconds is None or not self.token_seconds:
            return None
        allowed = (self.slowdown - 1) * self.decode_seconds / self.token_seconds
        return max(self.min_tokens, int(allowed))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
