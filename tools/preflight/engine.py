"""Stages 5 and 6: a 2-layer model with random weights runs the same greedy requests through the
engine with the Pallas kernels and with the XLA paths; then tools/bench.py runs as a subprocess.

Random logits have near-ties, and two correct kernels may break one differently, so greedy
tokens must agree up to the first position where the XLA run's best two logprobs lie within the
tolerance; after it the runs are different sequences and are not compared.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import SHAPES, RandomTokenizer, random_weights
from preflight import record
from vllm_jax import models
from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.kernels import backend as kernel_backend
from vllm_jax.loader import LoadedModel, to_dtype
from vllm_jax.sampling_params import SamplingParams

TOOLS = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
PROMPT_LENS = (5, 19, 40)  # ragged: one page, a partial second, several


def _engine(cls, mcfg, weights, dtype: str, backend: str, max_len: int) -> LLMEngine:
    cfg = EngineConfig(max_num_seqs=len(PROMPT_LENS), max_model_len=max_len, dtype=dtype,
                       kvcache_mem_mb=64, max_num_batched_tokens=64, kernel_backend=backend)
    model = cls(mcfg, weights, to_dtype(dtype), backend)
    return LLMEngine(cfg, loaded=LoadedModel(mcfg, model, RandomTokenizer(), "random", 0))


def _run(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False, logprobs=2, prompt_logprobs=1)
    return engine.generate(prompts, params)


def _prompt_diff(a, b) -> float:
    diffs = [abs(x[t].logprob - y[t].logprob)
             for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:],
                                a.prompt_token_ids[1:])]
    return max(diffs, default=0.0)


def _generated_diff(got, want, tol) -> tuple[int, float, bool]:
    """(positions compared, largest logprob difference there, agreed) for one completion."""
    worst = 0.0
    for i, (g, w) in enumerate(zip(got.token_ids, want.token_ids)):
        if g != w:
            best = sorted((lp.logprob for lp in want.logprobs[i].values()), reverse=True)
            return i, worst, len(best) > 1 and best[0] - best[1] < tol
        worst = max(worst, abs(got.logprobs[i][g].logprob - want.logprobs[i][w].logprob))
    return len(want.token_ids), worst, True


def _compare_engines(shape: dict, dtype: str, quant: str | None, backend: str, max_tokens: int):
    cls, mcfg = models.from_hf({**shape, "num_hidden_layers": 2})
    weights = random_weights(cls, mcfg, to_dtype(dtype), quant)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, mcfg.vocab_size, n)] for n in PROMPT_LENS]
    max_len = max(PROMPT_LENS) + max_tokens + 8
    want = _run(_engine(cls, mcfg, weights, dtype, "xla", max_len), prompts, max_tokens)
    got = _run(_engine(cls, mcfg, weights, dtype, backend, max_len), prompts, max_tokens)
    tol = 2e-3 if dtype == "f32" else 0.15
    prompt_diff = max(_prompt_diff(g, w) for g, w in zip(got, want))
    gen = [_generated_diff(g.outputs[0], w.outputs[0], tol) for g, w in zip(got, want)]
    gen_diff = max(d for _, d, _ in gen)
    row = dict(prompt_logprob_diff=prompt_diff, gen_logprob_diff=gen_diff,
               tokens_compared=[n for n, _, _ in gen], tol=tol,
               ok=prompt_diff <= tol and gen_diff <= tol and all(ok for _, _, ok in gen))
    return {**row, **_fallback_failure(kernel_backend.fallen_back())}


def _fallback_failure(fell) -> dict:
    """A Pallas kernel that failed to compile runs as XLA (kernels/backend.py): then the run
    compared XLA with itself, or timed XLA, and must not pass as a Pallas result."""
    return dict(ok=False, error=f"Pallas kernels fell back to XLA: {fell}") if fell else {}


def engine(ctx) -> list[dict]:
    rows = []
    if ctx.cpu:
        runs = [("tiny llama q8_0", TINY_LLAMA, "f32", "q8_0")]  # attention and qmatmul kernels
    else:
        runs = [("llama3.1-8b", SHAPES["llama3.1-8b"], "bf16", None),
                ("qwq-32b q4_k", SHAPES["qwq-32b"], "bf16", "q4_k")]
    for name, shape, dtype, quant in runs:
        record(rows, lambda s=shape, d=dtype, q=quant: _compare_engines(
            s, d, q, ctx.backend, 3 if ctx.cpu else 8), case=f"{name} 2 layers {dtype}")
    return rows


GPU_BENCH = ("--model-shape", "llama3.1-8b", "--dtype", "bf16", "--num-seqs", "16",
             "--input-len", "128", "--output-len", "128")
CPU_BENCH = ("--model-shape", "smollm2-135m", "--layers", "1", "--dtype", "f32",
             "--num-seqs", "2", "--input-len", "8", "--output-len", "4", "--max-model-len", "32",
             "--kvmem", "16", "--kernel-backend", "xla")
BENCH_KEYS = ("model", "device", "kernels", "num_seqs", "decode_tok_s", "decode_step_ms", "roofline_step_ms",
              "roofline_fraction", "read_bandwidth_gbs", "warmup_s", "compiles")


def _bench(args: tuple[str, ...], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, str(TOOLS / "bench.py"), *args, "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-3000:]
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{tail}")
        result = json.loads(out.read_text())
    row = {**{k: result.get(k) for k in BENCH_KEYS}, "command": shlex.join(cmd),
           "bench_json": result}
    return {**row, **_fallback_failure((result.get("kernels") or {}).get("fell_back_to_xla"))}


def bench(ctx) -> list[dict]:
    rows = []
    args = ctx.bench_args or (CPU_BENCH if ctx.cpu else GPU_BENCH)
    record(rows, lambda: _bench(tuple(args), 600), case="tools/bench.py " + " ".join(args))
    return rows
