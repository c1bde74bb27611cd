"""Request validation: SamplingParams.validate() (no model) and check_for_model (the model's
vocabulary), shared by the Python API and the server; ranges as vLLM's SamplingParams has them."""
from __future__ import annotations

import math

import pytest

from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.sampling_params import ParamError, SamplingParams

BAD = [  # (SamplingParams kwargs, the parameter blamed)
    ({"n": 0}, "n"), ({"n": 16385}, "n"), ({"n": 2.0}, "n"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": 1e39}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 2**31}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.01}, "min_p"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 1e39}, "repetition_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"seed": "7"}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2**31}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"max_tokens": None, "min_tokens": 2**31}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop": [""]}, "stop"), ({"stop": "\ud800"}, "stop"), ({"stop": [5]}, "stop"),
]


@pytest.mark.parametrize("kwargs,param", BAD, ids=[f"{k}" for k, _ in BAD])
def test_out_of_range_params_are_refused_naming_the_param(kwargs, param):
    with pytest.raises(ParamError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and isinstance(e.value, ValueError)


@pytest.mark.parametrize("kwargs", [
    {"seed": -2**63}, {"seed": 2**64 - 1}, {"seed": -1}, {"top_k": -1}, {"top_k": 0},
    {"temperature": 0}, {"temperature": 5.0}, {"repetition_penalty": 3.0},
    {"presence_penalty": -2}, {"frequency_penalty": 2}, {"n": 16384}, {"logprobs": 20},
    {"max_tokens": None, "min_tokens": 100}, {"min_tokens": 16}, {"top_p": 1e-9},
])
def test_params_at_the_edges_of_their_ranges_are_accepted(kwargs):
    SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def engine(model_dir):
    config = EngineConfig(model_path=str(model_dir("llama")[0]), dtype="f32", max_model_len=64,
                          kvcache_mem_mb=1, max_num_seqs=2)
    return LLMEngine(config)


def test_token_ids_and_top_k_are_checked_against_the_vocabulary(engine):
    vocab = engine.model_config.vocab_size
    SamplingParams(top_k=vocab, stop_token_ids=[0, vocab - 1]).check_for_model(vocab)
    for kwargs, param in [({"top_k": vocab + 1}, "top_k"),
                          ({"stop_token_ids": [vocab]}, "stop_token_ids")]:
        with pytest.raises(ParamError) as e:
            engine.add_request([1, 2, 3], SamplingParams(**kwargs))
        assert e.value.param == param
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.add_request([1, vocab])
    with pytest.raises(ParamError, match="not valid text"):
        engine.add_request("a lone \udc00 surrogate")
    assert not engine.requests and not engine.scheduler.has_unfinished()


def test_every_bit_of_a_64_bit_seed_counts(engine):
    def sample(seed):
        params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed)
        return engine.generate([[1, 2, 3]], params)[0].outputs[0].token_ids

    low = sample(12345)
    assert sample(12345) == low
    assert sample(12345 + 2**32) != low and sample(12345 + 2**63) != low
    assert sample(-12345) == sample(-12345) != low
