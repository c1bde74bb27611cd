"""Mixtral: Mistral with a Mixture of Experts in every layer (8 experts, top 2, weights
renormalized). GGUF: llama.cpp's `llama` architecture with `expert_count`."""
from __future__ import annotations

from vllm_jax.models import base
from vllm_jax.models.base import MoEConfig, Weight
from vllm_jax.models.llama import (LlamaForCausalLM, embedding_weights, gguf_fields, hf_fields,
                                   layer_weights, mlp_weights)

EXPERTS = {"router": "block_sparse_moe.gate", "gate": "block_sparse_moe.experts.{e}.w1",
           "up": "block_sparse_moe.experts.{e}.w3", "down": "block_sparse_moe.experts.{e}.w2"}


class MixtralForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf: dict) -> MoEConfig:
        return MoEConfig(arch="mixtral", **hf_fields(hf), sliding_window=hf.get("sliding_window"),
                         num_experts=hf["num_local_experts"],
                         num_experts_per_tok=hf["num_experts_per_tok"],
                         moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)

    @classmethod
    def config_from_gguf(cls, meta) -> MoEConfig:
        fields = gguf_fields(meta)
        window = meta.get("llama.attention.sliding_window")
        cfg = MoEConfig(arch="mixtral", **fields, sliding_window=int(window) if window else None,
                        num_experts=int(meta.need("expert_count")),
                        num_experts_per_tok=int(meta.need("expert_used_count")),
                        moe_intermediate_size=fields["intermediate_size"], norm_topk_prob=True)
        return base.with_rope_freqs(cfg, meta)

    @classmethod
    def gguf_metadata(cls, cfg: MoEConfig) -> tuple[str, dict, dict]:
        _, keys, tensors = super().gguf_metadata(cfg)
        keys |= {"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_per_tok}
        return "llama", keys, tensors

    @classmethod
    def weights(cls, cfg: MoEConfig) -> list[Weight]:
        out = embedding_weights(cfg)
        for i in range(cfg.num_layers):
            out += layer_weights(cfg, i, permute=True) + mlp_weights(cfg, i, experts=EXPERTS)
        return out
