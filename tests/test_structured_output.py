"""Structured output: outputs that a JSON-schema validator, re.fullmatch or llguidance accept,
masks equal to numpy's argmax over the allowed tokens of transformers' logits, no recompiles."""
from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import llguidance
import llguidance.numpy as llg_np
import numpy as np
import pytest
import torch
from openai import BadRequestError, OpenAI
from test_server import CHAT, run_uvicorn

from vllm_jax import LLM, SamplingParams
from vllm_jax.engine.structured import StructuredOutputManager
from vllm_jax.runner.sampler import apply_bitmask
from vllm_jax.sampling_params import StructuredOutputs
from vllm_jax.server import build_app
from vllm_jax.server.serving import ServerState

# llguidance's own schema keyword: no free whitespace, which a random model would emit for ever
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
PERSON = {**COMPACT, "type": "object", "additionalProperties": False,
          "required": ["name", "age", "admin"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "admin": {"type": "boolean"}}}
ITEM = {**COMPACT, "type": "object", "required": ["id", "tags"], "additionalProperties": False,
        "properties": {"id": {"enum": ["a1", "b2"]},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                "maxItems": 2}}}


def sampled(so: StructuredOutputs, n: int = 1, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, n=n, seed=0, max_tokens=kw.pop("max_tokens", 80),
                          structured_outputs=so, **kw)


@pytest.fixture(scope="module")
def llm(model_dir):  # 32 sequences: a request with n=20 runs in one step
    return LLM(model=str(model_dir("llama")[0]), dtype="f32", max_model_len=256,
               kvcache_mem_mb=16, max_num_seqs=32)


def test_json_schema_outputs_parse_and_validate_on_20_seeds(llm):
    out = llm.generate("Hello world!", sampled(StructuredOutputs(json=PERSON), n=20))[0]
    assert len(out.outputs) == 20
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)


def test_regex_outputs_fullmatch(llm):
    pattern = r"(cat|dog)-[0-9]{2,4}"
    for c in llm.generate("Once upon", sampled(StructuredOutputs(regex=pattern), n=6))[0].outputs:
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c.text


def test_choice_outputs_one_of_the_choices(llm):
    choices = ["café", "naïve résumé", "über"]
    outs = llm.generate("The quick", sampled(StructuredOutputs(choice=choices), n=8))[0].outputs
    assert all(c.text in choices and c.finish_reason == "stop" for c in outs)


def test_json_object_outputs_a_json_object(llm):
    params = sampled(StructuredOutputs(json_object=True), n=4, max_tokens=200)
    for c in llm.generate("Hello", params)[0].outputs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # cut by max_tokens: still a prefix llguidance accepts
            assert c.text.startswith("{")


def test_lark_grammar_output_is_accepted_by_llguidance(llm):
    lark = 'start: "(" expr ")"\nexpr: NUM | NUM "+" NUM\nNUM: /[0-9]{1,2}/'
    so = StructuredOutputs(grammar=lark)
    out = llm.generate("Hello", sampled(so, n=4))[0]
    matcher = llm.llm_engine.structured.matchers(so, 1)[0]
    for c in out.outputs:
        assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)", c.text), c.text
        assert matcher.validate_tokens(c.token_ids) == len(c.token_ids)


def test_constrained_greedy_is_the_argmax_of_the_allowed_tokens_of_the_reference_logits(
        llm, model_dir):
    """...and its logprobs are the model's raw distribution's, as vLLM returns them."""
    so = StructuredOutputs(json=ITEM)
    prompt = llm.get_tokenizer().encode("The quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so, logprobs=0)
    out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    jsonschema.validate(json.loads(out.text), ITEM)
    with torch.no_grad():
        logits = model_dir("llama")[1](torch.tensor([prompt + out.token_ids])).logits[0].float().numpy()
    matcher = llm.llm_engine.structured.matchers(so, 1)[0]
    vocab = logits.shape[1]
    mask = llg_np.allocate_token_bitmask(1, vocab)
    for i, token in enumerate(out.token_ids):
        llg_np.fill_next_token_bitmask(matcher, mask)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        row = logits[len(prompt) - 1 + i]
        assert token == int(np.argmax(np.where(allowed, row, -np.inf))), i
        raw = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert out.logprobs[i][token].logprob == pytest.approx(raw[token], abs=1e-4)
        assert matcher.consume_token(token)


def test_bitmask_disallows_exactly_the_unset_bits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 70)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, (3, 3), dtype=np.int64).astype(np.int32)
    masked = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :70]
    np.testing.assert_array_equal(masked, np.where(bits == 1, logits, -np.inf))


def test_ids_past_the_tokenizer_are_never_allowed(llm):
    tok = llm.get_tokenizer()
    manager = StructuredOutputManager(tok, tok.vocab_size + 40)
    mask = manager.bitmask(manager.matchers(StructuredOutputs(json_object=True), 1) + [None])
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")
    assert bits[0, :tok.vocab_size].any() and not bits[0, tok.vocab_size:].any()
    assert bits[1].all()  # an unconstrained row allows everything


def test_new_schemas_compile_no_new_step(llm):
    llm.generate("Hello", sampled(StructuredOutputs(json=PERSON), n=2, max_tokens=4))
    before = llm.llm_engine.num_compiles
    for so in [StructuredOutputs(json=ITEM), StructuredOutputs(regex="[a-z]{3}"),
               StructuredOutputs(choice=["x", "y"])]:
        llm.generate("Hello", sampled(so, n=2, max_tokens=4))
    assert llm.llm_engine.num_compiles == before


def test_unconstrained_rows_share_a_step_with_constrained_ones(llm):
    free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate("Hello world!", free)[0].outputs[0].token_ids
    mixed = llm.generate(["Hello world!", "Hello"],
                         [free, sampled(StructuredOutputs(choice=["yes", "no"]))])
    assert mixed[0].outputs[0].token_ids == alone
    assert mixed[1].outputs[0].text in ("yes", "no")


@pytest.mark.parametrize("so, message", [
    (StructuredOutputs(json={"type": "wrong"}), "JSON schema"),
    (StructuredOutputs(json="{not json"), "not valid JSON"),
    (StructuredOutputs(regex="a("), "regex"),
    (StructuredOutputs(grammar="start: undefined_rule"), "grammar"),
    (StructuredOutputs(regex="a", choice=["a"]), "exactly one"),
    (StructuredOutputs(), "exactly one"),
])
def test_invalid_constraints_are_refused_at_add_request(llm, so, message):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=message):
        engine.add_request("Hello", SamplingParams(structured_outputs=so))
    assert not engine.has_unfinished_requests()


def test_preempted_sequences_keep_their_matcher_in_step(model_dir):
    small = LLM(model=str(model_dir("llama")[0]), dtype="f32", max_model_len=128, kvcache_mem_mb=0.1,
                max_num_seqs=8, page_size=16)  # 12 pages: too few for 8 sequences
    so = StructuredOutputs(json=PERSON)
    outs = small.generate([f"Request {i}: hello world!" for i in range(8)],
                          sampled(so, max_tokens=60, ignore_eos=True))
    assert small.llm_engine.scheduler.num_preemptions > 0
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), PERSON)


# -- the server (last: from here on the engine thread owns `llm`'s engine) -------------------------

@pytest.fixture(scope="module")
def client(llm):
    state = ServerState(lambda: llm.llm_engine, ["tiny"])
    srv, thread, url = run_uvicorn(build_app(state))
    assert state.engine_thread.ready.wait(30)
    yield OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.should_exit = True
    thread.join(10)
    state.engine_thread.stop()


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                   "strict": True}}


def test_chat_response_format_json_schema_validates_every_choice(client):
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, n=3, seed=1, temperature=1.0, max_tokens=80,
        response_format=json_schema_format(PERSON))
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_streamed_chat_response_format_json_schema_validates_every_choice(client):
    texts = {}
    for chunk in client.chat.completions.create(
            model="tiny", messages=CHAT, n=2, seed=2, temperature=1.0, max_tokens=80,
            stream=True, response_format=json_schema_format(ITEM)):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert sorted(texts) == [0, 1]
    for text in texts.values():
        jsonschema.validate(json.loads(text), ITEM)


def test_completions_take_structured_outputs_and_the_guided_fields(client):
    pattern = r"[0-9]{3}-(ab|cd)"
    r = client.completions.create(model="tiny", prompt="Hello", n=2, seed=3, max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": pattern}})
    assert all(re.fullmatch(pattern, c.text) for c in r.choices)
    stream = client.completions.create(model="tiny", prompt="Hello", seed=3, max_tokens=20,
                                       stream=True, extra_body={"guided_choice": ["up", "down"]})
    assert "".join(c.choices[0].text for c in stream if c.choices) in ("up", "down")
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=80, seed=4,
                                  extra_body={"response_format": json_schema_format(PERSON)})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize("body, param", [
    ({"response_format": json_schema_format({"type": "wrong"})}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs"),
    ({"guided_grammar": "start: missing"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_invalid_constraints_are_a_400_naming_the_field(client, body, param):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4,
                                       extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param
