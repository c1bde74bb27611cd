"""Structured output: a request's StructuredOutputs as an llguidance grammar, one matcher per
sequence, and the per-row bitmask of the tokens each matcher allows next.

A matcher has consumed exactly the sequence's output tokens: it advances once per appended
token (a recomputed prefill after preemption appends nothing twice). Bit `t % 32` of word
`t // 32` in a row says whether token id t may be sampled; ids past the tokenizer's vocabulary
(embedding rows no token maps to) are never allowed in a constrained row.
"""
from __future__ import annotations

import json
import logging

import llguidance
import llguidance.numpy as llg_np
import numpy as np

from vllm_jax.sampling_params import StructuredOutputs
from vllm_jax.tokenizer import Tokenizer

log = logging.getLogger("vllm_jax")

ALL_ALLOWED = -1  # an int32 word with every bit set


def _json_schema(schema: dict | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def grammar(so: StructuredOutputs) -> str:
    """The llguidance grammar for the one constraint `so` sets; ValueError when it sets none or
    several, or when it is malformed (the grammar itself is checked by `validate`)."""
    given = {"json": so.json is not None, "json_object": so.json_object,
             "regex": so.regex is not None, "choice": so.choice is not None,
             "grammar": so.grammar is not None}
    names = [k for k, v in given.items() if v]
    if len(names) != 1:
        raise ValueError(f"structured_outputs must set exactly one of {', '.join(given)}; "
                         f"got {', '.join(names) or 'none'}")
    if so.json is not None:
        return _json_schema(so.json)
    if so.json_object:
        return _json_schema({"type": "object"})
    if so.regex is not None:
        return llguidance.grammar_from("regex", so.regex)
    if so.choice is not None:
        if not (isinstance(so.choice, list) and so.choice
                and all(isinstance(c, str) for c in so.choice)):
            raise ValueError("choice must be a non-empty list of strings")
        return llguidance.grammar_from("choice", so.choice)
    return llguidance.grammar_from("grammar", so.grammar)  # Lark, or GBNF converted to Lark


def validate(so: StructuredOutputs) -> str:
    """The grammar for `so`, checked without a tokenizer (no engine needed, so the server can
    refuse a bad one before queueing it); ValueError with llguidance's message."""
    g = grammar(so)
    error = llguidance.LLMatcher.validate_grammar(g)
    if error:
        raise ValueError(f"invalid {_kind(so)}: {error}")
    return g


def _kind(so: StructuredOutputs) -> str:
    if so.json is not None or so.json_object:
        return "JSON schema"
    return "regex" if so.regex is not None else "choice" if so.choice is not None else "grammar"


class StructuredOutputManager:
    """Compiles matchers against the model's tokenizer (converted once, on first use) and
    fills the bitmask rows of a step."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.words = -(-self.vocab_size // 32)  # int32 words per bitmask row
        self._llg_tokenizer = None
        self._executor = None

    @property
    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._llg_tokenizer is None:  # ~0.4 s for a 49k vocabulary
            self._llg_tokenizer = llguidance.LLTokenizer(
                self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                eos_token=self.tokenizer.eos_token_ids)
            self._executor = llguidance.LLExecutor()
        return self._llg_tokenizer

    def matchers(self, so: StructuredOutputs, n: int) -> list[llguidance.LLMatcher]:
        """n matchers at the start of `so`'s language; ValueError when it does not compile."""
        first = llguidance.LLMatcher(self.llg_tokenizer, validate(so), log_level=0)
        if first.is_error():
            raise ValueError(f"invalid {_kind(so)}: {first.get_error()}")
        return [first] + [first.deep_copy() for _ in range(n - 1)]

    def bitmask(self, matchers: list) -> np.ndarray:
        """[len(matchers), words] int32: each row's allowed next tokens (all bits set for a row
        whose matcher is None)."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        mask = np.full((len(matchers), self.words), ALL_ALLOWED, np.int32)
        llg_np.fill_next_token_bitmask_par(self._executor, rows, mask)
        return mask

    @staticmethod
    def advance(seq, token: int) -> bool:
        """Feed the sequence's matcher its sampled token; True when the output is complete (only
        EOS could follow) or the token broke the grammar (the mask left the sampler nothing)."""
        matcher = seq.matcher
        if not matcher.consume_token(token):
            log.warning("request %s: token %d breaks its structured output constraint: %s",
                        seq.request_id, token, matcher.get_error())
            return True
        return matcher.is_stopped()
