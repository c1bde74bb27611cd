"""Lowering for CUDA on a machine without a GPU: the kernels and whole steps are exported with
`jax.export` for the "cuda" platform from shapes alone (jax.ShapeDtypeStruct), so a Pallas kernel
that no longer lowers to Triton is found on the CPU. The kernels are lowered as chosen, never
probe-compiled here (kernels/backend.py lowering_only).

jax 0.10 lowers for CUDA as is; jax >= 0.11 needs an abstract GPU to lower against.
"""
from __future__ import annotations

import contextlib

import jax
from jax import export

from vllm_jax.kernels import backend as kernel_backend

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call each Pallas (Triton) kernel lowers to
ABSTRACT_GPU = ("NVIDIA H100 80GB HBM3", 132, "gpu")  # device kind, SMs, platform


def abstract_gpu():
    """The context lowering for CUDA needs without a GPU: an abstract H100 on jax >= 0.11."""
    if jax.__version_info__ < (0, 11):
        return contextlib.nullcontext()
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    return use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                                          abstract_device=AbstractDevice(*ABSTRACT_GPU)))


def export_for_cuda(fn, *args, **kwargs) -> export.Exported:
    """`fn` (jitted or not) exported for CUDA at the shapes of `args` (arrays or
    ShapeDtypeStructs); Triton custom calls allowed."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    with kernel_backend.lowering_only(), abstract_gpu():
        return export.export(jitted, platforms=["cuda"], disabled_checks=checks)(*args, **kwargs)


def triton_calls(exported: export.Exported) -> int:
    """How many Pallas kernels the exported module calls."""
    return exported.mlir_module().count(TRITON_CALL)
