"""Time the CPU quantized matmul alone at one layer's shapes of a model, float32 against int8
activations, for a few token counts: where a step's time goes, without the rest of the step.

    python tools/qmatmul_time.py                       # SmolLM2-135M: Q4_1 layers, Q8_0 lm_head
    python tools/qmatmul_time.py --qtype q4_k --tokens 1 16 128
    VLLM_JAX_CPU_THREADS=1 python tools/qmatmul_time.py --cpu-time   # on a shared machine

--cpu-time reports the process's CPU time per call instead of wall time: with one kernel thread
it is the kernel's own time, whatever else runs on the cores. Prints a table (ms per call; a
layer's calls summed; the model's decode step estimate) and
writes JSON next to it with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax.kernels import cpu  # noqa: E402
from vllm_jax.kernels.quant import QTYPES, quantize, repack  # noqa: E402

# SmolLM2-135M: (rows, cols) of q, k, v, o, gate, up, down; 30 layers; lm_head 49152 x 576
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def _fields(rows: int, cols: int, qtype: str) -> dict:
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in repack(quantize(w, qtype)).items()}


def time_call(fields: dict, qtype: str, tokens: int, cols: int, activations: str,
              repeat: int, clock=time.perf_counter) -> float:
    """Median ms of one jitted call."""
    fn = jax.jit(lambda x, f: cpu.qmatmul(x, f, qtype, activations=activations))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, cols)), jnp.float32)
    fn(x, fields).block_until_ready()
    times = []
    for _ in range(repeat):
        t = clock()
        fn(x, fields).block_until_ready()
        times.append(clock() - t)
    return 1e3 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qtype", default="q4_1", choices=list(QTYPES))
    ap.add_argument("--head-qtype", default="q8_0", choices=list(QTYPES))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 16, 128])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    layer = [(r, c, _fields(r, c, args.qtype)) for r, c in LAYER]
    head = _fields(args.vocab, LAYER[0][1], args.head_qtype)
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = []
    print(f"{'tokens':>6} {'acts':>5} {'layer ms':>9} {'lm_head ms':>10} {'step ms':>8}")
    for tokens in args.tokens:
        for acts in cpu.ACTIVATIONS:
            lay = sum(time_call(f, args.qtype, tokens, c, acts, args.repeat, clock)
                      for _, c, f in layer)
            hd = time_call(head, args.head_qtype, tokens, LAYER[0][1], acts, args.repeat, clock)
            step = args.layers * lay + hd
            rows.append(dict(tokens=tokens, activations=acts, layer_ms=lay, lm_head_ms=hd,
                             step_ms=step))
            print(f"{tokens:>6} {acts:>5} {lay:>9.3f} {hd:>10.3f} {step:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
