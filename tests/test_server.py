"""The OpenAI-compatible server, driven by the official openai client over loopback."""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time

import httpx
import pytest
from conftest import free_port, run_uvicorn, server_process
from openai import AsyncOpenAI, OpenAI

from vllm_jax import LLM, SamplingParams
from vllm_jax.server import build_app
from vllm_jax.server.serving import ServerState

MODEL = "tiny"
PROMPTS = [f"Request {i}: the quick brown fox" for i in range(32)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
CHAT = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture(scope="module")
def llm(model_dir):
    path = model_dir("llama")[0]
    return LLM(model=str(path), dtype="f32", max_model_len=256, kvcache_mem_mb=16,
               max_num_seqs=8, decode_steps=1)  # the server's default: a token a step


@pytest.fixture(scope="module")
def offline(llm):
    """Greedy results of the Python API, computed before the server takes the engine over."""
    echo = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    return {
        "prompts": [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)],
        "chat": llm.chat(CHAT, GREEDY)[0].outputs[0].text,
        "echo": llm.generate("Hello world", echo)[0],
    }


@contextlib.contextmanager
def serving(engine, names: list[str]):
    """An in-process server over a loaded engine: (ServerState, base url)."""
    state = ServerState(lambda: engine, names, log_interval=0.05)
    srv, thread, url = run_uvicorn(build_app(state))
    try:
        assert state.engine_thread.ready.wait(30)
        yield state, url
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server(llm, offline):
    with serving(llm.llm_engine, [MODEL, "other-name"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=120)


def engine_state(state):
    return state.engine_thread.call(lambda e: (e.block_manager.num_free, len(e.requests),
                                               e.num_generated_tokens))


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: ")
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_and_models(server, client):
    assert httpx.get(server[1] + "/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_equals_offline_greedy(client, offline):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline["prompts"][0]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == offline["prompts"][:3]


def test_chat_equals_offline_greedy_streaming_or_not(client, offline):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == offline["chat"]
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline["chat"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stream_events_are_shaped_like_openai(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", server[1] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
        assert all(m["finish_reason"] is None for m in mine[:-1])


def test_completion_stream_with_usage(client, offline):
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline["prompts"][1]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 6


def test_n_samples_with_a_seed(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2,
              seed=7, extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.completion_tokens == 16


def test_stop_string_ends_the_text(client, offline):
    full = offline["prompts"][2]
    stop = full[2:4]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    kw = dict(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, logprobs=2)
    r = client.completions.create(**kw, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    r = client.completions.create(**kw, extra_body={"ignore_eos": True,
                                                    "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token.startswith("token_id:") and len(top) == 2  # greedy: the token is the top 1
        assert value == max(top.values()) == top[token]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


def test_echo_returns_prompt_logprobs_like_lm_eval_wants(client, offline):
    ref = offline["echo"]
    for max_tokens in (0, 1):
        r = client.completions.create(model=MODEL, prompt=[ref.prompt_token_ids], echo=True,
                                      max_tokens=max_tokens, temperature=0, logprobs=1)
        c = r.choices[0]
        assert c.text.startswith("Hello world")
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ref.prompt_token_ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = [e[t].logprob for t, e in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])]
        assert lp.token_logprobs[1:len(ref.prompt_token_ids)] == pytest.approx(expected, abs=1e-5)
        assert r.usage.completion_tokens == max_tokens
    assert c.text == "Hello world" + ref.outputs[0].text


def test_tokenize_and_detokenize(server, llm):
    url = server[1]
    tok = llm.get_tokenizer()
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    r2 = httpx.post(url + "/tokenize", json={"messages": CHAT}).json()
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert r2["tokens"] == tok.encode(text, add_special_tokens=False)
    back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello world"}


LONG = [5] * 300
BAD_REQUESTS = {
    "malformed json": ("chat", '{"messages": [', 400),
    "json array body": ("chat", "[1, 2]", 400),
    "missing messages": ("chat", {"model": MODEL}, 400),
    "empty messages": ("chat", {"messages": []}, 400),
    "messages not a list": ("chat", {"messages": "hi"}, 400),
    "invalid role": ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "content a number": ("chat", {"messages": [{"role": "user", "content": 5}]}, 400),
    "image content": ("chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400),
    "unknown model": ("chat", {"model": "gpt-9", "messages": CHAT}, 404),
    "temperature -1": ("chat", {"messages": CHAT, "temperature": -1}, 400),
    "temperature string": ("chat", {"messages": CHAT, "temperature": "hot"}, 400),
    "top_p 2": ("chat", {"messages": CHAT, "top_p": 2}, 400),
    "top_p 0": ("chat", {"messages": CHAT, "top_p": 0}, 400),
    "top_k -5": ("chat", {"messages": CHAT, "top_k": -5}, 400),
    "min_p 1.5": ("chat", {"messages": CHAT, "min_p": 1.5}, 400),
    "n 0": ("chat", {"messages": CHAT, "n": 0}, 400),
    "n too large": ("chat", {"messages": CHAT, "n": 100}, 400),
    "negative max_tokens": ("chat", {"messages": CHAT, "max_tokens": -1}, 400),
    "max_tokens 0": ("chat", {"messages": CHAT, "max_tokens": 0}, 400),
    "fractional max_tokens": ("chat", {"messages": CHAT, "max_tokens": 1.5}, 400),
    "completion past the context": ("chat", {"messages": CHAT, "max_completion_tokens": 10000},
                                    400),
    "presence_penalty 3": ("chat", {"messages": CHAT, "presence_penalty": 3}, 400),
    "frequency_penalty -3": ("chat", {"messages": CHAT, "frequency_penalty": -3}, 400),
    "repetition_penalty 0": ("chat", {"messages": CHAT, "repetition_penalty": 0}, 400),
    "top_logprobs 50": ("chat", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400),
    "top_logprobs without logprobs": ("chat", {"messages": CHAT, "top_logprobs": 2}, 400),
    "stop a number": ("chat", {"messages": CHAT, "stop": 5}, 400),
    "empty stop string": ("chat", {"messages": CHAT, "stop": [""]}, 400),
    "best_of unlike n": ("chat", {"messages": CHAT, "best_of": 3}, 400),
    "min_tokens over max_tokens": ("chat", {"messages": CHAT, "max_tokens": 2, "min_tokens": 5},
                                   400),
    "stream_options without stream": ("chat", {"messages": CHAT, "stream_options": {}}, 400),
    "seed a string": ("chat", {"messages": CHAT, "seed": "abc"}, 400),
    "stop_token_ids not ints": ("chat", {"messages": CHAT, "stop_token_ids": ["x"]}, 400),
    "logit_bias": ("chat", {"messages": CHAT, "logit_bias": {"5": 10}}, 400),
    "empty prompt": ("completions", {"prompt": ""}, 400),
    "empty prompt list": ("completions", {"prompt": []}, 400),
    "prompt a number": ("completions", {"prompt": 5}, 400),
    "missing prompt": ("completions", {"max_tokens": 5}, 400),
    "token out of vocabulary": ("completions", {"prompt": [99999]}, 400),
    "negative token id": ("completions", {"prompt": [[1, -1]]}, 400),
    "logprobs 50": ("completions", {"prompt": "hi", "logprobs": 50}, 400),
    "over-long prompt": ("completions", {"prompt": LONG, "max_tokens": 16}, 400),
    "max_tokens 0 without echo": ("completions", {"prompt": "hi", "max_tokens": 0}, 400),
    "unknown model (completions)": ("completions", {"model": "nope", "prompt": "hi"}, 404),
    "tokenize nothing": ("tokenize", {}, 400),
    "detokenize out of vocabulary": ("detokenize", {"tokens": [10 ** 6]}, 400),
}
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
          "tokenize": "/tokenize", "detokenize": "/detokenize"}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_error_body(server, name):
    route, body, status = BAD_REQUESTS[name]
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, str) else {"json": body}
    r = httpx.post(server[1] + ROUTES[route], timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    if name == "over-long prompt":
        assert error["message"] == (
            "This model's maximum context length is 256 tokens. However, you requested 316 "
            "tokens (300 in the messages, 16 in the completion). Please reduce the length of "
            "the messages or completion.")


def test_after_bad_requests_good_ones_are_answered(server, client, offline):
    assert httpx.get(server[1] + "/v1/nowhere").json()["error"]["code"] == 404
    assert httpx.get(server[1] + "/v1/completions").status_code == 405
    r = client.completions.create(model="other-name", prompt=PROMPTS[0], max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == offline["prompts"][0]
    assert engine_state(server[0])[1] == 0


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Make every engine step take >= 20 ms, so a request of 200 tokens outlasts the client
    however fast this machine runs the tiny model."""
    engine = server[0].engine_thread.call(lambda e: e)
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)


def test_client_disconnect_aborts_and_frees_pages(server, slow_steps):
    state, url = server
    free, running, generated = engine_state(state)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    break
    deadline = time.monotonic() + 10
    while engine_state(state)[:2] != (free, 0):
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    assert engine_state(state)[2] - generated < 150  # stopped well before max_tokens


def test_non_streaming_client_disconnect_aborts_too(server, slow_steps):
    state, url = server
    free, _, generated = engine_state(state)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while engine_state(state)[:2] != (free, 0):
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    assert engine_state(state)[2] - generated < 240  # stopped before max_tokens


def test_32_concurrent_streams_match_offline(server, offline, caplog):
    caplog.set_level("INFO", logger="vllm_jax")

    async def main():
        client = AsyncOpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0,
                             timeout=300)

        async def one(prompt):
            stream = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream if c.choices])

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(main()) == offline["prompts"]
    num_blocks = server[0].engine_thread.engine.block_manager.num_blocks
    assert engine_state(server[0])[:2] == (num_blocks, 0)
    assert any("Running:" in r.getMessage() and "KV cache usage" in r.getMessage()
               for r in caplog.records)


def test_metrics(server):
    text = httpx.get(server[1] + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:num_preemptions_total"):
        assert name in text
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["vllm:generation_tokens_total"] > 0 and values["vllm:prompt_tokens_total"] > 0
    assert values["vllm:e2e_request_latency_seconds_count"] > 32


def test_health_is_503_until_the_model_loads(model_dir):
    from vllm_jax.config import EngineConfig
    from vllm_jax.engine.llm_engine import LLMEngine

    gate = threading.Event()
    config = EngineConfig(model_path=str(model_dir("llama")[0]), dtype="f32", max_model_len=64,
                          kvcache_mem_mb=1, max_num_seqs=2)
    state = ServerState(lambda: gate.wait(30) and LLMEngine(config), [MODEL])
    srv, thread, url = run_uvicorn(build_app(state))
    try:
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        gate.set()
        assert state.engine_thread.ready.wait(30)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        srv.should_exit = True
        thread.join(30)


def test_python_dash_m_server(model_dir, tmp_path):
    path = model_dir("llama")[0]
    port = free_port()
    argv = [sys.executable, "-m", "vllm_jax.server", "--w", str(path), "--dtype", "f32",
            "--kvmem", "16", "--max-model-len", "256", "--max-num-seqs", "8", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, tmp_path / "server.log", timeout=120):
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [path.name]
        r = client.completions.create(model=path.name, prompt="Hello", max_tokens=2)
        assert r.usage.completion_tokens <= 2
