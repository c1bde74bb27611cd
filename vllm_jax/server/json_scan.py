"""Reading JSON as it arrives: where a value ends, and a tool-call object's name and arguments.

Both readers keep their place between calls, so text that grows by a few characters at a time
is scanned once in all; neither decides validity (json.loads does, once a value is whole).
"""
from __future__ import annotations

import json

WHITESPACE = " \t\n\r"
SCALAR_END = ",}]" + WHITESPACE


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


class ValueScanner:
    """Finds the end of the JSON value starting at `start` (a non-space character)."""

    def __init__(self, start: int):
        self.start = self.pos = start
        self.depth = 0
        self.in_string = self.escaped = False
        self.end: int | None = None

    def advance(self, text: str, final: bool = False) -> int | None:
        """The index after the value once it is whole, else None (text may grow)."""
        if self.end is None:
            first = text[self.start]
            if first in "{[\"":
                self._scan_nested(text)
            else:
                self._scan_scalar(text, final)
        return self.end

    def _scan_nested(self, text: str):
        pos = self.pos
        while pos < len(text):
            ch = text[pos]
            pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.end = pos
                        break
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = pos
                    break
        self.pos = pos

    def _scan_scalar(self, text: str, final: bool):
        pos = self.pos
        while pos < len(text) and text[pos] not in SCALAR_END:
            pos += 1
        self.pos = pos
        if pos < len(text) or final:
            self.end = pos

    def is_container(self, text: str) -> bool:
        """An object or array: every character scanned so far belongs to the value."""
        return text[self.start] in "{["


class CallObject:
    """One tool call written as a JSON object: {"name": "f", "<arguments key>": {...}}, in any
    key order, other keys ignored. `name` is set once its string is whole; `arguments` is the
    scanner of the arguments value once it has begun."""

    def __init__(self, start: int, argument_keys: tuple[str, ...]):
        self.start = self.pos = start
        self.argument_keys = argument_keys
        self.expect = "{"
        self.key: str | None = None
        self.value: ValueScanner | None = None
        self.name: str | None = None
        self.arguments: ValueScanner | None = None
        self.end: int | None = None
        self.failed = False

    def valid(self, text: str) -> bool:
        try:
            json.loads(text[self.start:self.end])
        except json.JSONDecodeError:
            return False
        return self.name is not None

    def advance(self, text: str, final: bool = False):
        while self.end is None and not self.failed:
            self.pos = skip_space(text, self.pos)
            if self.pos >= len(text):
                self.failed = final
                return
            if not self._step(text, text[self.pos], final):
                return

    def _step(self, text: str, ch: str, final: bool) -> bool:
        """Consume one structural element; False while the element is still incomplete."""
        if self.expect == "{":
            self.start = self.pos
            return self._punct(ch, "{", "key")
        if self.expect == "key":
            if ch != '"':
                return self._fail()
            return self._read_value(text, final, self._on_key)
        if self.expect == ":":
            return self._punct(ch, ":", "value")
        if self.expect == "value":
            return self._read_value(text, final, self._on_value)
        if ch == "}":
            self.end = self.pos + 1
            return True
        return self._punct(ch, ",", "key")

    def _punct(self, ch: str, wanted: str, then: str) -> bool:
        if ch != wanted:
            return self._fail()
        self.pos += 1
        self.expect = then
        return True

    def _fail(self) -> bool:
        self.failed = True
        return False

    def _read_value(self, text: str, final: bool, on_whole) -> bool:
        if self.value is None:
            self.value = ValueScanner(self.pos)
            if self.expect == "value" and self.key in self.argument_keys \
                    and self.arguments is None:
                self.arguments = self.value
        end = self.value.advance(text, final)
        if end is None:
            self.failed = final
            return False
        raw, self.value, self.pos = text[self.value.start:end], None, end
        return on_whole(raw)

    def _on_key(self, raw: str) -> bool:
        try:
            self.key = json.loads(raw)
        except json.JSONDecodeError:
            return self._fail()
        self.expect = ":"
        return True

    def _on_value(self, raw: str) -> bool:
        self.expect = ",}"
        if self.key == "name" and self.name is None:
            try:
                name = json.loads(raw)
            except json.JSONDecodeError:
                return self._fail()
            if not isinstance(name, str) or not name:
                return self._fail()
            self.name = name
        return True


class NamedArguments:
    """A call whose name came before its JSON (Mistral's `name[ARGS]{...}`): only the arguments
    value is read; the same attributes as CallObject."""

    def __init__(self, name: str, start: int):
        self.name, self.pos = name, start
        self.arguments: ValueScanner | None = None
        self.end: int | None = None
        self.failed = False

    def advance(self, text: str, final: bool = False):
        if self.arguments is None:
            self.pos = skip_space(text, self.pos)
            if self.pos >= len(text):
                self.failed = final
                return
            self.arguments = ValueScanner(self.pos)
        self.end = self.arguments.advance(text, final)
        self.failed = self.end is None and final

    def valid(self, text: str) -> bool:
        return True
