"""Per-request sampling parameters (vLLM's names and defaults), and a model's own defaults."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vllm_jax.runner.sampler import MAX_LOGPROBS

MAX_N = 16384  # outputs per request: vLLM's default VLLM_MAX_N_SEQUENCES (the server: 16)
INT32_MAX = 2**31 - 1  # the runner's per-row parameter arrays are int32
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ParamError(ValueError):
    """A request parameter out of range; `param` names it (the OpenAI error body's field)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _check(ok: bool, param: str, message: str):
    if not ok:
        raise ParamError(param, message)


def _check_int(param: str, value, low: int, high: int = INT32_MAX, allowed: str = ""):
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), param,
           f"{param} must be an integer, got {value!r}")
    _check(low <= value <= high, param,
           f"{param} must be {allowed or f'in [{low}, {high}]'}, got {value}")


def _check_float(param: str, value, allowed: str, inside: Callable[[float], bool]):
    """value: a number that float32 holds (finite) and inside(value)."""
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool), param,
           f"{param} must be a number, got {value!r}")
    _check(math.isfinite(value) and abs(value) <= FLOAT32_MAX, param,
           f"{param} must be a finite number (float32), got {value}")
    _check(inside(value), param, f"{param} must be {allowed}, got {value}")


def check_text(param: str, text: str):
    """Text must be encodable as UTF-8: a lone surrogate (JSON's "\\ud800") is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParamError(param, f"{param} is not valid text: {e.reason} at position "
                                f"{e.start}") from None


@dataclass(slots=True)
class StructuredOutputs:
    """Constrains a request's output to a language (vLLM's names); set exactly one field."""
    json: dict | str | None = None  # a JSON schema, as a dict or its JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    structured_outputs: StructuredOutputs | None = None
    stop_strings: tuple = field(init=False, default=())

    def __post_init__(self):
        self.stop_strings = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self):
        """The checks that need no model: types, ranges, finite floats, ints that fit int32."""
        _check_int("n", self.n, 1, MAX_N)
        _check_float("temperature", self.temperature, "non-negative", lambda v: v >= 0)
        _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, 0,
                   allowed=f"-1 or 0 (off) or in [1, {INT32_MAX}]")
        _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_float("presence_penalty", self.presence_penalty, "in [-2, 2]",
                     lambda v: -2 <= v <= 2)
        _check_float("frequency_penalty", self.frequency_penalty, "in [-2, 2]",
                     lambda v: -2 <= v <= 2)
        _check_float("repetition_penalty", self.repetition_penalty, "greater than zero",
                     lambda v: v > 0)
        if self.seed is not None:
            _check_int("seed", self.seed, -2**63, 2**64 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens or INT32_MAX)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, MAX_LOGPROBS)
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0)
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
               "stop must be a non-empty string or a list of non-empty strings")
        for s in self.stop_strings:
            check_text("stop", s)

    def check_for_model(self, vocab_size: int):
        """The checks against the model: every token id in the vocabulary, top_k within it."""
        _check_int("top_k", self.top_k, 0, vocab_size,
                   allowed=f"-1 or 0 (off) or in [1, {vocab_size}] (the vocabulary size)")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0, vocab_size - 1,
                       allowed=f"a token id of the vocabulary (size {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


# What llama.cpp samples with unless told otherwise; small models stay coherent with them.
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def model_defaults(model_path) -> tuple[dict, str]:
    """The sampling defaults for requests that leave them unset, and where they come from: the
    model folder's generation_config.json when it sets any (vLLM's default), else llama.cpp's."""
    file = Path(model_path) / "generation_config.json"
    if file.is_file():
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            config = {}
        found = {k: config[k] for k in GENERATION_CONFIG_KEYS if config.get(k) is not None}
        if found:
            return found, "generation_config.json"
    return dict(LLAMA_CPP_DEFAULTS), "llama.cpp's defaults"


def describe(defaults: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in defaults.items())
