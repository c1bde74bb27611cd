"""The time each dequant-matmul kernel should reach on an H100 SXM, from bytes and FLOPs alone:
the decode kernel's grid and split-K (kernels/quant_pallas.py decode_tiling) and the bytes it
moves, the prefill kernel's tiles, at Llama-3.1-8B's and QwQ-32B's projections.

    python tools/qmatmul_roofline.py --qtype q4_k --json qmatmul_roofline.json

Decode bytes: the packed weight once (repack layout), x, the float32 partial sums written and
read back (real tokens only), the output. Prefill: the weight once (the token tiles sharing a
weight tile run side by side, so L2 serves all but the first read), x once (<= 28 MiB: it stays
in the 50 MB L2), the output; and the bf16 FLOPs.
Roofline = max(bytes / HBM bandwidth, FLOPs / tensor-core peak).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench import packed_shape  # noqa: E402
from vllm_jax.kernels import quant  # noqa: E402
from vllm_jax.kernels import quant_pallas as qp  # noqa: E402

HBM_BYTES_S = 3.35e12  # H100 SXM HBM3
BF16_FLOP_S = 989e12  # H100 SXM dense bf16 tensor cores
MATRICES = {  # projection -> (rows, cols)
    "llama3.1-8b q/o": (4096, 4096), "llama3.1-8b k/v": (1024, 4096),
    "llama3.1-8b gate/up": (14336, 4096), "llama3.1-8b down": (4096, 14336),
    "qwq-32b q/o": (5120, 5120), "qwq-32b k/v": (1024, 5120),
    "qwq-32b gate/up": (27648, 5120), "qwq-32b down": (5120, 27648),
}


def weight_bytes(qtype, rows, cols) -> int:
    fields = packed_shape(qtype, (rows, cols)).fields
    return sum(f.size * jnp.dtype(f.dtype).itemsize for f in fields.values())


def decode_row(qtype, rows, cols, tokens) -> dict:
    step = quant.QTYPES[qtype][0]
    w = weight_bytes(qtype, rows, cols)
    bn, splits = qp.decode_tiling(rows, tokens, cols // step, step, w // rows)
    partial = 2 * splits * tokens * rows * 4 if splits > 1 else 0
    moved = w + 2 * tokens * cols + partial + 2 * tokens * rows
    return dict(kernel="decode", tokens=tokens, tile=f"{bn} rows x K/{splits}",
                programs=-(-rows // bn) * splits,
                mib=round(moved / 2**20, 2), partial_share=round(partial / moved, 3),
                roofline_us=round(1e6 * moved / HBM_BYTES_S, 1))


def prefill_row(qtype, rows, cols, tokens) -> dict:
    bm, bn = qp.prefill_tiling(rows, tokens)
    tiles = -(-tokens // bm)
    moved = weight_bytes(qtype, rows, cols) + 2 * tokens * cols + 2 * tokens * rows
    flops = 2 * tokens * rows * cols
    return dict(kernel="prefill", tokens=tokens, tile=f"{bm} tokens x {bn} rows",
                programs=-(-rows // bn) * tiles,
                mib=round(moved / 2**20, 2), partial_share=0.0,
                roofline_us=round(1e6 * max(moved / HBM_BYTES_S, flops / BF16_FLOP_S), 1),
                bound="memory" if moved / HBM_BYTES_S > flops / BF16_FLOP_S else "compute")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qtype", default="q4_k", choices=list(quant.QTYPES))
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    for name, (r, c) in MATRICES.items():
        for row in (decode_row(args.qtype, r, c, 1), decode_row(args.qtype, r, c, 16),
                    prefill_row(args.qtype, r, c, 512)):
            rows.append(dict(matrix=name, shape=f"{r}x{c}", **row))
    cols = ["matrix", "shape", "kernel", "tokens", "tile", "programs", "mib",
            "partial_share", "roofline_us"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[k]) for k in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
