"""OpenAI-compatible request bodies (pydantic) and the error shape, as vLLM's server uses them.

Unknown fields are accepted and ignored, so any OpenAI client (or `vllm bench serve`) can talk
to the server; fields that would change the output but are not implemented are refused.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from vllm_jax.engine import structured
from vllm_jax.pooling_params import PoolingParams
from vllm_jax.sampling_params import ParamError, SamplingParams, StructuredOutputs

MAX_N = 16  # outputs per request a client may ask for
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on an embeddings input array

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
    tool_calls: list[dict] | None = None  # an assistant's calls: {id, type, function}
    tool_call_id: str | None = None  # a tool's answer: the call it answers


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
    response_format: dict | None = None
    structured_outputs: dict | None = None  # vLLM's {json, regex, choice, grammar, json_object}
    guided_json: Union[dict, str, None] = None  # vLLM's older names for the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    # SamplingParams field -> the request field it came from
    PARAM_NAMES: ClassVar[dict] = {"prompt_logprobs": "logprobs"}

    def api_error(self, e: ParamError) -> APIError:
        return APIError(str(e), param=self.PARAM_NAMES.get(e.param, e.param))

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
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_outputs=self.output_constraint())
        except ParamError as e:
            raise self.api_error(e) from None

    def output_constraint(self) -> StructuredOutputs | None:
        """The one structured-output constraint the request sets, its grammar checked; 400
        (with the field as `param`) when it is malformed or several are set."""
        given = [(name, so) for name, so in self._constraints() if so is not None]
        if not given:
            return None
        if len(given) > 1:
            raise APIError(f"set only one of {', '.join(name for name, _ in given)}",
                           param=given[1][0])
        name, so = given[0]
        try:
            structured.validate(so)
        except (ValueError, TypeError) as e:  # TypeError: a field of the wrong JSON type
            raise APIError(str(e), param=name) from None
        return so

    def _constraints(self):
        yield "response_format", _response_format(self.response_format)
        so = self.structured_outputs
        if so is not None:
            unknown = set(so) - set(StructuredOutputs.__slots__)
            if unknown:
                raise APIError(f"structured_outputs: unsupported fields {sorted(unknown)}",
                               param="structured_outputs")
            yield "structured_outputs", StructuredOutputs(**so)
        for name, field in [("guided_json", "json"), ("guided_regex", "regex"),
                            ("guided_choice", "choice"), ("guided_grammar", "grammar")]:
            value = getattr(self, name)
            yield name, None if value is None else StructuredOutputs(**{field: value})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingRequest):
    PARAM_NAMES: ClassVar[dict] = {"logprobs": "top_logprobs"}
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None

    def engine_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("when using `top_logprobs`, `logprobs` must be set to true",
                           param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict]:
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "".join(_text_part(p) for p in m.content)
            elif m.content is None:  # an assistant's calls: templates add content up (vLLM: "")
                d["content"] = ""
            if m.tool_calls:
                d["tool_calls"] = [_call_for_template(c) for c in m.tool_calls]
            out.append(d)
        return out


def _response_format(fmt: dict | None) -> StructuredOutputs | None:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    if kind != "json_schema":
        raise APIError(f"response_format type must be text, json_object or json_schema, got "
                       f"{kind!r}", param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise APIError("response_format json_schema must be an object with a `schema` object",
                       param="response_format")
    return StructuredOutputs(json=spec.get("schema", {}))


def _text_part(part: dict) -> str:
    if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise APIError(f"only text content parts are supported, got {part.get('type')!r}",
                       param="messages")
    return part["text"]


def _call_for_template(call: dict) -> dict:
    """Templates read a call's arguments as a mapping; OpenAI clients send them as JSON text."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError("each entry of tool_calls needs function.name", param="messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise APIError(f"tool call arguments are not JSON: {arguments[:80]!r}",
                           param="messages") from None
    return {**call, "function": {**function, "arguments": arguments}}


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


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    add_special_tokens: bool = True  # vLLM's
    normalize: bool = True  # vLLM's: L2-normalize the pooled vector

    def input_list(self) -> list[str | list[int]]:
        """One entry per embedding: a string or a token id list."""
        single = isinstance(self.input, str) or (self.input and isinstance(self.input[0], int))
        items = [self.input] if single else list(self.input)
        if not items:
            raise APIError("input cannot be an empty list", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise APIError(f"input has {len(items)} entries; at most {MAX_EMBEDDING_INPUTS} are "
                           f"allowed", param="input")
        return items

    def pooling_params(self, hidden_size: int) -> PoolingParams:
        params = PoolingParams(normalize=self.normalize, dimensions=self.dimensions)
        try:
            params.verify(hidden_size)
        except ValueError as e:
            raise APIError(str(e), param="dimensions") from None
        return params
