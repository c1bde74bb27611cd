"""Per-request embedding parameters (vLLM's PoolingParams fields that apply to embeddings) and
the checks an embedding prompt must pass before it reaches the device."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PoolingParams:
    normalize: bool = True  # L2-normalize the pooled vector
    dimensions: int | None = None  # None or the hidden size: the models here are not matryoshka

    def verify(self, hidden_size: int):
        if self.dimensions is not None and self.dimensions != hidden_size:
            raise ValueError(
                f"dimensions={self.dimensions} is not supported: this model does not support "
                f"matryoshka representation, so its embeddings have exactly {hidden_size} "
                f"dimensions")


def check_embedding_prompt(ids: list[int], max_model_len: int, vocab_size: int):
    """Raises ValueError for a prompt that cannot be embedded: empty, longer than the model's
    context, or with an id outside the vocabulary."""
    if not ids:
        raise ValueError("an embedding input cannot be empty")
    if len(ids) > max_model_len:
        raise ValueError(f"This model's maximum context length is {max_model_len} tokens. "
                         f"However, you requested {len(ids)} tokens in the input for "
                         f"embedding generation. Please reduce the length of the input.")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of vocabulary (size {vocab_size})")
