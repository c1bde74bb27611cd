"""Seconds to lower one engine step for CUDA (trace + StableHLO with its Triton kernels, no XLA
compile) per bucket, at full depth, on this machine without a GPU: what warm-up pays per bucket
before XLA compiles anything.

    python tools/lowering_time.py --model-shape llama3.1-8b qwen3-0.6b qwq-32b:q4_k

Weights are shapes only (bench.weight_shapes), the kernels Pallas. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench import SHAPES, weight_shapes  # noqa: E402
from vllm_jax import models  # noqa: E402
from vllm_jax.kernels.backend import Backends  # noqa: E402
from vllm_jax.kernels.lowering import triton_calls  # noqa: E402
from vllm_jax.runner.model_runner import ModelRunner, StepLayout  # noqa: E402

PAGE = 16


def abstract_runner(name: str, qtype: str | None, layers: int | None, context: int):
    shape = dict(SHAPES[name], **({"num_hidden_layers": layers} if layers else {}))
    cls, cfg = models.from_hf(shape)
    model = cls(cfg, weight_shapes(cls, cfg, jnp.bfloat16, qtype), jnp.bfloat16,
                Backends("pallas", "pallas"), context)
    return ModelRunner(model, [], 64, PAGE, context, 256, 512, 8, jnp.bfloat16), cfg.num_layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-shape", nargs="+", required=True, metavar="NAME[:QTYPE]",
                   help=f"bench.py shapes ({', '.join(sorted(SHAPES))}), :q4_k etc. to pack")
    p.add_argument("--layers", type=int, help="only the first N layers (default: all)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--out", default="lowering_time.json")
    args = p.parse_args(argv)
    rows = []
    print(f"{'shape':<18}{'layers':>7}{'bucket':>16}{'triton calls':>14}{'lower s':>9}")
    for item in args.model_shape:
        name, _, qtype = item.partition(":")
        runner, layers = abstract_runner(name, qtype or None, args.layers, args.context)
        pages = runner.max_pages
        for layout in [StepLayout(2, 2, pages, True), StepLayout(16, 16, pages, True),
                       StepLayout(256, 256, pages, True), StepLayout(512, 8, pages, False)]:
            t = time.perf_counter()
            calls = triton_calls(runner.export_step(layout))
            row = dict(shape=item, layers=layers, decode=layout.decode, tokens=layout.num_tokens,
                       seqs=layout.num_seqs, triton_calls=calls,
                       seconds=round(time.perf_counter() - t, 2))
            rows.append(row)
            bucket = f"{'decode' if layout.decode else 'prefill'} {layout.num_tokens}x{layout.num_seqs}"
            print(f"{item:<18}{layers:>7}{bucket:>16}{calls:>14}{row['seconds']:>9.2f}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
