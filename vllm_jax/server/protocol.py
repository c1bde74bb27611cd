"""OpenAI-compatible request bodies (pydantic) and the error shape, as vLLM's server uses them.

Unknown fields are accepted and ignored, so any OpenAI client (or `vllm bench serve`) can talk
to the server; fields that would change the output but are not implemented are refused.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from vllm_jax.sampling_params import SamplingParams

MAX_N = 16

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: str | None = None


class SamplingRequest(OpenAIModel):
    """The fields chat and completion requests share."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    best_of: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" (vLLM's option)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        if not 1 <= self.n <= MAX_N:
            raise APIError(f"n must be between 1 and {MAX_N}, got {self.n}", param="n")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(f"best_of must equal n ({self.n}): only best_of == n is supported, "
                           f"got {self.best_of}", param="best_of")
        if self.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options can only be set when stream is true",
                           param="stream_options")

        def pick(v, name, default):
            return defaults.get(name, default) if v is None else v

        try:
            return SamplingParams(
                n=self.n, temperature=pick(self.temperature, "temperature", 1.0),
                top_p=pick(self.top_p, "top_p", 1.0), top_k=pick(self.top_k, "top_k", 0),
                min_p=pick(self.min_p, "min_p", 0.0),
                presence_penalty=pick(self.presence_penalty, "presence_penalty", 0.0),
                frequency_penalty=pick(self.frequency_penalty, "frequency_penalty", 0.0),
                repetition_penalty=pick(self.repetition_penalty, "repetition_penalty", 1.0),
                seed=self.seed,
                max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:
            raise APIError(str(e), param=str(e).split(" ")[0]) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("when using `top_logprobs`, `logprobs` must be set to true",
                           param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict]:
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError("response_format other than text is not supported",
                           param="response_format")
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "".join(_text_part(p) for p in m.content)
            out.append(d)
        return out


def _text_part(part: dict) -> str:
    if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise APIError(f"only text content parts are supported, got {part.get('type')!r}",
                       param="messages")
    return part["text"]


class CompletionRequest(SamplingRequest):
    # list[int] before list[str]: pydantic then accepts 2.8M token ids in 70 ms, not 700 ms
    # (a failed list[str] first collects an error per id)
    prompt: Union[str, list[int], list[list[int]], list[str]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True

    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a token id list."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p:
            raise APIError("prompt must not be empty", param="prompt")
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        return list(p)


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]
