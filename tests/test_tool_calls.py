"""Tool calls: the format parsers on model outputs built from known calls (whole and streamed in
pieces cut anywhere), and the tool loop over loopback with the official openai client."""
from __future__ import annotations

import json
import random

import pytest

from vllm_jax.server.tool_calls import ToolUse
from vllm_jax.server.tool_parsers import (PARSERS, JsonArrayParser, NamedFunctionParser,
                                          parser_for_template)

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}),
         ("search", {"query": 'a "quoted" } brace ]', "tags": ["x", {"y": None}], "n": -1.5e3})]
BEFORE = "Let me look that up.\n\n"


def hermes(calls, before=BEFORE):
    return before + "".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>\n"
                            for n, a in calls)


def llama(calls, before=""):
    return "<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)


def mistral_array(calls, before=BEFORE):
    return before + "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def mistral_v11(calls, before=BEFORE):
    return before + "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)


def required(calls, before=""):
    return json.dumps([{"name": n, "parameters": a} for n, a in calls])


FORMATS = {"hermes": (hermes, PARSERS["hermes"]), "llama3_json": (llama, PARSERS["llama3_json"]),
           "mistral_array": (mistral_array, PARSERS["mistral"]),
           "mistral_v11": (mistral_v11, PARSERS["mistral"]),
           "required": (required, JsonArrayParser)}


def streamed(use: ToolUse, text: str, cuts: list[int]) -> tuple[dict, str | None, list[dict]]:
    """The message an OpenAI client assembles from the deltas of `text` cut at `cuts`."""
    stream = use.stream()
    bounds = [0, *cuts, len(text)]
    deltas = [d for a, b in zip(bounds, bounds[1:]) for d in stream.feed(text[a:b])]
    deltas += stream.finish()
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for call in d.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": call.get("id"), "type": call.get("type"),
                                                     "function": {"name": None, "arguments": ""}})
            entry["function"]["name"] = entry["function"]["name"] or call["function"].get("name")
            entry["function"]["arguments"] += call["function"]["arguments"]
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    elif message["content"] is None:
        message["content"] = ""
    return message, stream.finish_reason("stop"), deltas


def without_ids(message: dict) -> dict:
    calls = [{**c, "id": None} for c in message.get("tool_calls", [])]
    return {**message, **({"tool_calls": calls} if calls else {})}


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_output_gives_each_call_and_the_text_before_as_content(fmt):
    write, parser = FORMATS[fmt]
    text = write(CALLS)
    message, finish = ToolUse(parser).message(text, "stop")
    assert finish == "tool_calls"
    calls = message["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == CALLS
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    expected_content = BEFORE.rstrip() if BEFORE in text else None
    assert message["content"] == expected_content


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_deltas_add_up_to_the_whole_parse_wherever_the_text_is_cut(fmt):
    write, parser = FORMATS[fmt]
    text = write(CALLS)
    use = ToolUse(parser)
    whole = without_ids(use.message(text, "stop")[0])
    rng = random.Random(fmt)
    cut_sets = [[i] for i in range(len(text) + 1)]
    cut_sets += [sorted(rng.sample(range(len(text)), 12)) for _ in range(50)]
    cut_sets.append(list(range(1, len(text))))  # one character at a time
    for cuts in cut_sets:
        message, finish, _ = streamed(use, text, cuts)
        assert without_ids(message) == whole, cuts
        assert finish == "tool_calls"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_streamed_call_starts_with_id_type_and_name_then_sends_only_arguments(fmt):
    write, parser = FORMATS[fmt]
    text = write(CALLS)
    _, _, deltas = streamed(ToolUse(parser), text, list(range(1, len(text), 3)))
    call_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    for index in range(len(CALLS)):
        mine = [c for c in call_deltas if c["index"] == index]
        assert mine[0]["type"] == "function" and mine[0]["id"].startswith("call_")
        assert mine[0]["function"] == {"name": CALLS[index][0], "arguments": ""}
        assert len(mine) > 2  # the arguments arrive in pieces, as they are generated
        assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
                   for c in mine[1:])
    assert all(set(d) == {"content"} or set(d) == {"tool_calls"} for d in deltas)


MALFORMED = {
    "hermes": ["<tool_call>not json</tool_call> and more", "a <tool_call", "<tool_call>{}</tool_call>",
               "x <tool_call>[1, 2]</tool_call>"],
    "llama3_json": ['{"city": "Paris"}', "Plain answer.", '<|python_tag|>{"name": 7}', "  {"],
    "mistral": ["[TOOL_CALLS] not a call", "[TOOL_CALLS]", "[TOOL_CALLS][1, 2]",
                "[TOOL_CALLS]get weather[ARGS]{}"],
}


@pytest.mark.parametrize("name", MALFORMED)
def test_output_that_is_not_a_call_stays_content_whole_and_streamed(name):
    use = ToolUse(PARSERS[name])
    for text in MALFORMED[name]:
        message, finish = use.message(text, "length")
        assert message == {"role": "assistant", "content": text} and finish == "length"
        for cut in range(len(text) + 1):
            assert streamed(use, text, [cut])[0] == message, (text, cut)


@pytest.mark.parametrize("text", ['Hi <tool_call>{"name": "f", "arguments": {"a": [1, }}</tool_call>',
                                  '<tool_call>{"name": "f", "arguments": {"a": 1}'])
def test_a_call_that_breaks_after_its_name_makes_the_whole_output_content(text):
    message, finish = ToolUse(PARSERS["hermes"]).message(text, "length")
    assert message == {"role": "assistant", "content": text} and finish == "length"


def test_arguments_written_as_a_json_string_are_unwrapped():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    message, _ = ToolUse(PARSERS["hermes"]).message(text, "stop")
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"a": 1}


def test_text_between_and_after_calls_is_content():
    text = 'A<tool_call>{"name": "f", "arguments": {}}</tool_call> B <tool_call>' \
           '{"name": "g", "arguments": {}}</tool_call>\nC\n'
    message, _ = ToolUse(PARSERS["hermes"]).message(text, "stop")
    assert message["content"] == "A B \nC"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["f", "g"]


def test_parallel_tool_calls_false_keeps_the_first_call():
    use = ToolUse(PARSERS["hermes"], max_calls=1)
    message, _ = use.message(hermes(CALLS), "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == [CALLS[0][0]]
    assert without_ids(streamed(use, hermes(CALLS), [5, 40])[0]) == without_ids(message)


def test_named_function_output_is_its_arguments_object():
    use = ToolUse(lambda: NamedFunctionParser("get_weather"))
    text = json.dumps(CALLS[0][1])
    message, finish = use.message(text, "stop")
    assert message["content"] is None and finish == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": text}
    for cut in range(len(text) + 1):
        assert without_ids(streamed(use, text, [cut])[0]) == without_ids(message)


TEMPLATES = {
    "hermes": "{%- for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n"
              '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
    "mistral": "{%- if message.tool_calls %}[TOOL_CALLS][{%- for c in message.tool_calls %}",
    "llama3_json": "<|start_header_id|>ipython<|end_header_id|>",
    None: "{% for m in messages %}{{ m.content }}{% endfor %}",
}


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_parser_is_picked_from_the_markers_in_the_chat_template(name):
    assert parser_for_template(TEMPLATES[name]) == name
