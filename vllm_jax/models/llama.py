"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3): the decoder the other families extend.

Pre-norm decoder layers: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a gated SiLU MLP,
or a Mixture-of-Experts block in the layers a MoEConfig marks (Mixtral, Qwen3-MoE subclass this).
GGUF: llama.cpp's converter interleaves the q/k rows of `llama` files for its RoPE; the weights
declare it (gguf_permute) and the loader undoes it.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vllm_jax.models import base
from vllm_jax.models.base import ConfigError, ModelConfig, Weight
from vllm_jax.models.layer_once import call_layer
from vllm_jax.models.layers import (Attention, CacheFree, Embedding, GatedMLP, Linear, MoE,
                                    RMSNorm, rope_tables)

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
         "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def hf_fields(hf: dict) -> dict:
    """The config.json fields every family shares, as ModelConfig arguments."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope=base.rope_from_hf(hf, head_dim),
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def gguf_fields(meta) -> dict:
    """The GGUF metadata every family shares (llama.cpp's keys), as ModelConfig arguments."""
    arch = meta.arch
    hidden, heads = int(meta.need("embedding_length")), int(meta.need("attention.head_count"))
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ConfigError(f"{meta.path}: per-layer head counts are not supported")
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    return dict(vocab_size=meta.vocab_size("token_embd.weight"), hidden_size=hidden,
                intermediate_size=int(meta.need("feed_forward_length")),
                num_layers=int(meta.need("block_count")), num_heads=heads,
                num_kv_heads=int(kv_heads), head_dim=head_dim,
                rms_norm_eps=meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
                rope=base.gguf_rope(meta, arch, head_dim),
                max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
                tie_word_embeddings="output.weight" not in meta.tensors)


def gguf_keys(cfg: ModelConfig) -> dict:
    """The metadata of gguf_fields, for the GGUF writer (without the arch prefix)."""
    keys = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_layers, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
            "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
            "attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
            "rope.dimension_count": cfg.rope.dim, "rope.freq_base": cfg.rope.theta}
    kind, p = cfg.rope.type, cfg.rope.params
    if kind in ("linear", "yarn"):
        keys |= {"rope.scaling.type": kind, "rope.scaling.factor": float(p["factor"])}
    if kind == "yarn":
        keys["rope.scaling.original_context_length"] = int(p["original_max_position_embeddings"])
    return keys


class LlamaForCausalLM(nnx.Module):
    """embed -> decoder layers -> norm -> lm_head (tied to the embedding or not)."""

    def __init__(self, cfg: ModelConfig, weights: Mapping, dtype=jnp.float32,
                 backend: str = "auto", max_len: int | None = None):
        self.cfg = cfg
        self.max_len = max_len  # the longest sequence it will run (LongRoPE's choice)
        self.embed_tokens = Embedding(weights, "embed_tokens", dtype, backend,
                                      self.embed_scale(cfg))
        self.layers = nnx.List([self.decoder_layer(cfg, weights, i, backend)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(weights, "norm", cfg.rms_norm_eps, self.norm_upcast)
        tied = "lm_head.weight" not in weights
        self.lm_head = self.embed_tokens.linear if tied else Linear(weights, "lm_head", backend)

    norm_upcast = False

    @staticmethod
    def embed_scale(cfg) -> float | None:
        return None

    @staticmethod
    def decoder_layer(cfg, weights, i, backend):
        return DecoderLayer(cfg, weights, i, backend)

    def __call__(self, tokens, kv_caches=None, meta=None, decode: bool = False):
        """Paged: tokens [T] of many sequences, meta AttnMetadata, kv_caches [(K, V)] per layer
        -> final hidden states [T, hidden], updated caches. Cache-free (kv_caches None): tokens
        [B, L] whole sequences -> hidden states [B, L, hidden], None."""
        cache_free = kv_caches is None
        if cache_free:
            b, length = tokens.shape
            tokens, meta = tokens.reshape(-1), CacheFree.of(b, length)
        with jax.named_scope("embed"):
            x = self.embed_tokens(tokens)
        tables = {}  # one cos/sin pair per distinct rotary embedding
        new_caches = []
        for i, layer in enumerate(self.layers):
            rope = self.cfg.rope_for(i)
            if rope not in tables:
                tables[rope] = rope_tables(rope, meta.positions, self.max_len)
            with jax.named_scope(f"layer{i}"):
                if cache_free:  # called directly: nnx.capture sees inside (router tests)
                    x, kv = layer(x, *tables[rope], None, meta, decode)
                else:
                    x, kv = call_layer(layer, x, *tables[rope], kv_caches[i], meta, decode)
            new_caches.append(kv)
        x = self.norm(x)
        if cache_free:
            return x.reshape(b, length, -1), None
        return x, new_caches

    def logits(self, hidden):
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        return self.lm_head(hidden).astype(jnp.float32)

    # -- what the loader, writer and sharding read --------------------------------------------
    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        arch = ARCHS[(hf.get("architectures") or ["LlamaForCausalLM"])[0]]
        window = hf.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            window = None
        return ModelConfig(arch=arch, **hf_fields(hf), qk_norm=arch == "qwen3",
                           attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
                           sliding_window=window)

    @classmethod
    def config_from_gguf(cls, meta) -> ModelConfig:
        window = meta.get(f"{meta.arch}.attention.sliding_window")
        arch = "mistral" if meta.arch == "llama" and window else meta.arch
        cfg = ModelConfig(arch=arch, **gguf_fields(meta),
                          attention_bias="blk.0.attn_q.bias" in meta.tensors,
                          qk_norm="blk.0.attn_q_norm.weight" in meta.tensors,
                          sliding_window=int(window) if window else None)
        return base.with_rope_freqs(cfg, meta)

    @classmethod
    def gguf_metadata(cls, cfg: ModelConfig) -> tuple[str, dict, dict]:
        """(GGUF architecture, its metadata without the arch prefix, extra tensors)."""
        keys = gguf_keys(cfg)
        if cfg.sliding_window:
            keys["attention.sliding_window"] = cfg.sliding_window
        arch = "llama" if cfg.arch in ("llama", "mistral") else cfg.arch
        return arch, keys, base.rope_freqs_tensor(cfg)

    @classmethod
    def weights(cls, cfg: ModelConfig) -> list[Weight]:
        out = embedding_weights(cfg)
        for i in range(cfg.num_layers):
            out += layer_weights(cfg, i, permute=cfg.arch in ("llama", "mistral", "mixtral"))
            out += mlp_weights(cfg, i)
        return out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, weights: Mapping, i: int, backend: str = "auto"):
        p = f"layers.{i}"
        self.input_layernorm = RMSNorm(weights, f"{p}.input_layernorm", cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, weights, f"{p}.self_attn", backend,
                                   window=cfg.window(i), scale=cfg.attention_scale())
        self.post_attention_layernorm = RMSNorm(weights, f"{p}.post_attention_layernorm",
                                                cfg.rms_norm_eps)
        self.mlp = (MoE(cfg, weights, f"{p}.mlp", backend) if cfg.is_moe(i) else
                    GatedMLP(weights, f"{p}.mlp", backend))

    def __call__(self, x, cos, sin, kv, meta, decode):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, meta, decode)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


# -- weight declarations the families share -------------------------------------------------------

def embedding_weights(cfg: ModelConfig, prefix: str = "model.", **norm) -> list[Weight]:
    """Embedding, final norm, lm_head. The embedding is a --quant target only when tied (an
    untied one is only gathered: quantizing it costs accuracy and speeds up no matmul)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    out = [Weight("embed_tokens.weight", (v, h), ("vocab", "embed"), prefix + "embed_tokens.weight",
                  "token_embd.weight", quantize=cfg.tie_word_embeddings),
           Weight("norm.weight", (h,), ("embed",), prefix + "norm.weight", "output_norm.weight",
                  **norm)]
    if not cfg.tie_word_embeddings:
        out.append(Weight("lm_head.weight", (v, h), ("vocab", "embed"), "lm_head.weight",
                          "output.weight", quantize=True))
    return out


def layer_weights(cfg: ModelConfig, i: int, prefix: str = "model.", permute: bool = False,
                  post_norm: str = "post_attention_layernorm", **norm) -> list[Weight]:
    """Attention and its norms (input_layernorm, `post_norm`) of layer i."""
    p, g, h, hd = f"layers.{i}.", f"blk.{i}.", cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd

    def w(name, shape, axes, gguf, **kw):
        return Weight(p + name, shape, axes, prefix + p + name, g + gguf, **kw)

    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": 0}
    out = [w("input_layernorm.weight", (h,), ("embed",), "attn_norm.weight", **norm),
           w(f"{post_norm}.weight", (h,), ("embed",), "ffn_norm.weight", **norm)]
    for x, rows, axis in (("q", q, "heads"), ("k", kv, "kv_heads"), ("v", kv, "kv_heads")):
        perm = heads[x] if permute else 0
        out.append(w(f"self_attn.{x}_proj.weight", (rows, h), (axis, "embed"), f"attn_{x}.weight",
                     quantize=True, gguf_permute=perm))
        if cfg.attention_bias:
            out.append(w(f"self_attn.{x}_proj.bias", (rows,), (axis,), f"attn_{x}.bias",
                         gguf_permute=perm))
    out.append(w("self_attn.o_proj.weight", (h, q), ("embed", "heads"), "attn_output.weight",
                 quantize=True))
    if cfg.qk_norm:
        out += [w(f"self_attn.{x}_norm.weight", (hd,), (None,), f"attn_{x}_norm.weight", **norm)
                for x in "qk"]
    return out


QWEN_EXPERTS = {"router": "mlp.gate", "gate": "mlp.experts.{e}.gate_proj",
                "up": "mlp.experts.{e}.up_proj", "down": "mlp.experts.{e}.down_proj"}


def mlp_weights(cfg: ModelConfig, i: int, prefix: str = "model.",
                experts: dict = QWEN_EXPERTS) -> list[Weight]:
    """Layer i's gated MLP, or its router and experts when cfg.is_moe(i). experts: the
    checkpoint names (after "layers.{i}.") of the router and of expert e's gate, up, down."""
    p, g, h = f"layers.{i}.mlp.", f"blk.{i}.", cfg.hidden_size
    if not cfg.is_moe(i):
        n = cfg.intermediate_size
        return [Weight(f"{p}{x}_proj.weight", shape, axes, f"{prefix}{p}{x}_proj.weight",
                       f"{g}ffn_{x}.weight", quantize=True)
                for x, shape, axes in (("gate", (n, h), ("mlp", "embed")),
                                       ("up", (n, h), ("mlp", "embed")),
                                       ("down", (h, n), ("embed", "mlp")))]
    e, n = cfg.num_experts, cfg.moe_intermediate_size
    hf = f"{prefix}layers.{i}."
    out = [Weight(f"{p}router.weight", (e, h), (None, "embed"), f"{hf}{experts['router']}.weight",
                  f"{g}ffn_gate_inp.weight")]
    for x, shape, axes in (("gate", (e, n, h), ("experts", "expert_mlp", "embed")),
                           ("up", (e, n, h), ("experts", "expert_mlp", "embed")),
                           ("down", (e, h, n), ("experts", "embed", "expert_mlp"))):
        names = tuple(f"{hf}{experts[x].format(e=j)}.weight" for j in range(e))
        out.append(Weight(f"{p}experts.{x}_proj.weight", shape, axes, names,
                          f"{g}ffn_{x}_exps.weight", quantize=True))
    return out
