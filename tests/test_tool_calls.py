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
    calls = [json.dumps({"name": n, "arguments": a}) for n, a in calls]
    return before + "".join(f"<tool_call>\n{call}\n</tool_call>\n" for call in calls)


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
    "hermes": ["<tool_call>not json</tool_call> and more", "a <tool_call",
               "<tool_call>{}</tool_call>", "x <tool_call>[1, 2]</tool_call>"],
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


@pytest.mark.parametrize("text", [
    'Hi <tool_call>{"name": "f", "arguments": {"a": [1, }}</tool_call>',
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


# -- over loopback ---------------------------------------------------------------------------------

TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {% for tool in tools %}{{ tool.function.name }} "
    "{% endfor %}as <tool_call>{..}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\n' + message['content'] }}"
    "{%- for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
         "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model(model_dir, tmp_path_factory):
    """The tiny llama with a Hermes-style tool template in its tokenizer_config.json."""
    import shutil

    path = tmp_path_factory.mktemp("tool_model") / "llama"
    shutil.copytree(model_dir("llama")[0], path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOL_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tool_server(tool_model):
    from openai import OpenAI
    from test_server import run_uvicorn

    from vllm_jax import LLM
    from vllm_jax.server import build_app
    from vllm_jax.server.serving import ServerState

    llm = LLM(model=str(tool_model), dtype="f32", max_model_len=512, kvcache_mem_mb=16,
              max_num_seqs=4)
    state = ServerState(lambda: llm.llm_engine, ["tiny"])
    srv, thread, url = run_uvicorn(build_app(state))
    assert state.engine_thread.ready.wait(30)
    yield url, OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.should_exit = True
    thread.join(30)


def assert_valid_calls(calls, names=None):
    import jsonschema

    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in (names or SCHEMAS)
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def stream_message(chunks) -> tuple[dict, str]:
    """The assistant message and finish reason a client assembles from streamed chunks."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for c in delta.tool_calls or []:
                entry = calls.setdefault(c.index, {"id": c.id, "type": c.type,
                                                   "function": {"name": c.function.name,
                                                                "arguments": ""}})
                entry["function"]["arguments"] += c.function.arguments or ""
            finish = choice.finish_reason or finish
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish


def ask(client, messages, stream: bool, **kw) -> tuple[dict, str]:
    kw = dict(model="tiny", messages=messages, tools=TOOLS, temperature=0,
              max_tokens=kw.pop("max_tokens", 100), **kw)
    if stream:
        return stream_message(client.chat.completions.create(stream=True, **kw))
    choice = client.chat.completions.create(**kw).choices[0]
    return choice.message.model_dump(exclude_none=True), choice.finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_two_turn_tool_loop_with_required_tool_choice(tool_server, stream):
    """parallel_tool_calls=False bounds the array: a random model would add calls until
    max_tokens."""
    client = tool_server[1]
    message, finish = ask(client, ASK, stream, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls", message
    assert len(message["tool_calls"]) == 1
    assert_valid_calls(message["tool_calls"])
    results = [{"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"temp_c": 21})}
               for c in message["tool_calls"]]
    answer, finish = ask(client, ASK + [message] + results, stream, max_tokens=8)
    assert finish in ("length", "stop") and "tool_calls" not in answer
    assert isinstance(answer["content"], str) and answer["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_named_tool_choice_calls_that_function(tool_server, stream):
    choice = {"type": "function", "function": {"name": "get_time"}}
    message, finish = ask(tool_server[1], ASK, stream, tool_choice=choice)
    assert finish == "tool_calls" and len(message["tool_calls"]) == 1
    assert_valid_calls(message["tool_calls"], names=["get_time"])


OPEN = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
    "when": {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1,
                                                      "maximum": 7}}, "required": ["day"]}},
    "required": ["city", "when"]}
CLOSED = {**OPEN, "additionalProperties": False, "properties": {
    **OPEN["properties"], "when": {**OPEN["properties"]["when"], "additionalProperties": False}}}


def test_constrained_arguments_hold_only_the_listed_properties(tool_server):
    """Objects that list their properties but do not say whether others may follow are held
    to those (OpenAI's strict mode): a small model invents keys until max_tokens otherwise."""
    import jsonschema

    tools = [{"type": "function", "function": {"name": "plan", "parameters": OPEN}}]
    r = tool_server[1].chat.completions.create(
        model="tiny", messages=ASK, tools=tools, max_tokens=100, temperature=1.0, seed=3,
        tool_choice={"type": "function", "function": {"name": "plan"}})
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments),
                        CLOSED)


HERMES_CALL = (r'Sure\. <tool_call>\{"name": "get_weather", "arguments": '
               r'\{"city": "(Paris|Tokyo)", "days": [1-7]\}\}</tool_call>')


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_reads_calls_in_the_format_the_chat_template_shows(tool_server, stream):
    """The model is held to a Hermes call by a regex; `auto` must find the call in its text."""
    message, finish = ask(tool_server[1], ASK, stream,
                          extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    assert finish == "tool_calls" and message["content"] == "Sure."
    assert_valid_calls(message["tool_calls"], names=["get_weather"])


def test_tool_messages_render_through_the_template_as_transformers_does(tool_server, tool_model):
    from transformers import AutoTokenizer

    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    import httpx

    r = httpx.post(tool_server[0] + "/tokenize", json={"model": "tiny", "messages": messages})
    assert r.status_code == 200, r.text
    ref = AutoTokenizer.from_pretrained(tool_model)
    as_mapping = {**call, "function": {**call["function"], "arguments": {"city": "Paris",
                                                                          "days": 2}}}
    ref_messages = ASK + [{"role": "assistant", "content": "", "tool_calls": [as_mapping]},
                          messages[2]]
    text = ref.apply_chat_template(ref_messages, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == ref.encode(text, add_special_tokens=False)


BAD_REQUESTS = [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS)
def test_bad_tool_fields_are_a_400_naming_the_field(tool_server, body, param):
    import httpx

    r = httpx.post(tool_server[0] + "/v1/chat/completions",
                   json={"model": "tiny", "messages": ASK, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_without_a_known_format_is_refused():
    from types import SimpleNamespace

    from vllm_jax.server.protocol import APIError, ChatCompletionRequest
    from vllm_jax.server.tool_calls import tool_use

    tok = SimpleNamespace(chat_templates={"default": TEMPLATES[None]})
    req = ChatCompletionRequest(messages=ASK, tools=TOOLS)
    with pytest.raises(APIError) as e:
        tool_use(req, tok, None)
    assert e.value.param == "tool_choice" and "--tool-call-parser" in e.value.message
    assert tool_use(req, SimpleNamespace(chat_templates={}, token_to_id=lambda t: None,
                                         special_token_ids=set()), "hermes").make_parser


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_none_leaves_a_call_in_the_text_unparsed(tool_server, stream):
    message, finish = ask(tool_server[1], ASK, stream, tool_choice="none",
                          extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    assert finish == "stop" and "tool_calls" not in message
    assert message["content"].startswith("Sure. <tool_call>{")


def test_formats_marked_by_special_tokens_keep_them_in_the_decoded_text(tool_model, tmp_path):
    """Mistral's [TOOL_CALLS] is a special token: decoding must keep it for the parser."""
    import shutil

    from vllm_jax.server.protocol import ChatCompletionRequest
    from vllm_jax.server.tool_calls import tool_use
    from vllm_jax.tokenizer import Tokenizer

    shutil.copytree(tool_model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["[TOOL_CALLS]", "[ARGS]"]
    config["chat_template"] = TEMPLATES["mistral"] + "{% endfor %}]{% endif %}"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path / "m")
    use = tool_use(ChatCompletionRequest(messages=ASK, tools=TOOLS), tok, None)
    assert use.keep_special_tokens
    ids = tok.encode(mistral_v11(CALLS), add_special_tokens=False)
    message, _ = use.message(tok.decode(ids, skip_special_tokens=False), "stop")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]] == CALLS
    assert not tool_use(ChatCompletionRequest(messages=ASK, tools=TOOLS), tok,
                        "hermes").keep_special_tokens


def test_tool_call_parser_flag_takes_the_known_format_names():
    import argparse

    from vllm_jax.server import add_server_args

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    assert parser.parse_args(["--tool-call-parser", "mistral"]).tool_call_parser == "mistral"
    assert parser.parse_args([]).tool_call_parser is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--tool-call-parser", "nonesuch"])
