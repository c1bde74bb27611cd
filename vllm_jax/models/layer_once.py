"""Decoder layers traced and lowered once per distinct layer, not once per layer.

Each layer is called through one jitted function whose static argument is the layer's NNX
graphdef (its structure and static attributes: window, scale, quantization type...) and whose
traced arguments are the layer's weights. Layers of equal structure have equal graphdefs, so
inside one step JAX traces the layer once and lowers it to one StableHLO function that the step
calls once per layer: a 64-layer model lowers each Pallas kernel once instead of 64 times.
Gemma 3's sliding and global layers, or dense and MoE layers, are two distinct layers each.

XLA inlines the calls when it compiles, so the compiled step (the in-place KV cache update
included) is the one the unrolled layers gave; what shrinks is tracing and lowering (the Triton
IR of each Pallas kernel: 513 calls to 9 for a 64-layer Q4_K model). The cache-free forward
calls its layers directly, so nnx.capture sees inside them.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef, decode: bool, state, x, cos, sin, kv, meta):
    return nnx.merge(graphdef, state)(x, cos, sin, kv, meta, decode)


def call_layer(layer: nnx.Module, x, cos, sin, kv, meta, decode: bool):
    """layer(x, cos, sin, kv, meta, decode), lowered once per distinct layer of the step."""
    graphdef, state = nnx.split(layer)
    return _apply(graphdef, decode, state, x, cos, sin, kv, meta)
