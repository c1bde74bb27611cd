"""--attention-backend / --matmul-backend pick each kernel family's backend, and a Pallas kernel
that does not compile (on this CPU the Triton lowering always fails: a real lowering error, as
on a GPU whose compiler rejects a kernel) falls back to XLA with one warning per kernel."""
from __future__ import annotations

import logging

import pytest

from vllm_jax.args import Parser, add_engine_args, engine_config
from vllm_jax.kernels import backend as kernel_backend
from vllm_jax.kernels.backend import Backends
from test_engine import GREEDY, make_engine, prompts, tokens

PACKED = dict(quant="q8_0", keep_quantized=True)  # the packed weights reach the dequant-matmul


@pytest.fixture(scope="module")
def moe_model(model_dir):
    return model_dir("qwen3_moe")[0]


@pytest.fixture(scope="module")
def xla_tokens(moe_model):
    return tokens(make_engine(moe_model, kernel_backend="xla", **PACKED).generate(
        prompts(4), GREEDY))


def fallback_run(moe_model, caplog, monkeypatch, **backends):
    """(greedy tokens, the kernels whose compile failure was logged) of a fresh engine."""
    monkeypatch.setattr(kernel_backend, "_fallen_back", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm_jax"):
        engine = make_engine(moe_model, **backends, **PACKED)
        got = tokens(engine.generate(prompts(4), GREEDY))
        got += tokens(engine.generate(prompts(2, seed=1), GREEDY))  # new buckets: no new warning
    failed = [r.getMessage().split(" kernel")[0].removeprefix("the Pallas ")
              for r in caplog.records if "failed to compile" in r.getMessage()]
    return got[:4], sorted(failed)


def test_pallas_kernels_that_fail_to_compile_run_on_xla_with_one_warning_each(
        moe_model, xla_tokens, caplog, monkeypatch):
    got, failed = fallback_run(moe_model, caplog, monkeypatch, kernel_backend="pallas")
    assert got == xla_tokens
    assert failed == ["decode attention", "dequant-matmul decode", "dequant-matmul prefill",
                      "grouped dequant-matmul", "prefill attention"]


def test_attention_and_matmul_backends_switch_separately(moe_model, xla_tokens, caplog,
                                                         monkeypatch):
    got, failed = fallback_run(moe_model, caplog, monkeypatch, attention_backend="xla",
                               matmul_backend="pallas")
    assert got == xla_tokens
    assert failed == ["dequant-matmul decode", "dequant-matmul prefill",
                      "grouped dequant-matmul"]
    got, failed = fallback_run(moe_model, caplog, monkeypatch, kernel_backend="xla",
                               attention_backend="pallas")
    assert got == xla_tokens
    assert failed == ["decode attention", "prefill attention"]


@pytest.mark.parametrize("argv, want", [
    ([], Backends("auto", "auto")),
    (["--kernel-backend", "xla"], Backends("xla", "xla")),
    (["--kernel-backend", "cpu", "--attention-backend", "pallas"], Backends("pallas", "cpu")),
    (["--matmul-backend", "xla"], Backends("auto", "xla")),
    (["--cpu-activations", "int8"], Backends("auto", "auto", "int8")),
])
def test_backend_flags_default_to_kernel_backend(argv, want):
    p = Parser(prog="test")
    add_engine_args(p)
    assert engine_config(p.parse_args(argv)).backends() == want


def test_unknown_backend_flag_is_a_usage_error(capsys):
    p = Parser(prog="test")
    add_engine_args(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--attention-backend", "cuda"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
