"""Tool calls on /v1/chat/completions: what a request's `tools` and `tool_choice` ask of the
engine, and the model's output turned into OpenAI's `tool_calls`, whole or streamed.

`tool_use(req, tokenizer, parser)` validates the fields and returns a ToolUse: it adjusts the
sampling parameters (a JSON schema for `required` and named choices, special tokens kept for
formats that mark calls with them) and turns each choice's text into a message or stream deltas.
With `auto` the model writes calls in its own format, read by the parser the chat template (or
--tool-call-parser) names; `required` and named choices constrain the output to JSON, read as
JSON. Streamed deltas add up to the whole message.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from vllm_jax.engine import structured
from vllm_jax.sampling_params import SamplingParams, StructuredOutputs
from vllm_jax.server.protocol import APIError, ChatCompletionRequest
from vllm_jax.server.tool_parsers import (PARSERS, Event, JsonArrayParser, NamedFunctionParser,
                                          ToolParser, parse_output, parser_for_template)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: FunctionDefinition


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolUse:
    """How one request's output is read: as plain content when `make_parser` is None."""
    make_parser: Callable[[], ToolParser] | None = None
    schema: dict | None = None  # the JSON schema the output is constrained to
    keep_special_tokens: bool = False
    max_calls: int | None = None

    def adjust(self, params: SamplingParams):
        if self.schema is not None:
            if params.structured_outputs is not None:
                raise APIError("tool_choice 'required' or a named function cannot be combined "
                               "with response_format or another output constraint",
                               param="tool_choice")
            params.structured_outputs = StructuredOutputs(json=self.schema)
            try:
                structured.validate(params.structured_outputs)
            except ValueError as e:
                raise APIError(f"the tools' parameters schemas: {e}", param="tools") from None
        if self.keep_special_tokens:
            params.skip_special_tokens = False

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a finished choice and its finish reason."""
        if self.make_parser is None:
            return {"role": "assistant", "content": text}, finish_reason
        parsed = parse_output(self.make_parser(), text)
        if not parsed.calls:
            return {"role": "assistant", "content": parsed.content}, finish_reason
        calls = [{"id": new_call_id(), "type": "function",
                  "function": {"name": name, "arguments": arguments}}
                 for name, arguments in parsed.calls[:self.max_calls]]
        return {"role": "assistant", "content": parsed.content, "tool_calls": calls}, "tool_calls"

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self.make_parser() if self.make_parser else None, self.max_calls)


@dataclass
class ChoiceStream:
    """The `delta` objects of one streamed choice. With a parser, whitespace after the last
    content is held back and dropped if calls follow (the whole message strips it too)."""
    parser: ToolParser | None
    max_calls: int | None = None
    held: str = ""

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        """The deltas the end of the output releases."""
        if self.parser is None:
            return []
        deltas = self._deltas(self.parser.finish())
        if self.held and not self.called:
            deltas.append({"content": self.held})
        return deltas

    @property
    def called(self) -> bool:
        return bool(self.parser and self.parser.calls and not self.parser.broken)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.called else engine_reason

    def _deltas(self, events: list[Event]) -> list[dict]:
        out = []
        for e in events:
            if e.content is not None:
                out.extend(self._content(e.content))
            elif self.max_calls is None or e.index < self.max_calls:
                out.append({"tool_calls": [self._call_delta(e)]})
        return out

    def _content(self, text: str) -> list[dict]:
        text, self.held = self.held + text, ""
        body = text.rstrip()
        self.held = text[len(body):]
        return [{"content": body}] if body else []

    def _call_delta(self, e: Event) -> dict:
        if e.name is None:
            return {"index": e.index, "function": {"arguments": e.arguments}}
        return {"index": e.index, "id": new_call_id(), "type": "function",
                "function": {"name": e.name, "arguments": ""}}


def tool_use(req: ChatCompletionRequest, tokenizer, parser_name: str | None) -> ToolUse:
    """Validate the request's tool fields (400 as vLLM answers) and say how to read its output."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        return ToolUse()
    tools = _tool_definitions(req.tools)
    choice = "auto" if choice is None else choice
    max_calls = None if req.parallel_tool_calls is not False else 1
    if choice == "none":
        return ToolUse()
    if choice == "auto":
        return _auto(req, tokenizer, parser_name, max_calls)
    if choice == "required":
        schema = _required_schema(tools, max_calls)
        return ToolUse(JsonArrayParser, schema, max_calls=max_calls)
    function = _named_function(choice, tools)
    return ToolUse(lambda: NamedFunctionParser(function.name), _compact(_parameters(function)))


def _tool_definitions(tools: list) -> list[FunctionDefinition]:
    try:
        return [ToolDefinition.model_validate(t).function for t in tools]
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise APIError(f"invalid tool definition: {where}: {err['msg']}", param="tools") from None


def _auto(req, tokenizer, parser_name: str | None, max_calls: int | None) -> ToolUse:
    name = parser_name or parser_for_template(_template(req, tokenizer))
    if name is None:
        raise APIError('"auto" tool choice needs a tool-call parser: this model\'s chat template '
                       "shows no known tool-call format; start the server with "
                       f"--tool-call-parser ({', '.join(PARSERS)})", param="tool_choice")
    parser = PARSERS[name]
    special = {tokenizer.token_to_id(m) for m in parser.markers} & tokenizer.special_token_ids
    return ToolUse(parser, keep_special_tokens=bool(special), max_calls=max_calls)


def _template(req: ChatCompletionRequest, tokenizer) -> str | None:
    """The chat template this request renders with: the one that reads the tools."""
    templates = tokenizer.chat_templates
    if req.chat_template is not None:
        return templates.get(req.chat_template, req.chat_template)
    return templates.get("tool_use") or templates.get("default")


def _named_function(choice, tools: list[FunctionDefinition]) -> FunctionDefinition:
    if not isinstance(choice, dict):
        raise APIError(f"Invalid value for `tool_choice`: {choice!r}! Only named tools, "
                       '"none", "auto" or "required" are supported.', param="tool_choice")
    name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" \
        else None
    if not isinstance(name, str):
        raise APIError('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                       param="tool_choice")
    found = next((t for t in tools if t.name == name), None)
    if found is None:
        raise APIError(f"Tool '{name}' has not been passed in `tools`.", param="tool_choice")
    return found


def _parameters(function: FunctionDefinition) -> dict:
    return function.parameters or {"type": "object", "properties": {}}


def _compact(schema: dict) -> dict:
    """The schema as the output is held to it: no whitespace between JSON tokens and, where an
    object lists its properties without saying whether others may follow, no others (OpenAI's
    strict mode). Outputs still validate against the tool's schema; a small model could
    otherwise spend its whole budget on whitespace or on keys it invents."""
    return {**_closed(schema), "x-guidance": {"whitespace_flexible": False}}


SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
LEFT_AS_IS = ("enum", "const", "default", "examples", "allOf", "not")  # closing changes them


def _closed(schema):
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in LEFT_AS_IS:
            out[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _closed(s) for name, s in value.items()}
        else:
            out[key] = _closed(value)
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _required_schema(tools: list[FunctionDefinition], max_calls: int | None) -> dict:
    """An array of calls, each the name of one tool and arguments valid for that tool."""
    calls = [{"type": "object",
              "properties": {"name": {"const": t.name},
                             "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return _compact(schema)
