"""Embeddings (LLM.embed and /v1/embeddings through the official openai client) against
transformers' final hidden states (the base model's last_hidden_state), pooled and normalized."""
from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from test_server import run_uvicorn
from transformers import AutoTokenizer

from vllm_jax import LLM, PoolingParams
from vllm_jax.server import build_app
from vllm_jax.server.protocol import MAX_EMBEDDING_INPUTS
from vllm_jax.server.serving import ServerState

MODEL = "tiny"
MAX_MODEL_LEN = 128
TEXTS = ["Hello",  # 5, 21 and 35 tokens: the two longer ones share a batch
         "The quick brown fox jumps over the lazy dog. " * 2,
         "café naïve résumé — über straße. 你好"]


def make_llm(path, pooling: str) -> LLM:
    return LLM(model=str(path), dtype="f32", max_model_len=MAX_MODEL_LEN, kvcache_mem_mb=4,
               max_num_seqs=4, pooling=pooling)


def reference(hf_model, ids: list[int], pooling: str, normalize: bool = True) -> np.ndarray:
    with torch.no_grad():
        hidden = hf_model.model(torch.tensor([ids])).last_hidden_state[0]  # [L, hidden]
    pooled = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


@pytest.fixture(scope="module")
def tiny(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def token_ids(tiny) -> list[list[int]]:
    """TEXTS tokenized by transformers' tokenizer, the reference for ours."""
    tok = AutoTokenizer.from_pretrained(tiny[0])
    return [tok(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def llm(tiny):
    return make_llm(tiny[0], "last")


@pytest.fixture(scope="module")
def expected(tiny, token_ids) -> np.ndarray:
    return np.stack([reference(tiny[1], ids, "last") for ids in token_ids])


# -- the Python API (before the server takes the engine over) -------------------------------------

@pytest.mark.parametrize("arch,pooling", [("llama", "last"), ("llama", "mean"),
                                          ("gemma3", "mean")])
def test_embed_equals_transformers_pooled_hidden_states(model_dir, arch, pooling):
    """Gemma 3's sliding window (12) is shorter than the longer prompts."""
    path, hf_model = model_dir(arch)
    llm = make_llm(path, pooling)
    ids = [AutoTokenizer.from_pretrained(path)(t)["input_ids"] for t in TEXTS]
    assert any(len({len(ids[i]) for i in batch}) > 1
               for batch in llm.llm_engine.embedding_batches(ids)), "no padding in any batch"
    outs = llm.embed([TEXTS[0], {"prompt": TEXTS[1]}, {"prompt_token_ids": ids[2]}])
    assert [o.prompt_token_ids for o in outs] == ids
    for o, prompt in zip(outs, ids):
        assert o.outputs.hidden_size == hf_model.config.hidden_size
        np.testing.assert_allclose(o.outputs.embedding, reference(hf_model, prompt, pooling),
                                   atol=1e-4)


def test_embed_without_normalize_returns_the_pooled_state(llm, tiny, token_ids):
    out = llm.embed(TEXTS[1], PoolingParams(normalize=False))[0].outputs.embedding
    np.testing.assert_allclose(out, reference(tiny[1], token_ids[1], "last", normalize=False),
                               atol=1e-4)


def test_embedding_again_in_the_same_buckets_compiles_nothing(llm, token_ids):
    llm.embed(TEXTS)
    compiles = llm.llm_engine.pooler.num_compiles
    llm.embed([{"prompt_token_ids": ids[:-1]} for ids in token_ids])
    assert llm.llm_engine.pooler.num_compiles == compiles


@pytest.mark.parametrize("prompt,params,message", [
    ([], None, "cannot be empty"),
    ([1] * (MAX_MODEL_LEN + 1), None, "maximum context length"),
    ([10**6], None, "out of vocabulary"),
    ("Hello", PoolingParams(dimensions=8), "matryoshka"),
])
def test_embed_refuses_bad_prompts(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.embed({"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt, params)


# -- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(llm):
    state = ServerState(lambda: llm.llm_engine, [MODEL])
    srv, thread, url = run_uvicorn(build_app(state))
    assert state.engine_thread.ready.wait(30)
    yield url
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], np.float32)


def test_openai_client_gets_transformers_embeddings(client, token_ids, expected):
    r = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float",
                                 dimensions=64)
    assert r.object == "list" and r.model == MODEL
    assert r.data[0].object == "embedding"
    np.testing.assert_allclose(vectors(r), expected, atol=1e-4)
    total = sum(len(ids) for ids in token_ids)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (total, total)


def test_string_and_token_id_inputs_embed_alike(client, token_ids, expected):
    one = client.embeddings.create(model=MODEL, input=TEXTS[2], encoding_format="float")
    np.testing.assert_allclose(vectors(one), expected[2:], atol=1e-4)
    ids = client.embeddings.create(model=MODEL, input=token_ids[1], encoding_format="float")
    np.testing.assert_allclose(vectors(ids), expected[1:2], atol=1e-4)
    lists = client.embeddings.create(model=MODEL, input=token_ids, encoding_format="float")
    np.testing.assert_allclose(vectors(lists), expected, atol=1e-4)


def test_base64_decodes_to_the_float_embedding(client):
    floats = vectors(client.embeddings.create(model=MODEL, input=TEXTS,
                                              encoding_format="float"))
    raw = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data])
    np.testing.assert_array_equal(decoded, floats)
    by_default = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks base64
    np.testing.assert_array_equal(vectors(by_default), floats)


@pytest.mark.parametrize("body,status,param", [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": ["fine", ""]}, 400, "input"),
    ({"input": [10**6]}, 400, "input"),
    ({"input": [[1, 2], [-1]]}, 400, "input"),
    ({"input": [1] * (MAX_MODEL_LEN + 1)}, 400, "input"),
    ({"input": ["\ud800 lone surrogate"]}, 400, "input"),
    ({"input": ["x"] * (MAX_EMBEDDING_INPUTS + 1)}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": [1, "mixed"]}, 400, "input"),
    ({}, 400, "input"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 8}, 400, "dimensions"),
    ({"input": "x", "model": "no-such-model"}, 404, "model"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_embedding_request_gets_an_openai_error(server, body, status, param):
    r = httpx.post(f"{server}/v1/embeddings", content=json.dumps(body),  # \u-escaped text
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]


def test_embeddings_are_answered_while_a_stream_runs_unchanged(client, llm, expected,
                                                              monkeypatch):
    """The model runs on the engine thread between generation steps, never beside them."""
    request = dict(model=MODEL, prompt="Once upon a time", max_tokens=64, temperature=0,
                   extra_body={"ignore_eos": True})
    alone = client.completions.create(**request).choices[0].text
    step = llm.llm_engine.step

    def slow_step():  # >= 1.3 s for the stream however fast this machine runs the tiny model
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(llm.llm_engine, "step", slow_step)
    pieces, started = [], threading.Event()

    def stream():
        for chunk in client.completions.create(stream=True, **request):
            pieces.append(chunk.choices[0].text)
            started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    for _ in range(3):
        r = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
        np.testing.assert_allclose(vectors(r), expected, atol=1e-4)
    assert thread.is_alive(), "the stream ended before the embeddings: nothing interleaved"
    thread.join(60)
    assert "".join(pieces) == alone
