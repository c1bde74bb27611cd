"""The server facing careless or hostile clients: API keys, request limits, request-supplied chat
templates, no filesystem paths, and /health answering throughout. Driven over loopback with the
official openai client, httpx and raw sockets."""
from __future__ import annotations

import gc
import json
import os
import select
import socket
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import free_port, run_uvicorn, server_process
from openai import OpenAI

from vllm_jax import LLM
from vllm_jax.config import ConfigError
from vllm_jax.server import ServerOptions, build_app, server_options
from vllm_jax.server.serving import ServerState

MODEL = "tiny"
KEY = "sk-test-9f2c"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = ServerOptions(api_key=KEY, trust_request_chat_template=True, max_request_bytes=1 << 20,
                        header_timeout_s=1.0, template_timeout_s=1.0)
HEALTH_BUDGET_S = 0.2
CHAT = [{"role": "user", "content": "Hello world! How are you today?"}]
NESTED_LOOPS = ("{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}"
                "{% endfor %}")  # 10^10 iterations
HOSTILE_TEMPLATES = [NESTED_LOOPS,
                     "{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}",  # 10 MB of prompt
                     "{{ 'x' * 10 ** 11 }}"]  # 100 GB of memory


@pytest.fixture(scope="module")
def model_path(model_dir):
    return model_dir("llama")[0]


@pytest.fixture(scope="module")
def server(model_path):
    llm = LLM(model=str(model_path), dtype="f32", max_model_len=256, kvcache_mem_mb=16,
              max_num_seqs=4)
    state = ServerState(lambda: llm.llm_engine, [MODEL], options=OPTIONS)
    gc.freeze()  # as serve() does once the model is loaded
    srv, thread, url = run_uvicorn(build_app(state))
    assert state.engine_thread.ready.wait(60)
    yield url
    srv.should_exit = True
    thread.join(30)
    gc.unfreeze()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def health_latencies_during(url: str, work) -> tuple[list[float], float, object]:
    """Polls /health while work() runs in another thread: (latencies, work's seconds, result)."""
    box = {}

    def run():
        start = time.monotonic()
        box["result"] = work()
        box["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=run)
    latencies = []
    with httpx.Client(base_url=url) as http:
        http.get("/health")  # connected before the work starts
        worker.start()
        while worker.is_alive():
            start = time.monotonic()
            assert http.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    worker.join()
    return latencies, box["seconds"], box["result"]


def body_of_size(size: int, **fields) -> bytes:
    """A JSON request body of exactly `size` bytes: `fields` and a "prompt" text filling it."""
    empty = json.dumps({**fields, "prompt": ""}).encode()
    text = (b"Hello world! " * (size // 13 + 1))[:size - len(empty)]
    return empty[:-2] + text + b'"}'


def many_messages_of_size(size: int) -> bytes:
    """A chat body of one-letter messages, the most objects for its size, padded to `size`."""
    message = {"role": "user", "content": "a"}
    count = (size - 64) // (len(json.dumps(message)) + 2)
    body = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [message] * count})
    return body[:-1].encode() + b" " * (size - len(body)) + b"}"


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", body_of_size(OPTIONS.max_request_bytes, model=MODEL, max_tokens=1)),
    ("/v1/chat/completions", many_messages_of_size(OPTIONS.max_request_bytes))],
    ids=["one-long-prompt", "many-messages"])
def test_health_answers_while_a_body_at_the_size_limit_is_processed(server, route, body):
    assert len(body) == OPTIONS.max_request_bytes

    def post():
        return httpx.post(server + route, content=body, timeout=120,
                          headers={**AUTH, "Content-Type": "application/json"})

    latencies, seconds, response = health_latencies_during(server, post)
    assert response.status_code == 400  # read, parsed and tokenized: longer than the model
    assert "maximum context length" in response.json()["error"]["message"]
    assert latencies and max(latencies) < HEALTH_BUDGET_S, (seconds, latencies)


def test_health_answers_while_a_heavy_trusted_template_renders(server, client):
    def chat():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                           extra_body={"chat_template": NESTED_LOOPS})
        return e.value

    latencies, seconds, error = health_latencies_during(server, chat)
    assert "longer than 1 s" in error.response.json()["error"]["message"]
    assert OPTIONS.template_timeout_s <= seconds < OPTIONS.template_timeout_s + 2
    assert max(latencies) < HEALTH_BUDGET_S, latencies


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES, ids=["loops", "output", "memory"])
def test_a_hostile_trusted_template_is_stopped_and_the_server_carries_on(server, client,
                                                                          template):
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                       extra_body={"chat_template": template})
    assert time.monotonic() - start < OPTIONS.template_timeout_s + 2
    assert e.value.response.json()["error"]["param"] == "messages"
    assert httpx.get(server + "/health").status_code == 200
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_a_trusted_request_template_is_the_one_rendered(client, model_path):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    reference = AutoTokenizer.from_pretrained(model_path)
    text = reference.apply_chat_template(CHAT, chat_template=template, tokenize=False)
    expected = len(reference(text, add_special_tokens=False).input_ids)
    for extra in ({"chat_template": template},
                  {"chat_template_kwargs": {"chat_template": template}}):
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                           extra_body=extra)
        assert r.usage.prompt_tokens == expected


def test_a_body_over_the_limit_is_413_by_content_length_or_chunked(server):
    body = body_of_size(OPTIONS.max_request_bytes + 1, model=MODEL)
    headers = {**AUTH, "Content-Type": "application/json"}

    def chunks():
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    for content in (body, chunks()):
        r = httpx.post(server + "/v1/completions", content=content, headers=headers, timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == 413
        chunked = r.request.headers.get("Transfer-Encoding") == "chunked"
        assert chunked == (content is not body)


def drip_feed_until_closed(sock: socket.socket, data: bytes, every_s: float) -> float:
    """Sends `data` a byte at a time; the seconds until the server closes the connection."""
    start = time.monotonic()
    for i in range(len(data)):
        try:
            sock.send(data[i:i + 1])
        except OSError:  # reset by the server
            return time.monotonic() - start
        if select.select([sock], [], [], every_s)[0]:
            assert sock.recv(4096) == b"", "the server answered an incomplete request"
            return time.monotonic() - start
    raise AssertionError("the server kept the connection open")


def test_a_connection_with_unfinished_headers_is_closed_after_the_timeout(server):
    host, port = server.removeprefix("http://").split(":")
    timeout = OPTIONS.header_timeout_s
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and then nothing
        sock.settimeout(timeout + 3)
        start = time.monotonic()
        assert sock.recv(4096) == b""
        assert time.monotonic() - start < timeout + 1
    with socket.create_connection((host, int(port))) as sock:  # a keep-alive connection
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        slow = b"GET /health HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 100
        assert drip_feed_until_closed(sock, slow, every_s=0.1) < timeout + 1


def test_routes_need_the_api_key_but_health_and_metrics_do_not(server, client):
    for wrong in ("wrong-key", KEY + "x", KEY[:-1]):
        bad = OpenAI(base_url=server + "/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
        assert e.value.status_code == 401
        assert e.value.response.json()["error"]["type"] == "AuthenticationError"
    for path in ("/v1/models", "/v1/completions", "/tokenize"):
        assert httpx.post(server + path, json={"prompt": "hi"}).status_code == 401
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/metrics").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_load_error_does_not_show_the_model_path(tmp_path):
    missing = tmp_path / "no-such-model"

    def load():
        raise ConfigError(f"{missing} does not exist")

    state = ServerState(load, ["m"])
    srv, thread, url = run_uvicorn(build_app(state))
    try:
        assert state.engine_thread.ready.wait(30)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and str(tmp_path) not in r.text
    finally:
        srv.should_exit = True
        thread.join(30)


def test_the_cli_server_mode_passes_the_server_flags(monkeypatch, model_path):
    import vllm_jax.server
    from vllm_jax import cli

    calls = []
    monkeypatch.setattr(vllm_jax.server, "serve", lambda *a: calls.append(a) or 0)
    monkeypatch.setitem(sys.modules, "IPython", sys.modules.get("IPython"))  # main() hides it
    flags = ["--api-key", "k", "--trust-request-chat-template", "--max-request-bytes", "123",
             "--served-model-name", "m"]
    assert cli.main(["--w", str(model_path), "--server"] + flags) == 0
    options = ServerOptions(api_key="k", trust_request_chat_template=True, max_request_bytes=123)
    assert calls[0][3] == "m" and calls[0][-1] == options
    assert server_options(vllm_jax.server.build_parser().parse_args(flags)) == options


def test_the_server_from_flags_shows_no_path_and_refuses_request_templates(model_path,
                                                                           tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "vllm_jax.server", "--w", str(model_path), "--dtype", "f32",
            "--kvmem", "16", "--max-model-len", "256", "--max-num-seqs", "2", "--port", str(port),
            "--max-request-bytes", "4096"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "VLLM_API_KEY": KEY}
    url = f"http://127.0.0.1:{port}"
    with server_process(argv, tmp_path / "server.log", timeout=120, env=env):
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        models = httpx.get(url + "/v1/models", headers=AUTH)
        assert models.status_code == 200 and str(model_path) not in models.text
        assert [(m["id"], m["root"]) for m in models.json()["data"]] == [(model_path.name,) * 2]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=str(model_path), prompt="hi", max_tokens=1)
        for extra in ({"chat_template": "{{ messages }}"},
                      {"chat_template_kwargs": {"chat_template": "{{ messages }}"}}):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=model_path.name, messages=CHAT,
                                               max_tokens=1, extra_body=extra)
            assert "--trust-request-chat-template" in e.value.response.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "x" * 5000})
        assert r.status_code == 413
