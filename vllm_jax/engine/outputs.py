"""What a request gives back (vLLM's RequestOutput / CompletionOutput, and EmbeddingRequestOutput
for embeddings)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    error: Exception | None = None  # why the engine gave up on it (finish_reason "error")


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """vLLM's: `LLM.embed(prompts)[i].outputs.embedding`."""
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


def logprob_entries(token: int, lp: float, top: dict) -> dict[int, Logprob]:
    """One position's {id: Logprob}: the top ids ranked, and the chosen token's (unranked
    when it is not among them)."""
    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    out = {int(i): Logprob(v, r + 1) for r, (i, v) in enumerate(ranked)}
    if token not in out:
        out[token] = Logprob(lp, None)
    return out
