"""Qwen3-MoE (Qwen3-30B-A3B, ...): Qwen3's attention (q/k RMSNorm) with a Mixture of Experts
in the layers not listed in `mlp_only_layers` (every `decoder_sparse_step`-th layer)."""
from __future__ import annotations

from vllm_jax.models.base import MoEConfig, Weight
from vllm_jax.models.llama import (LlamaForCausalLM, embedding_weights, gguf_fields, gguf_keys,
                                   hf_fields, layer_weights, mlp_weights)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf: dict) -> MoEConfig:
        n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1) or 1
        only = set(hf.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(n) if i in only or (i + 1) % step)
        return MoEConfig(arch="qwen3_moe", **hf_fields(hf), qk_norm=True,
                         attention_bias=bool(hf.get("attention_bias", False)),
                         num_experts=hf.get("num_experts") or hf["num_local_experts"],
                         num_experts_per_tok=hf["num_experts_per_tok"],
                         moe_intermediate_size=hf["moe_intermediate_size"],
                         norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                         dense_layers=dense)

    @classmethod
    def config_from_gguf(cls, meta) -> MoEConfig:
        blocks = int(meta.need("block_count"))
        dense = tuple(i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" not in meta.tensors)
        return MoEConfig(arch="qwen3_moe", **gguf_fields(meta), qk_norm=True,
                         attention_bias="blk.0.attn_q.bias" in meta.tensors,
                         num_experts=int(meta.need("expert_count")),
                         num_experts_per_tok=int(meta.need("expert_used_count")),
                         moe_intermediate_size=int(meta.need("expert_feed_forward_length")),
                         norm_topk_prob=bool(meta.get("qwen3moe.expert_weights_norm", True)),
                         dense_layers=dense)

    @classmethod
    def gguf_metadata(cls, cfg: MoEConfig) -> tuple[str, dict, dict]:
        keys = gguf_keys(cfg) | {
            "expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok,
            "expert_feed_forward_length": cfg.moe_intermediate_size,
            "expert_weights_norm": cfg.norm_topk_prob}
        return "qwen3moe", keys, {}

    @classmethod
    def weights(cls, cfg: MoEConfig) -> list[Weight]:
        out = embedding_weights(cfg)
        for i in range(cfg.num_layers):
            out += layer_weights(cfg, i) + mlp_weights(cfg, i)
        return out
