"""Time the CPU paged attention alone at one model's shapes over a long context: the decode step
(one sequence, padded to the runner's 2 rows, as the engine calls it) and one prompt chunk of the
ragged call, each layer over its own cache (so a step streams every layer's K/V from memory, not
from the last-level cache), with the K/V bytes a step reads and their GB/s.

    python tools/attention_time.py                                 # SmolLM2-135M, f16 cache
    python tools/attention_time.py --contexts 1024 8000 --chunk 512 --dtype bf16

    VLLM_JAX_CPU_THREADS=1 python tools/attention_time.py --cpu-time   # on a shared machine

--cpu-time reports the process's CPU time instead of wall time: with one kernel thread it is the
kernel's own work, whatever else runs on the cores. Prints one line per (call, context): median
ms of a step (all layers), GB/s of K/V read.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax.kernels import cpu  # noqa: E402

DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}


def _median_ms(fn, args, repeat: int, clock) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeat):
        t = clock()
        fn(*args).block_until_ready()
        times.append(clock() - t)
    return 1e3 * float(np.median(times))


def _layers(attend, scale):
    """One jitted step: attend(q, k_i, v_i, *rest) for every layer's cache, the outputs summed."""
    def step(q, ks, vs, *rest):
        return sum(attend(q, k, v, *rest, scale=scale) for k, v in zip(ks, vs))
    return jax.jit(step)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="f16", choices=list(DTYPES))
    ap.add_argument("--chunk", type=int, default=512, help="prompt chunk tokens (0: no prefill)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall time")
    ap.add_argument("--shuffled-pages", action="store_true",
                    help="a sequence's pages in random order (the engine hands out free pages "
                         "in order: a fresh sequence's are consecutive)")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    hd, kvh, ps = args.head_dim, args.kv_heads, args.page_size
    scale = hd ** -0.5
    for ctx in args.contexts:
        pages = -(-ctx // ps)
        shape = (kvh, pages + 1, ps, hd)
        ks, vs = ([jnp.asarray(rng.standard_normal(shape), DTYPES[args.dtype])
                   for _ in range(args.layers)] for _ in range(2))
        order = rng.permutation(pages) if args.shuffled_pages else np.arange(pages)
        tables = jnp.asarray(np.stack([order, np.zeros(pages, int)]), jnp.int32)
        lens = jnp.asarray([ctx, 0], jnp.int32)  # a padding row, as a 1-sequence decode step
        kv_bytes = 2 * args.layers * kvh * ctx * hd * ks[0].dtype.itemsize
        q = jnp.asarray(rng.standard_normal((2, args.heads, hd)), jnp.float32)
        ms = _median_ms(_layers(cpu.decode_attention, scale), (q, ks, vs, tables, lens),
                        args.repeat, clock)
        print(f"decode  ctx {ctx:6d}: {ms:7.2f} ms a step, {kv_bytes / ms / 1e6:5.1f} GB/s")
        if args.chunk:
            n = min(args.chunk, ctx)
            qc = jnp.asarray(rng.standard_normal((n, args.heads, hd)), jnp.float32)
            seq = jnp.zeros(n, jnp.int32)
            pos = jnp.arange(ctx - n, ctx, dtype=jnp.int32)
            ms = _median_ms(_layers(cpu.ragged_attention, scale),
                            (qc, ks, vs, seq, pos, tables, lens), max(3, args.repeat // 10), clock)
            print(f"chunk {n:4d} at {ctx:6d}: {ms:7.1f} ms a step, "
                  f"{n * 1e3 / ms:7.1f} tok/s (attention alone)")


if __name__ == "__main__":
    main()
