"""No request can hurt another: bad requests get a 4xx naming the field while streams run on
unharmed, a request that breaks an engine step fails alone, and a 500 keeps the connection."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from openai import OpenAI
from test_fault_isolation import MARKER, inject_fault
from test_server import CHAT, MODEL, serving

from vllm_jax import LLM

STREAMS = [("chat", "Hello world! How are you today?"), ("chat", "Tell me about the fox"),
           ("completions", "Once upon a time there was"), ("completions", "def f(x):\n    return")]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server(model_dir):
    llm = LLM(model=str(model_dir("llama")[0]), dtype="f32", max_model_len=256,
              kvcache_mem_mb=16, max_num_seqs=8)
    with serving(llm.llm_engine, [MODEL]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=120)


def stream_text(client, kind: str, text: str) -> str:
    kw = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, stream=True,
              extra_body={"ignore_eos": True})
    if kind == "chat":
        chunks = client.chat.completions.create(
            messages=[{"role": "user", "content": text}], **kw)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return "".join(c.choices[0].text for c in client.completions.create(prompt=text, **kw))


@pytest.fixture(scope="module")
def alone(client):
    """Each stream's text when it runs by itself on the same server."""
    return [stream_text(client, kind, text) for kind, text in STREAMS]


class StreamsInFlight:
    """The 4 streams, started in threads. The engine steps only once they (and `others` more
    requests) have all arrived, and holds still once each has 2 tokens until finish(): what the
    test sends meanwhile arrives while all 4 are in flight."""

    def __init__(self, server, client, monkeypatch, others: int = 0):
        engine = server[0].engine_thread.engine
        self.ready, self.released = threading.Event(), threading.Event()
        step = engine.step

        def gated_step():
            reqs = list(engine.requests.values())
            if not self.released.is_set() and len(reqs) < len(STREAMS) + others:
                time.sleep(0.005)
                return []
            if not self.released.is_set() and all(r.seqs[0].num_output_tokens >= 2
                                                   for r in reqs):
                self.ready.set()
                self.released.wait(60)
            return step()

        monkeypatch.setattr(engine, "step", gated_step)
        self.texts = [None] * len(STREAMS)
        self.threads = [threading.Thread(target=self._run, args=(client, i), daemon=True)
                        for i in range(len(STREAMS))]
        for t in self.threads:
            t.start()
        assert self.ready.wait(60), "the streams did not start"

    def _run(self, client, i):
        self.texts[i] = stream_text(client, *STREAMS[i])

    def finish(self) -> list[str]:
        self.released.set()
        for t in self.threads:
            t.join(60)
        return self.texts


SURROGATE = b'"\\ud800 x"'  # JSON for a string holding a lone surrogate
RAW_CHAT = b'{"messages": [{"role": "user", "content": "hi"}], %s}'
BIG = 1099511627776  # 2**40
BAD_REQUESTS = {  # name: (route, JSON object or raw bytes, status, param)
    "top_k past int32": ("chat", {"top_k": BIG, "temperature": 1}, 400, "top_k"),
    "top_k past the vocabulary": ("chat", {"top_k": 100000}, 400, "top_k"),
    "top_k -2": ("chat", {"top_k": -2}, 400, "top_k"),
    "stop_token_ids past int32": ("chat", {"stop_token_ids": [2**31], "min_tokens": 1}, 400,
                                  "stop_token_ids"),
    "stop_token_ids past the vocabulary": ("chat", {"stop_token_ids": [100000]}, 400,
                                           "stop_token_ids"),
    "negative stop_token_ids": ("chat", {"stop_token_ids": [-1]}, 400, "stop_token_ids"),
    "stop_token_ids past int64": ("chat", {"stop_token_ids": [2**70]}, 400, "stop_token_ids"),
    "temperature Infinity": ("chat", RAW_CHAT % b'"temperature": Infinity', 400, "temperature"),
    "temperature NaN": ("chat", RAW_CHAT % b'"temperature": NaN', 400, "temperature"),
    "temperature 1e39 (not a float32)": ("chat", {"temperature": 1e39}, 400, "temperature"),
    "temperature 1e400": ("chat", RAW_CHAT % b'"temperature": 1e400', 400, "temperature"),
    "temperature -0.5": ("chat", {"temperature": -0.5}, 400, "temperature"),
    "top_p NaN": ("chat", RAW_CHAT % b'"top_p": NaN', 400, "top_p"),
    "top_p 1.5": ("chat", {"top_p": 1.5}, 400, "top_p"),
    "min_p -0.1": ("chat", {"min_p": -0.1}, 400, "min_p"),
    "presence_penalty 2.5": ("chat", {"presence_penalty": 2.5}, 400, "presence_penalty"),
    "frequency_penalty -Infinity": ("chat", RAW_CHAT % b'"frequency_penalty": -Infinity', 400,
                                    "frequency_penalty"),
    "repetition_penalty 1e39": ("chat", {"repetition_penalty": 1e39}, 400,
                                "repetition_penalty"),
    "repetition_penalty 0": ("chat", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    "repetition_penalty -1": ("chat", {"repetition_penalty": -1}, 400, "repetition_penalty"),
    "seed 2**64": ("chat", {"seed": 2**64}, 400, "seed"),
    "seed below -2**63": ("chat", {"seed": -2**63 - 1}, 400, "seed"),
    "seed 1.5": ("chat", {"seed": 1.5}, 400, "seed"),
    "n 17": ("chat", {"n": 17}, 400, "n"),
    "n 0": ("chat", {"n": 0}, 400, "n"),
    "best_of 1000": ("chat", {"best_of": 1000}, 400, "best_of"),
    "max_tokens 0": ("chat", {"max_tokens": 0}, 400, "max_tokens"),
    "max_tokens past the context": ("chat", {"max_tokens": 2**40}, 400, "messages"),
    "min_tokens past max_tokens": ("chat", {"max_tokens": 4, "min_tokens": BIG}, 400,
                                   "min_tokens"),
    "min_tokens -1": ("chat", {"min_tokens": -1}, 400, "min_tokens"),
    "top_logprobs 21": ("chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "top_logprobs -1": ("chat", {"logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    "lone surrogate in content": ("chat", b'{"messages": [{"role": "user", "content": %s}]}'
                                  % SURROGATE, 400, "messages"),
    "lone surrogate in a content part": (
        "chat", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}'
        % SURROGATE, 400, "messages"),
    "lone surrogate in stop": ("chat", RAW_CHAT % (b'"stop": [%s]' % SURROGATE), 400, "stop"),
    "lone surrogate in tools": ("chat", RAW_CHAT % (
        b'"tools": [{"type": "function", "function": {"name": %s}}]' % SURROGATE), 400, "tools"),
    "lone surrogate in a field's name": ("chat", RAW_CHAT % b'"x\\udfff": 1', 400, "x\\udfff"),
    "invalid UTF-8": ("chat", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
                      None),
    "a surrogate encoded in the bytes": (
        "chat", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400, None),
    "logit_bias": ("chat", {"logit_bias": {"5": 10}}, 400, "logit_bias"),
    "stop a number": ("chat", {"stop": 5}, 400, "stop"),
    "max_tokens a string": ("chat", {"max_tokens": "many"}, 400, "max_tokens"),
    "unknown model": ("chat", {"model": "gpt-9"}, 404, "model"),
    "prompt token past int32": ("completions", {"prompt": [1, 2**31]}, 400, "prompt"),
    "prompt token past the vocabulary": ("completions", {"prompt": [[1, 99999]]}, 400,
                                         "prompt"),
    "lone surrogate in prompt": ("completions", b'{"prompt": %s}' % SURROGATE, 400, "prompt"),
    "logprobs 21": ("completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    "echo with logprobs 21": ("completions", {"prompt": "hi", "echo": True, "logprobs": 21,
                                              "max_tokens": 0}, 400, "logprobs"),
    "top_k past int32 (completions)": ("completions", {"prompt": "hi", "top_k": BIG}, 400,
                                       "top_k"),
    "tokenize a lone surrogate": ("tokenize", b'{"prompt": %s}' % SURROGATE, 400, "prompt"),
    "tokenize messages with a lone surrogate": (
        "tokenize", b'{"messages": [{"role": "user", "content": %s}]}' % SURROGATE, 400,
        "messages"),
    "detokenize past int64": ("detokenize", {"tokens": [2**63]}, 400, "tokens"),
    "detokenize a negative id": ("detokenize", {"tokens": [-1]}, 400, "tokens"),
}
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
          "tokenize": "/tokenize", "detokenize": "/detokenize"}


def send(http: httpx.Client, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(ROUTES[route], content=body,
                         headers={"content-type": "application/json"})
    if route == "chat" and "messages" not in body:
        body = {"messages": CHAT, **body}
    return http.post(ROUTES[route], json=body)


def test_bad_requests_get_a_4xx_naming_the_field_while_streams_run_on(server, client, alone,
                                                                      monkeypatch):
    assert len(BAD_REQUESTS) >= 40
    streams = StreamsInFlight(server, client, monkeypatch)
    answers = {}
    try:  # a bad request that got into the engine would wait for finish(): a ReadTimeout
        with httpx.Client(base_url=server[1], timeout=10) as http:
            for name, (route, body, _, _) in BAD_REQUESTS.items():
                answers[name] = send(http, route, body)
    finally:
        texts = streams.finish()
    assert texts == alone
    for name, (_, _, status, param) in BAD_REQUESTS.items():
        r = answers[name]
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert error["code"] == status and error["message"], name
        assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError"), name
        assert error["param"] == param, (name, error)


def test_a_request_that_breaks_the_step_fails_alone_and_the_connection_lives(
        server, client, alone, monkeypatch):
    engine = server[0].engine_thread.engine
    steps = inject_fault(engine, monkeypatch, at_output_token=2, after_donation=True)
    culprit = {"messages": CHAT, "max_tokens": 8, "temperature": 0, "seed": MARKER}
    with httpx.Client(base_url=server[1], timeout=60) as http:
        answer = {}
        thread = threading.Thread(target=lambda: answer.update(r=send(http, "chat", culprit)))
        thread.start()
        streams = StreamsInFlight(server, client, monkeypatch, others=1)
        assert streams.finish() == alone
        thread.join(60)
        assert (1, True) in steps and (len(STREAMS) + 1, True) in steps
        r = answer["r"]
        assert r.status_code == 500 and r.json()["error"]["code"] == 500
        assert "InjectedFault" in r.json()["error"]["message"]
        connection = r.extensions["network_stream"].get_extra_info("client_addr")
        r = send(http, "completions", {"prompt": STREAMS[2][1], "max_tokens": MAX_TOKENS,
                                       "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone[2]
        assert r.extensions["network_stream"].get_extra_info("client_addr") == connection
