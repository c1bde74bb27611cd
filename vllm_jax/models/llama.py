"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as Flax NNX modules.

The modules are built around already-loaded weights: `weights` maps Hugging Face tensor names
(without the "model." prefix) to device arrays, or to a dict of packed GGUF block fields for a
quantized linear layer. Nothing is initialised twice and nothing is held on the host.

forward() works on a flat batch of tokens from many sequences (see AttnMetadata).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vllm_jax.config import ModelConfig
from vllm_jax import parallel
from vllm_jax.kernels import paged_attention as pa
from vllm_jax.kernels import quant


class PackedWeight(NamedTuple):
    """A GGUF-quantized [rows, cols] matrix as packed block fields (see kernels/quant.py)."""
    qtype: str
    cols: int
    fields: dict


class AttnMetadata(NamedTuple):
    positions: jax.Array  # [T]
    slot_mapping: jax.Array  # [T] cache slot per token; out of range for padding
    seq_idx: jax.Array  # [T] row of block_tables each token belongs to
    block_tables: jax.Array  # [S, max_pages]
    context_lens: jax.Array  # [S] tokens in the cache after this step (0 = padding row)


class Linear(nnx.Module):
    """y = x @ W.T (+ b), W in the Hugging Face [out, in] layout, dense or GGUF-quantized."""

    def __init__(self, weights: Mapping, name: str, cols: int | None = None):
        w = weights[name + ".weight"]
        if isinstance(w, PackedWeight):
            self.qtype, self.cols = w.qtype, w.cols
            self.weight = nnx.Dict({k: nnx.Param(v) for k, v in w.fields.items()})
            self.tp_dim = parallel.split_dim(next(iter(w.fields.values())))
        else:
            self.qtype, self.cols = None, w.shape[1]
            self.weight = nnx.Param(w)
        bias = weights.get(name + ".bias")
        self.bias = nnx.Param(bias) if bias is not None else None

    def fields(self) -> dict:
        return {k: v[...] for k, v in self.weight.items()}

    def __call__(self, x):
        if self.qtype is None:
            y = jax.lax.dot_general(x, self.weight[...], (((x.ndim - 1,), (1,)), ((), ())))
        else:
            matmul = quant.qmatmul
            if quant.default_backend() != "xla":  # a kernel call: split by hand over the mesh
                matmul = parallel.shard_qmatmul(matmul, self.tp_dim)
            y = matmul(x, self.fields(), self.qtype, self.cols).astype(x.dtype)
        return y if self.bias is None else y + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, weights: Mapping, name: str, dtype):
        self.linear = Linear(weights, name)
        self.dtype = dtype

    def __call__(self, ids):
        lin = self.linear
        if lin.qtype is None:
            return lin.weight[...][ids]
        rows = {k: v[ids] for k, v in lin.fields().items()}
        return quant.dequantize(rows, lin.qtype, lin.cols, self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, weights: Mapping, name: str, eps: float):
        self.weight = nnx.Param(weights[name + ".weight"])
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rotate(x, cos, sin):
    """Rotary embedding in the Hugging Face (rotate-half) convention. x: [T, heads, hd]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, weights: Mapping, prefix: str, backend: str = "auto"):
        self.cfg = cfg
        self.backend = backend  # see paged_attention.attention_backend
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, p, Linear(weights, f"{prefix}.{p}"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(weights, f"{prefix}.q_norm", cfg.rms_norm_eps)
            self.k_norm = RMSNorm(weights, f"{prefix}.k_norm", cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, kv, meta: AttnMetadata, decode: bool):
        cfg = self.cfg
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache, v_cache = pa.write_kv(*kv, k, v, meta.slot_mapping)
        scale = cfg.head_dim ** -0.5
        attend = pa.decode if decode else pa.prefill
        if pa.attention_backend(self.backend) != "xla":  # a kernel call: split by hand
            attend = parallel.shard_heads(attend, cfg)
        args = ((meta.block_tables, meta.context_lens) if decode else
                (meta.seq_idx, meta.positions, meta.block_tables, meta.context_lens))
        o = attend(q, k_cache, v_cache, *args, scale=scale, sliding_window=cfg.sliding_window,
                   backend=self.backend)
        return self.o_proj(o.reshape(t, -1)), (k_cache, v_cache)


class MLP(nnx.Module):
    def __init__(self, weights: Mapping, prefix: str):
        self.gate_proj = Linear(weights, f"{prefix}.gate_proj")
        self.up_proj = Linear(weights, f"{prefix}.up_proj")
        self.down_proj = Linear(weights, f"{prefix}.down_proj")

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, weights: Mapping, i: int, attention_backend: str = "auto"):
        p = f"layers.{i}"
        self.input_layernorm = RMSNorm(weights, f"{p}.input_layernorm", cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, weights, f"{p}.self_attn", attention_backend)
        self.post_attention_layernorm = RMSNorm(weights, f"{p}.post_attention_layernorm",
                                                cfg.rms_norm_eps)
        self.mlp = MLP(weights, f"{p}.mlp")

    def __call__(self, x, cos, sin, kv, meta, decode):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, meta, decode)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, weights: Mapping, dtype=jnp.float32,
                 attention_backend: str = "auto"):
        self.cfg = cfg
        self.embed_tokens = Embedding(weights, "embed_tokens", dtype)
        self.layers = nnx.List([DecoderLayer(cfg, weights, i, attention_backend)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(weights, "norm", cfg.rms_norm_eps)
        head = "embed_tokens" if "lm_head.weight" not in weights else "lm_head"
        self.lm_head = self.embed_tokens.linear if head == "embed_tokens" else Linear(weights, head)

    def __call__(self, tokens, kv_caches, meta: AttnMetadata, decode: bool):
        """tokens [T] -> final hidden states [T, hidden], updated caches."""
        with jax.named_scope("embed"):
            x = self.embed_tokens(tokens)
        inv_freq = jnp.asarray(self.cfg.inv_freq())
        freqs = meta.positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, hd]
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        new_caches = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer{i}"):
                x, kv = layer(x, cos, sin, kv_caches[i], meta, decode)
            new_caches.append(kv)
        return self.norm(x), new_caches

    def logits(self, hidden):
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).astype(jnp.float32)


def kv_cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple:
    return (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def kv_cache_bytes_per_page(cfg: ModelConfig, page_size: int, itemsize: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * itemsize
