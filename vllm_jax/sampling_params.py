"""Per-request sampling parameters (vLLM's names and defaults), and a model's own defaults."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vllm_jax.runner.sampler import MAX_LOGPROBS


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
        def check(ok, what):
            if not ok:
                raise ValueError(what)
        check(self.n >= 1, f"n must be at least 1, got {self.n}")
        check(self.temperature >= 0, f"temperature must be non-negative, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")
        check(self.max_tokens is None or self.max_tokens >= 1,
              f"max_tokens must be at least 1, got {self.max_tokens}")
        check(self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
              f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            check(v is None or 0 <= v <= MAX_LOGPROBS,
                  f"{name} must be in [0, {MAX_LOGPROBS}], got {v}")
        check(all(isinstance(s, str) and s for s in self.stop_strings),
              "stop must be a non-empty string or a list of non-empty strings")

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
