"""The building blocks architectures compose: linear layers (dense or GGUF-packed), embeddings,
RMSNorm variants, rotary embeddings, attention over the paged KV cache (or cache-free), the gated
MLP and the Mixture-of-Experts block.

Modules are built around already-loaded weights: `weights` maps the model's weight names (see
models/base.py Weight.name) to device arrays, or to a kernels.quant.PackedWeight. Nothing is
initialised twice and nothing is held on the host.

Two ways to run a model: over the paged cache (tokens [T] flat across sequences, AttnMetadata),
as the engine does, or cache-free (tokens [B, L], CacheFree), as `vllm_jax.forward_logits` does.
"""
from __future__ import annotations

import functools
import operator
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vllm_jax import parallel
from vllm_jax.kernels import backend as kernel_backend
from vllm_jax.kernels import cpu as cpu_kernels
from vllm_jax.kernels.backend import Backends
from vllm_jax.kernels import moe
from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels import quant
from vllm_jax.kernels.quant import PackedWeight
from vllm_jax.models.base import ConfigError, Rope


PAD_TOKEN = 2**31 - 1  # the id of a step's padding tokens: past any vocabulary, embedded as 0


class AttnMetadata(NamedTuple):
    positions: jax.Array  # [T]
    slot_mapping: jax.Array  # [T] cache slot per token; out of range for padding
    seq_idx: jax.Array  # [T] row of block_tables each token belongs to
    block_tables: jax.Array  # [S, max_pages]
    context_lens: jax.Array  # [S] tokens in the cache after this step (0 = padding row)


class CacheFree(NamedTuple):
    """B whole sequences of L tokens, attention causal within each, no KV cache."""
    positions: jax.Array  # [B * L]: 0..L-1 per sequence
    batch: int
    length: int

    @classmethod
    def of(cls, batch: int, length: int) -> "CacheFree":
        return cls(jnp.tile(jnp.arange(length, dtype=jnp.int32), batch), batch, length)


def matmul(x, w):
    """x [..., in] @ w.T for w [out, in], without a transpose."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


class Linear(nnx.Module):
    """y = x @ W.T (+ b), W in the Hugging Face [out, in] layout, dense or GGUF-packed."""

    def __init__(self, weights: Mapping, name: str, backend: str | Backends = "auto",
                 activations: str | None = None):
        w = weights[name + ".weight"]
        self.backend = kernel_backend.matmul_of(backend)
        self.activations = activations or kernel_backend.activations_of(backend)
        if isinstance(w, PackedWeight):
            if kernel_backend.resolve(self.backend) == "cpu":
                w = cpu_kernels.for_activations(w, self.activations)
            self.qtype, self.cols = w.qtype, w.cols
            self.weight = nnx.Dict({k: nnx.Param(v) for k, v in w.fields.items()})
            self.tp_dim = parallel.split_dim(next(iter(w.fields.values())))
        else:
            self.qtype, self.cols = None, w.shape[-1]
            self.weight = nnx.Param(w)
            self.tp_dim = parallel.split_dim(w)
        bias = weights.get(name + ".bias")
        self.bias = nnx.Param(bias) if bias is not None else None

    def fields(self) -> dict:
        return {k: v[...] for k, v in self.weight.items()}

    def __call__(self, x):
        w = self.weight[...] if self.qtype is None else None
        if w is not None and w.ndim == 2 and kernel_backend.resolve(self.backend) == "cpu":
            y = parallel.shard_qmatmul(_dense_kernel, self.tp_dim)(
                x, {"w": w}, None, self.cols).astype(x.dtype)
        elif w is not None:
            y = matmul(x, w)
        else:
            qmatmul = quant.qmatmul
            if kernel_backend.resolve(self.backend) != "xla":  # a kernel: split by hand on a mesh
                qmatmul = parallel.shard_qmatmul(qmatmul, self.tp_dim)
            y = qmatmul(x, self.fields(), self.qtype, self.cols, backend=self.backend,
                        activations=self.activations).astype(x.dtype)
        return self.add_bias(y)

    def add_bias(self, y):
        return y if self.bias is None else y + self.bias[...]


def linears(mods: list[Linear], x) -> list:
    """[m(x) for m in mods], bit-identical; on the cpu backend weights alike (all packed, or all
    dense [out, in] of one dtype; the same activations, cols and tensor-parallel split) in one
    kernel call (x read, or quantized, once and one pass of the helper threads over all their
    rows): a layer's q, k, v or gate, up."""
    m0 = mods[0]
    dense = m0.qtype is None

    def key(m):
        w = m.weight[...] if dense else None
        return (m.qtype is None, w is None or (w.ndim, w.dtype), m.backend, m.activations,
                m.cols, m.tp_dim)

    if (kernel_backend.resolve(m0.backend) != "cpu" or (dense and m0.weight[...].ndim != 2) or
            any(key(m) != key(m0) for m in mods)):
        return [m(x) for m in mods]
    if dense:
        kernel, fields, static = _dense_kernels, [{"w": m.weight[...]} for m in mods], {}
    else:
        kernel, fields = quant.qmatmul_many, [m.fields() for m in mods]
        static = dict(backend=m0.backend, activations=m0.activations)
    ys = parallel.shard_qmatmul(kernel, m0.tp_dim)(x, fields, [m.qtype for m in mods], m0.cols,
                                                   **static)
    return [m.add_bias(y.astype(x.dtype)) for m, y in zip(mods, ys)]


def _dense_kernel(x, fields, qtype, cols):
    """The C++ kernel for dense weights (float32, or 16-bit widened in registers): float32
    sums. XLA's CPU dots are 2-3x slower at decode in float32 and 10-30x in bf16."""
    return _dense_kernels(x, [fields], [qtype], cols)[0]


def _dense_kernels(x, fields: list, qtypes, cols) -> list:
    """_dense_kernel of each {"w": w} in fields, in one kernel call."""
    ys = dense_matmuls(x.reshape(-1, cols), tuple(f["w"] for f in fields))
    return [y.reshape(*x.shape[:-1], -1) for y in ys]


@jax.custom_vjp
def dense_matmuls(x2, ws: tuple) -> tuple:
    """x2 [T, in] @ w.T for each w [out, in] by the C++ kernel (one call), differentiable (the
    gradients are XLA dots), so `jax.grad` through forward_logits works on the CPU too."""
    from vllm_jax.kernels import cpu

    return tuple(cpu.dense_matmul_many(x2, list(ws)))


def _dense_fwd(x2, ws):
    return dense_matmuls(x2, ws), (x2, ws)


def _dense_bwd(saved, gs):  # gs: [T, out] each
    x2, ws = saved
    gx = functools.reduce(operator.add, [jax.lax.dot_general(
        g, w.astype(g.dtype), (((1,), (0,)), ((), ()))) for g, w in zip(gs, ws)])
    gws = tuple(jax.lax.dot_general(g, x2.astype(g.dtype), (((0,), (0,)), ((), ())))
                .astype(w.dtype) for g, w in zip(gs, ws))
    return gx.astype(x2.dtype), gws


dense_matmuls.defvjp(_dense_fwd, _dense_bwd)


class Embedding(nnx.Module):
    """Rows of a [vocab, hidden] table (dense or packed), times `scale` (Gemma: sqrt(hidden))."""

    def __init__(self, weights: Mapping, name: str, dtype, backend: str = "auto",
                 scale: float | None = None):
        self.linear = Linear(weights, name, backend)
        self.dtype = dtype
        self.scale = scale

    def __call__(self, ids):
        """ids past the vocabulary (a step's padding tokens: PAD_TOKEN) embed as zeros."""
        lin = self.linear

        def gather(table):
            return jnp.take(table, ids, axis=0, mode="fill", fill_value=0)

        if lin.qtype is None:
            x = gather(lin.weight[...]).astype(self.dtype)  # 16-bit rows of an f32 model: exact
        elif cpu_kernels.is_panel(lin.qtype):  # tied to an lm_head in panels
            rows = cpu_kernels.panel_rows(lin.fields(), lin.qtype, ids.reshape(-1))
            x = quant.dequantize(rows, cpu_kernels.base_qtype(lin.qtype), lin.cols, self.dtype)
            x = x.reshape(*ids.shape, -1)
        else:
            rows = {k: gather(v) for k, v in lin.fields().items()}
            x = quant.dequantize(rows, lin.qtype, lin.cols, self.dtype)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, x.dtype)
        return x


def row_sum(x):
    """x summed over its last axis (kept, size 1) in an order fixed by that axis's length alone:
    halves added elementwise until one column is left. XLA's own reductions sum a row in an order
    that depends on how many rows there are (8 or more are vectorized across rows), so a token's
    norm, and with int8 activations its next matmul's rounding, would depend on its batch."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        half = x[..., :n // 2] + x[..., n // 2:n // 2 * 2]
        if n % 2:
            half = jnp.concatenate([half[..., :1] + x[..., -1:], half[..., 1:]], axis=-1)
        x = half
    return x


class RMSNorm(nnx.Module):
    """x / rms(x) * w over the last axis. upcast: multiply in float32, then cast (Gemma's order;
    its weights arrive as 1 + w), else cast, then multiply (Llama's)."""

    def __init__(self, weights: Mapping, name: str, eps: float, upcast: bool = False):
        self.weight = nnx.Param(weights[name + ".weight"])
        self.eps = eps
        self.upcast = upcast

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(row_sum(x32 * x32) / x32.shape[-1] + self.eps)
        if self.upcast:
            return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)
        return (self.weight[...] * x32.astype(x.dtype)).astype(x.dtype)


# -- rotary embeddings ----------------------------------------------------------------------------

def rope_tables(rope: Rope, positions, max_len: int | None = None):
    """cos, sin [T, 1, rope.dim] float32 for each token's position (broadcast over heads)."""
    inv_freq = jnp.asarray(rope.inv_freq(max_len))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
    factor = rope.attention_factor()
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def rotate(x, cos, sin):
    """Rotary embedding in the Hugging Face (rotate-half) convention on the first cos.shape[-1]
    dims of each head (all of them but for partial rotary). x: [T, heads, head_dim]."""
    dim = cos.shape[-1]
    rot, rest = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
    half = dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return out if rest is None else jnp.concatenate([out, rest], axis=-1)


# -- attention ------------------------------------------------------------------------------------

def cache_free_attention(q, k, v, meta: CacheFree, *, scale, sliding_window=None):
    """Causal attention within each of B sequences. q [B*L, heads, hd], k/v [B*L, kv_heads, hd]."""
    b, length = meta.batch, meta.length
    h, hd, kvh = q.shape[1], q.shape[2], k.shape[1]
    g = h // kvh
    pos = np.arange(length)
    allowed = pos[None, :] <= pos[:, None]  # [L query, L key]
    if sliding_window is not None:
        allowed &= pos[None, :] > pos[:, None] - sliding_window
    qg = q.reshape(b, length, kvh, g, hd).astype(jnp.float32) * scale
    kf = k.reshape(b, length, kvh, hd).astype(jnp.float32)
    vf = v.reshape(b, length, kvh, hd).astype(jnp.float32)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, kf)  # [B, kvh, G, L, L]
    probs = jax.nn.softmax(jnp.where(jnp.asarray(allowed), scores, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgqs,bskd->bqkgd", probs, vf)
    return o.reshape(b * length, h, hd).astype(q.dtype)


class Attention(nnx.Module):
    """q/k/v projections, optional per-head q/k RMSNorm, RoPE, attention, o projection.

    window: this layer's sliding window (None: full attention); scale: the query scale;
    backend: a kernels.backend name or Backends (attention's for attention, matmul's for the
    projections).
    """

    def __init__(self, cfg, weights: Mapping, prefix: str, backend: str | Backends, *, window,
                 scale, norm_upcast: bool = False):
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_dim)
        self.window, self.scale = window, scale
        self.backend = kernel_backend.attention_of(backend)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, p, Linear(weights, f"{prefix}.{p}", backend))
        self.qk_norm = f"{prefix}.q_norm.weight" in weights
        if self.qk_norm:
            self.q_norm = RMSNorm(weights, f"{prefix}.q_norm", cfg.rms_norm_eps, norm_upcast)
            self.k_norm = RMSNorm(weights, f"{prefix}.k_norm", cfg.rms_norm_eps, norm_upcast)

    def __call__(self, x, cos, sin, kv, meta, decode: bool):
        t = x.shape[0]
        q, k, v = linears([self.q_proj, self.k_proj, self.v_proj], x)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        static = dict(scale=self.scale, sliding_window=self.window)
        if kv is None:
            o = cache_free_attention(q, k, v, meta, **static)
        else:
            kv = pa.write_kv(*kv, k, v, meta.slot_mapping)
            attend = pa.decode if decode else pa.prefill
            if kernel_backend.resolve(self.backend) != "xla":  # a kernel: split heads by hand
                attend = parallel.shard_heads(attend, self.num_heads, self.num_kv_heads)
            args = ((meta.block_tables, meta.context_lens) if decode else
                    (meta.seq_idx, meta.positions, meta.block_tables, meta.context_lens))
            o = attend(q, *kv, *args, backend=self.backend, **static)
            # a padding token (its slot out of range) gets 0, as its embedding does: its rows
            # stay 0 through every layer, and the CPU matmuls skip zero rows at the end
            slots = kv[0].shape[1] * kv[0].shape[2]
            o = jnp.where((meta.slot_mapping < slots)[:, None, None], o, 0)
        return self.o_proj(o.reshape(t, -1)), kv


# -- feed-forward ---------------------------------------------------------------------------------

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)).

    With int8 CPU activations the down projection takes int16 ones: act(gate) * up has the
    outliers that per-32 int8 rounding hurts most (the default model over a ~500-token passage,
    against transformers: +0.57% perplexity with every input in int8, +0.33% with this one in
    float32), and int16 is as close as float32 while its sums, like int8's, do not depend on the
    batch (the float32 kernel's do: int8 rounding downstream turned that into other tokens)."""

    def __init__(self, weights: Mapping, prefix: str, backend: str, act: str = "silu"):
        self.gate_proj = Linear(weights, f"{prefix}.gate_proj", backend)
        self.up_proj = Linear(weights, f"{prefix}.up_proj", backend)
        int8 = kernel_backend.activations_of(backend) == "int8"
        self.down_proj = Linear(weights, f"{prefix}.down_proj", backend,
                                activations="int16" if int8 else None)
        self.act = act

    def __call__(self, x):
        gate, up = linears([self.gate_proj, self.up_proj], x)
        return self.down_proj(ACTIVATIONS[self.act](gate) * up)


class Experts(Linear):
    """E matrices [E, out, in] (dense or packed) applied to rows grouped by expert."""

    def __call__(self, xs, group_sizes):
        """xs [N, in] sorted by expert, group_sizes [E] -> [N, out]."""
        if self.qtype is None:
            return moe.grouped_matmul(xs, self.weight[...], group_sizes).astype(xs.dtype)
        fields = self.fields()
        fn = moe.grouped_qmatmul
        if kernel_backend.resolve(self.backend) != "xla":  # a kernel: split by hand on a mesh
            fn = parallel.shard_grouped_qmatmul(fn, self.tp_dim)
        return fn(xs, fields, group_sizes, self.qtype, self.cols,
                  backend=self.backend).astype(xs.dtype)


class MoE(nnx.Module):
    """A router's softmax picks top_k experts per token (weights renormalized to sum 1 when
    `normalize`); each chosen expert is a gated MLP; outputs are summed with those weights.

    Rows are sorted by expert so each expert multiplies only its own tokens (a grouped matmul
    that reads only the chosen experts' weights where the backend can)."""

    def __init__(self, cfg, weights: Mapping, prefix: str, backend: str, act: str = "silu"):
        self.router = Linear(weights, f"{prefix}.router", backend)
        self.gate_proj = Experts(weights, f"{prefix}.experts.gate_proj", backend)
        self.up_proj = Experts(weights, f"{prefix}.experts.up_proj", backend)
        self.down_proj = Experts(weights, f"{prefix}.experts.down_proj", backend)
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.normalize, self.act = cfg.norm_topk_prob, act

    def route(self, x):
        """x [T, hidden] -> router logits [T, E] (float32), weights [T, k], experts [T, k]."""
        logits = self.router(x).astype(jnp.float32)
        weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.top_k)
        if self.normalize:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return logits, weights.astype(x.dtype), experts

    def __call__(self, x):
        t, k = x.shape[0], self.top_k
        _, weights, experts = self.route(x)
        flat = experts.reshape(-1)  # [T * k]
        order = jnp.argsort(flat, stable=True)
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        xs = x[order // k]  # [T * k, hidden], grouped by expert
        h = ACTIVATIONS[self.act](self.gate_proj(xs, group_sizes)) * self.up_proj(xs, group_sizes)
        ys = self.down_proj(h, group_sizes) * weights.reshape(-1)[order][:, None]
        y = jnp.zeros_like(ys).at[order].set(ys)  # back to token-major rows
        return y.reshape(t, k, -1).sum(axis=1)
