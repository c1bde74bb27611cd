"""Registers, stack (spills) and shared memory of the dequant-matmul Pallas kernels compiled for
an H100 (sm_90a) on a machine without a GPU: each kernel is lowered for CUDA here
(kernels/lowering.py), its Triton IR taken as text and compiled by a standalone Triton in a
child process; `cuobjdump --dump-resource-usage` (shipped with Triton) reads the cubin.

    pip install --no-deps --target /tmp/triton triton==3.9.0
    python tools/triton_resources.py --triton /tmp/triton --qtype q4_k q6_k --tokens 1 16 512

Triton is no dependency of the project (jaxlib carries its own); the child process imports the
given one only. Warps and pipeline stages are those the kernel asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def triton_ir(qtype: str, rows: int, cols: int, tokens: int) -> tuple[str, int, int]:
    """(Triton IR text, warps, stages) of quant.qmatmul's kernel at this shape."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as registration

    from tools.bench import packed_shape
    from vllm_jax.kernels import quant
    from vllm_jax.kernels.lowering import export_for_cuda

    texts, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def keep_text(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = keep_text
    try:
        fn = functools.partial(quant.qmatmul, qtype=qtype, cols=cols, backend="pallas")
        module = export_for_cuda(fn, jax.ShapeDtypeStruct((tokens, cols), jnp.bfloat16),
                                 packed_shape(qtype, (rows, cols)).fields).mlir_module()
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    warps, stages = (int(re.search(rf"{k} = (\d+)", module).group(1))
                     for k in ("num_warps", "num_stages"))
    return texts[-1], warps, stages


def compile_and_measure(path: str, warps: int, stages: int) -> dict:
    """In the child process: compile one .ttir for sm_90a, read the cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(kernel.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    usage = subprocess.run([str(tool), "--dump-resource-usage", fh.name], capture_output=True,
                           text=True, check=True).stdout
    os.unlink(fh.name)
    fields = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return dict(registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]),
                shared_kib=round(kernel.metadata.shared / 1024, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triton", required=True, help="directory holding a standalone triton")
    p.add_argument("--qtype", nargs="+", default=["q4_k"])
    p.add_argument("--shape", nargs="+", default=["5120x5120", "5120x27648"], help="ROWSxCOLS")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 512])
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=3, metavar=("TTIR", "WARPS", "STAGES"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(compile_and_measure(args.child[0], *map(int, args.child[1:]))))
        return
    sys.path.insert(0, str(ROOT))
    env = {**os.environ, "PYTHONPATH": args.triton, "TRITON_DEFAULT_FP_FUSION": "1"}
    rows = []
    print("qtype | shape | tokens | warps | stages | registers | stack bytes | shared KiB")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.qtype:
            for shape in args.shape:
                r, c = map(int, shape.split("x"))
                for tokens in args.tokens:
                    text, warps, stages = triton_ir(qtype, r, c, tokens)
                    path = Path(tmp) / "kernel.ttir"
                    path.write_text(text)
                    child = subprocess.run(
                        [sys.executable, __file__, "--triton", args.triton, "--child", str(path),
                         str(warps), str(stages)], env=env, capture_output=True, text=True)
                    if child.returncode:
                        raise SystemExit(child.stderr[-2000:])
                    rows.append(dict(qtype=qtype, shape=shape, tokens=tokens, warps=warps,
                                     stages=stages, **json.loads(child.stdout)))
                    print(" | ".join(str(v) for v in rows[-1].values()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
