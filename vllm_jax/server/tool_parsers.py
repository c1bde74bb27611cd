"""Tool calls in a model's output, in the formats models write them, read as the text arrives.

A parser is fed the text in pieces and returns events: content (text outside the calls), a call
beginning (index and name) and fragments of that call's arguments (a JSON object's text). The
events do not depend on where the pieces were cut: text that might begin a marker is held back
until it is decided. `parse_output` feeds the whole text at once, so a streamed response and a
whole one say the same. A block that turns out not to be a call before its name is known is
passed on as content; one that breaks after (`broken`) makes the whole output content.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vllm_jax.server.json_scan import CallObject, NamedArguments, skip_space

NAME = re.compile(r"[\w.\-]+")


@dataclass(slots=True)
class Event:
    content: str | None = None
    index: int | None = None
    name: str | None = None  # set on a call's first event
    arguments: str | None = None


@dataclass(slots=True)
class ParsedOutput:
    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments as JSON text)


def parse_output(parser: ToolParser, text: str) -> ParsedOutput:
    """The whole-output parse: the content is the text outside the calls without its trailing
    whitespace (None when nothing is left); with no calls (or a broken one) all the text."""
    events = parser.feed(text) + parser.finish()
    if parser.broken or not parser.calls:
        return ParsedOutput(text, [])
    content = "".join(e.content for e in events if e.content is not None).rstrip()
    return ParsedOutput(content or None, [(name, args) for name, args in parser.calls])


def _partial_marker(text: str, start: int, marker: str) -> int:
    """The length of the longest end of text[start:] that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser:
    """The machinery the formats share: a state method runs until it needs more text."""
    name = ""
    markers: tuple[str, ...] = ()  # written as special tokens by some models: decode must keep them
    argument_keys = ("arguments",)

    def __init__(self):
        self.text = ""
        self.pos = 0  # what is before it has been turned into events
        self.final = self.broken = False
        self.calls: list[list[str]] = []  # [name, arguments sent] of each call begun
        self.block_calls = 0  # len(calls) when the current block of calls began
        self.marker_start = self.marker_end = 0
        self.call: CallObject | NamedArguments | None = None
        self.current: list[str] | None = None  # [name, arguments sent] of the call being read
        self.after_call = self.start
        self.events: list[Event] = []
        self.state = self.start

    def feed(self, delta: str) -> list[Event]:
        self.text += delta
        return self._run()

    def finish(self) -> list[Event]:
        self.final = True
        return self._run()

    def _run(self) -> list[Event]:
        while self.state():
            pass
        events, self.events = self.events, []
        return events

    def start(self) -> bool:
        raise NotImplementedError

    # -- content ----------------------------------------------------------------------------------

    def _emit_content(self, upto: int):
        if upto > self.pos:
            self.events.append(Event(content=self.text[self.pos:upto]))
            self.pos = upto

    def _scan_content(self, marker: str, then) -> bool:
        """Content up to `marker`, then the state `then` after it."""
        k = self.text.find(marker, self.pos)
        if k < 0:
            held = 0 if self.final else _partial_marker(self.text, self.pos, marker)
            self._emit_content(len(self.text) - held)
            return False
        self._emit_content(k)
        self._begin_block(k, k + len(marker))
        self.state = then
        return True

    def _begin_block(self, start: int, end: int):
        self.marker_start, self.marker_end, self.pos = start, end, end
        self.block_calls = len(self.calls)

    def _rest_as_content(self) -> bool:
        self._emit_content(len(self.text))
        return False

    def _fall_back(self) -> bool:
        if len(self.calls) > self.block_calls:
            self.broken = True
            self.state = self._rest_as_content
            return True
        return self._not_a_call()

    def _not_a_call(self) -> bool:
        """A block that was not a call: its marker is content and reading goes on after it."""
        self.pos = self.marker_start
        self._emit_content(self.marker_end)
        self.state = self.start
        return True

    def _next_char(self) -> int | None:
        """Where the next non-space character is; None while there is none (at the end of the
        output, after falling back: what came was not a call)."""
        pos = skip_space(self.text, self.pos)
        if pos < len(self.text):
            return pos
        if self.final:
            self._fall_back()
        return None

    def _array_item(self) -> bool:
        return self._begin_call(self.pos, self._array_next)

    def _array_next(self) -> bool:
        """After a call in a JSON array: another one, or the array's end."""
        pos = self._next_char()
        if pos is None:
            return self.final
        if self.text[pos] not in ",]":
            return self._fall_back()
        self.pos = pos + 1
        self.state = self._array_item if self.text[pos] == "," else self.after_array
        return True

    # -- calls ------------------------------------------------------------------------------------

    def _begin_call(self, pos: int, then, name: str | None = None):
        """Read a call from `pos`, then go on with the state `then`."""
        self.call = NamedArguments(name, pos) if name else CallObject(pos, self.argument_keys)
        self.pos, self.current, self.after_call = pos, None, then
        self.state = self._in_call
        return True

    def _in_call(self) -> bool:
        """Send the call's name and arguments as they become known."""
        call, text = self.call, self.text
        call.advance(text, self.final)
        if call.name is not None and self.current is None:
            self._start_call(call.name)
        args = call.arguments
        if self.current is not None and args is not None and args.is_container(text):
            self._send_arguments(text[args.start:args.pos])
        if call.failed or (call.end is not None and not call.valid(text)):
            return self._fall_back()
        if call.end is None:
            return False
        whole = self._whole_arguments()
        if whole is None:
            return self._fall_back()
        self._send_arguments(whole)
        self.pos, self.state = call.end, self.after_call
        return True

    def _start_call(self, name: str):
        self.current = [name, ""]
        self.calls.append(self.current)
        self.events.append(Event(index=len(self.calls) - 1, name=name))

    def _send_arguments(self, full: str):
        """Send what `full` (the arguments so far) adds to what was sent."""
        sent = self.current[1]
        if len(full) > len(sent):
            self.events.append(Event(index=len(self.calls) - 1, arguments=full[len(sent):]))
            self.current[1] = full

    def _whole_arguments(self) -> str | None:
        """The arguments as OpenAI sends them: the object's text (a string holding JSON is
        unwrapped); None when they are not an object."""
        args = self.call.arguments
        if args is None:
            return "{}"
        raw = self.text[args.start:args.end]
        try:
            value = json.loads(raw)
            if isinstance(value, str):
                value, raw = json.loads(value), value
        except json.JSONDecodeError:
            return None
        return raw if isinstance(value, dict) else None


class HermesParser(ToolParser):
    """Hermes, Qwen 2.5, Qwen 3: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`."""
    name = "hermes"
    open, close = "<tool_call>", "</tool_call>"

    def start(self) -> bool:
        return self._scan_content(self.open, self._call)

    def _call(self) -> bool:
        return self._begin_call(self.pos, self._close)

    def _close(self) -> bool:
        pos = skip_space(self.text, self.pos)
        rest = self.text[pos:]
        if rest.startswith(self.close):
            self.pos = pos + len(self.close)
        elif not self.final and self.close.startswith(rest):
            return False
        self.state = self.start  # a missing closing tag is forgiven
        return True


class WholeOutputParser(ToolParser):
    """Formats whose calls make up the whole output: anything else makes it all content."""

    def _not_a_call(self) -> bool:
        self.pos = self.marker_start
        self.state = self._rest_as_content
        return True


class Llama3JsonParser(WholeOutputParser):
    """Llama 3.1+: `{"name": .., "parameters": {..}}`, optionally after `<|python_tag|>`,
    several separated by `;`."""
    name = "llama3_json"
    tag = "<|python_tag|>"
    markers = (tag,)
    argument_keys = ("parameters", "arguments")

    def start(self) -> bool:
        pos = skip_space(self.text, 0)
        rest = self.text[pos:]
        if rest.startswith(self.tag):
            pos += len(self.tag)
        elif not rest.startswith("{"):
            if not self.final and self.tag.startswith(rest):
                return False
            return self._not_a_call()
        return self._begin_call(pos, self._separator)

    def _separator(self) -> bool:
        pos = skip_space(self.text, self.pos)
        if pos >= len(self.text):
            return False
        if self.text[pos] != ";":
            self.state = self._rest_as_content
            return True
        return self._begin_call(pos + 1, self._separator)


class JsonArrayParser(WholeOutputParser):
    """`[{"name": .., "parameters": {..}}, ..]`: what `tool_choice: "required"` constrains the
    output to."""
    name = "json_array"
    argument_keys = ("parameters", "arguments")

    def start(self) -> bool:
        pos = self._next_char()
        if pos is None:
            return self.final
        if self.text[pos] != "[":
            return self._not_a_call()
        self._begin_block(0, pos + 1)
        self.after_array, self.state = self._rest_as_content, self._array_item
        return True


class NamedFunctionParser(ToolParser):
    """A call of a function the request named: the output is its arguments object alone."""

    def __init__(self, function: str):
        super().__init__()
        self.function = function

    def start(self) -> bool:
        return self._begin_call(0, self._rest_as_content, name=self.function)


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS]` and a JSON array of {"name", "arguments"}, or (tokenizer v11+)
    `[TOOL_CALLS]name[ARGS]{..}` for each call."""
    name = "mistral"
    marker, args_marker = "[TOOL_CALLS]", "[ARGS]"
    markers = (marker, args_marker)

    def start(self) -> bool:
        return self._scan_content(self.marker, self._after_marker)

    def _after_marker(self) -> bool:
        pos = self._next_char()
        if pos is None:
            return self.final
        if self.text[pos] == "[":
            self.pos, self.after_array, self.state = pos + 1, self.start, self._array_item
        else:
            self.state = self._name
        return True

    def _name(self) -> bool:
        k = self.text.find(self.args_marker, self.pos)
        if k < 0:
            held = _partial_marker(self.text, self.pos, self.args_marker)
            name = self.text[self.pos:len(self.text) - held].strip()
            if self.final or (name and not NAME.fullmatch(name)):
                return self._fall_back()
            return False
        name = self.text[self.pos:k].strip()
        if not NAME.fullmatch(name):
            return self._fall_back()
        return self._begin_call(k + len(self.args_marker), self.start, name=name)


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
# What a chat template holds when it teaches its model one of the formats.
TEMPLATE_MARKERS = [("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                    ("<|python_tag|>", "llama3_json"), ("ipython", "llama3_json")]


def parser_for_template(template: str | None) -> str | None:
    """The format a chat template teaches its model to write calls in, or None."""
    return next((name for marker, name in TEMPLATE_MARKERS if marker in (template or "")), None)
