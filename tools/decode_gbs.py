"""GB/s of the one-token quantized matmul calls of a decode step, against a plain streaming read.

Each shape is timed as the model calls it (one jitted call per layer, `copies` distinct weights
so that, as in a step, the bytes come from memory and not from the caches), float32 and int8
activations; the read baseline sums the same number of bytes with 256-bit loads (a C loop built
here). Threads: VLLM_JAX_CPU_THREADS for the kernels, --threads for the read. --cpu-time: the
process's CPU time instead of wall time (with one thread, the work's own time on a busy machine).

    VLLM_JAX_CPU_THREADS=1 python tools/decode_gbs.py --threads 1
    python tools/decode_gbs.py --threads 2
"""
from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax.kernels import cpu  # noqa: E402
from vllm_jax.kernels.quant import quantize, repack  # noqa: E402

# SmolLM2-135M's decode calls: name -> (qtype, [(rows, cols) of each weight of one call], calls)
SHAPES = {
    "qkv 960x576": ("q4_1", [(576, 576), (192, 576), (192, 576)], 30),
    "o 576x576": ("q4_1", [(576, 576)], 30),
    "gate+up 3072x576": ("q4_1", [(1536, 576), (1536, 576)], 30),
    "down 576x1536": ("q4_1", [(576, 1536)], 30),
    "lm_head 49152x576": ("q8_0", [(49152, 576)], 1),
    "tiny 32x576": ("q4_1", [(32, 576)], 30),  # the fixed cost of a call
}

READ_C = r"""
#include <immintrin.h>
#include <stdint.h>
extern "C" uint64_t read_bytes(const uint8_t* p, int64_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (int64_t i = 0; i + 128 <= n; i += 128) {
    a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i*)(p + i)));
    b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i*)(p + i + 32)));
    c = _mm256_xor_si256(c, _mm256_loadu_si256((const __m256i*)(p + i + 64)));
    d = _mm256_xor_si256(d, _mm256_loadu_si256((const __m256i*)(p + i + 96)));
  }
  a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
  return (uint64_t)_mm256_extract_epi64(a, 0);
}
"""


def _reader():
    d = Path(tempfile.mkdtemp())
    (d / "r.cc").write_text(READ_C)
    subprocess.run(["g++", "-O2", "-mavx2", "-shared", "-fPIC", str(d / "r.cc"), "-o",
                    str(d / "r.so")], check=True)
    lib = ctypes.CDLL(str(d / "r.so"))
    lib.read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.read_bytes.restype = ctypes.c_uint64
    return lib


def read_gbs(lib, bufs: list[np.ndarray], threads: int, repeat: int, clock) -> float:
    """GB/s reading bufs in turn (each split across `threads` threads, as the kernels split)."""
    def one(b):
        parts = np.array_split(b, threads)
        ts = [threading.Thread(target=lib.read_bytes, args=(p.ctypes.data, p.nbytes))
              for p in parts[1:]]
        for t in ts:
            t.start()
        lib.read_bytes(parts[0].ctypes.data, parts[0].nbytes)
        for t in ts:
            t.join()
    times = []
    for _ in range(repeat):
        t = clock()
        for b in bufs:
            one(b)
        times.append(clock() - t)
    return sum(b.nbytes for b in bufs) / np.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="threads of the read baseline")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20, help="passes over the calls per timing")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time, not wall time")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    lib = _reader()
    print(f"{'call':>18} {'KB':>6} {'f32 us':>8} {'GB/s':>6} {'int8 us':>8} {'GB/s':>6} "
          f"{'read GB/s':>9}")
    for name in args.shapes:
        qtype, mats, calls = SHAPES[name]
        weights = [[{k: jnp.asarray(v) for k, v in
                     repack(quantize(rng.standard_normal(s).astype(np.float32), qtype)).items()}
                    for s in mats] for _ in range(calls)]
        nbytes = sum(v.nbytes for v in jax.tree.leaves(weights[0]))
        x = jnp.asarray(rng.standard_normal((args.tokens, mats[0][1])), jnp.float32)
        row = [name, nbytes / 1e3]
        for acts in ("f32", "int8"):
            def step(_, x, ws, a=acts):  # every call once, the next x depending on them
                ys = [cpu.qmatmul_many(x, [(f, qtype) for f in w], a)[0][:, :1] for w in ws]
                return x + 0 * sum(ys)

            fn = jax.jit(lambda x, ws: jax.lax.fori_loop(0, args.inner, lambda i, x:
                                                          step(i, x, ws), x))
            jax.block_until_ready(fn(x, weights))
            times = []
            for _ in range(args.repeat):
                t = clock()
                jax.block_until_ready(fn(x, weights))
                times.append(clock() - t)
            us = 1e6 * np.median(times) / calls / args.inner
            row += [us, nbytes / us / 1e3]
        bufs = [np.concatenate([np.asarray(v).ravel().view(np.uint8)
                                for v in jax.tree.leaves(w)]) for w in weights]
        row.append(read_gbs(lib, bufs, args.threads, args.repeat, clock))
        print("{:>18} {:>6.0f} {:>8.1f} {:>6.1f} {:>8.1f} {:>6.1f} {:>9.1f}".format(*row))


if __name__ == "__main__":
    main()
