"""Grouped matmuls for Mixture-of-Experts layers: rows sorted by expert, one matrix per expert.

`grouped_matmul` takes dense experts [E, out, in]; `grouped_qmatmul` GGUF-packed ones (fields
[E, out, ...], see quant.py) on the chosen backend: the C++ kernel (cpu.grouped_qmatmul) and the
Pallas kernel (quant_pallas.grouped_fused_qmatmul) read only the experts that have rows; the XLA
path (the reference) dequantizes every expert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vllm_jax.kernels import backend as kernel_backend
from vllm_jax.kernels import quant


def _expert_of_rows(group_sizes, num_rows: int):
    """[N] expert id of each row (rows past the groups get the last expert; callers zero them)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.minimum(jnp.searchsorted(ends, jnp.arange(num_rows), side="right"),
                       group_sizes.shape[0] - 1)


def grouped_matmul(xs, w, group_sizes):
    """xs [N, in] sorted by expert, w [E, out, in], group_sizes [E] -> [N, out] (float32 sums).

    Few rows (decode): each row gathers its expert's matrix, so only chosen experts are read.
    Many rows: XLA's ragged_dot (on the CPU it multiplies every expert by every row, which the
    gather's copies would cost anyway past ~E rows)."""
    n, e = xs.shape[0], w.shape[0]
    valid = (jnp.arange(n) < group_sizes.sum())[:, None]
    if n <= e:
        idx = _expert_of_rows(group_sizes, n)
        y = jnp.einsum("ni,noi->no", xs, w[idx], preferred_element_type=jnp.float32)
    else:
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[0])
        y = jax.lax.ragged_dot_general(xs, w, group_sizes, dims,
                                       preferred_element_type=jnp.float32)
    return jnp.where(valid, y, 0)


def grouped_qmatmul(xs, fields: dict, group_sizes, qtype: str, cols: int, *,
                    backend: str = "auto"):
    """grouped_matmul for packed experts: fields [E, out, ...] -> [N, out] in xs.dtype."""
    name = kernel_backend.resolve(backend)
    if name == "cpu":
        from vllm_jax.kernels import cpu

        y = cpu.grouped_qmatmul(xs, fields, qtype, group_sizes)
    elif name in ("pallas", "pallas_interpret") and _pallas_runs(name, xs, fields, group_sizes,
                                                                 qtype, cols):
        from vllm_jax.kernels.quant_pallas import grouped_fused_qmatmul

        y = grouped_fused_qmatmul(xs, fields, group_sizes, qtype, cols,
                                  interpret=name == "pallas_interpret")
    else:
        e, rows = next(iter(fields.values())).shape[:2]
        flat = {k: v.reshape(e * rows, *v.shape[2:]) for k, v in fields.items()}
        w = quant.dequantize(flat, qtype, cols, xs.dtype).reshape(e, rows, cols)
        y = grouped_matmul(xs, w, group_sizes)
    return y.astype(xs.dtype)


def _pallas_runs(name: str, xs, fields: dict, group_sizes, qtype: str, cols: int) -> bool:
    """The interpreter always runs; the Triton kernel where it compiles (kernels/backend.py)."""
    from vllm_jax.kernels.quant_pallas import grouped_fused_qmatmul

    return name == "pallas_interpret" or kernel_backend.pallas_compiles(
        "grouped dequant-matmul", lambda x, f, g: grouped_fused_qmatmul(x, f, g, qtype, cols),
        (xs, fields, group_sizes), (qtype, cols))
