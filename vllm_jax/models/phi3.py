"""Phi-3 (Phi3ForCausalLM, GGUF `phi3`): the Llama decoder with fused weights and LongRoPE.

Its checkpoints fuse q, k and v into one `qkv_proj` and gate and up into one `gate_up_proj`
(llama.cpp: `attn_qkv`, and `ffn_up` holding gate then up). The weights declare their row ranges
of those tensors, so the model itself is Llama's. LongRoPE: short factors up to the original
context, long ones past it (chosen once for the run by max_model_len, as llama.cpp does); GGUF
files keep the factors as rope_factors_short / rope_factors_long tensors.
"""
from __future__ import annotations


import numpy as np

from vllm_jax.models import base
from vllm_jax.models.base import ModelConfig, Rope, Weight
from vllm_jax.models.llama import (LlamaForCausalLM, embedding_weights, gguf_fields, gguf_keys,
                                   hf_fields)

FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig(arch="phi3", **hf_fields(hf), sliding_window=hf.get("sliding_window"))

    @classmethod
    def config_from_gguf(cls, meta) -> ModelConfig:
        fields = gguf_fields(meta)
        if FACTORS[0] in meta.tensors:
            rope = fields["rope"]
            old = int(meta.need("rope.scaling.original_context_length"))
            p = {"rope_type": "longrope", "original_max_position_embeddings": old,
                 "factor": fields["max_position_embeddings"] / old,
                 "short_factor": tuple(float(x) for x in meta.dense(FACTORS[0])),
                 "long_factor": tuple(float(x) for x in meta.dense(FACTORS[1]))}
            attn = meta.get("phi3.rope.scaling.attn_factor")
            if attn is not None:
                p["attention_factor"] = meta.float("phi3.rope.scaling.attn_factor", 1.0)
            fields["rope"] = Rope(rope.theta, rope.dim, base._frozen(p))
        window = meta.get("phi3.attention.sliding_window")
        return ModelConfig(arch="phi3", **fields, sliding_window=int(window) if window else None)

    @classmethod
    def gguf_metadata(cls, cfg: ModelConfig) -> tuple[str, dict, dict]:
        keys, tensors = gguf_keys(cfg), {}
        if cfg.sliding_window:
            keys["attention.sliding_window"] = cfg.sliding_window
        if cfg.rope.type == "longrope":
            p = cfg.rope.params
            keys["rope.scaling.original_context_length"] = int(
                p["original_max_position_embeddings"])
            keys["rope.scaling.attn_factor"] = float(cfg.rope.attention_factor())
            tensors = {name: np.asarray(p[key], np.float32)
                       for name, key in zip(FACTORS, ("short_factor", "long_factor"))}
        return "phi3", keys, tensors

    @classmethod
    def weights(cls, cfg: ModelConfig) -> list[Weight]:
        h, hd, n = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        out = embedding_weights(cfg)
        for i in range(cfg.num_layers):
            p, g, m = f"layers.{i}.", f"blk.{i}.", f"model.layers.{i}."

            def w(name, shape, axes, hf, gguf, rows=None, **kw):
                return Weight(p + name, shape, axes, m + hf, g + gguf, rows=rows, **kw)

            qkv = ("self_attn.qkv_proj.weight", "attn_qkv.weight")
            gate_up = ("mlp.gate_up_proj.weight", "ffn_up.weight")
            out += [
                w("input_layernorm.weight", (h,), ("embed",), "input_layernorm.weight",
                  "attn_norm.weight"),
                w("self_attn.q_proj.weight", (q, h), ("heads", "embed"), *qkv, (0, q),
                  quantize=True),
                w("self_attn.k_proj.weight", (kv, h), ("kv_heads", "embed"), *qkv, (q, q + kv),
                  quantize=True),
                w("self_attn.v_proj.weight", (kv, h), ("kv_heads", "embed"), *qkv,
                  (q + kv, q + 2 * kv), quantize=True),
                w("self_attn.o_proj.weight", (h, q), ("embed", "heads"),
                  "self_attn.o_proj.weight", "attn_output.weight", quantize=True),
                w("post_attention_layernorm.weight", (h,), ("embed",),
                  "post_attention_layernorm.weight", "ffn_norm.weight"),
                w("mlp.gate_proj.weight", (n, h), ("mlp", "embed"), *gate_up, (0, n),
                  quantize=True),
                w("mlp.up_proj.weight", (n, h), ("mlp", "embed"), *gate_up, (n, 2 * n),
                  quantize=True),
                w("mlp.down_proj.weight", (h, n), ("embed", "mlp"), "mlp.down_proj.weight",
                  "ffn_down.weight", quantize=True)]
        return out


