"""Gemma 3 (text): Gemma3ForCausalLM, the language model of Gemma3ForConditionalGeneration
checkpoints, and GGUF `gemma3`.

Differences from Llama: embeddings scaled by sqrt(hidden); RMSNorm as x * (1 + w) computed in
float32 (the weights are held as 1 + w, the way llama.cpp stores them); norms after attention and
after the MLP as well as before; q/k norms; a GELU-tanh gated MLP; queries scaled by
query_pre_attn_scalar ** -0.5; interleaved sliding-window and global layers (`layer_types`),
each type with its own rotary base (10k local, 1M global) and the scaling on the global ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import jax
from flax import nnx

from vllm_jax.models import base
from vllm_jax.models.base import FULL, SLIDING, ModelConfig, Rope, Weight
from vllm_jax.models.layers import Attention, GatedMLP, RMSNorm, activation
from vllm_jax.models.llama import (LlamaForCausalLM, embedding_weights, gguf_fields, gguf_keys,
                                   hf_fields, layer_weights, mlp_weights)

LOCAL_THETA = 10000.0  # the sliding layers' rotary base (llama.cpp hard-codes it too)
SLIDING_PATTERN = 6  # every 6th layer is global when the file does not list layer types


@dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    query_pre_attn_scalar: float = 256.0
    local_rope: Rope = Rope()
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    hf_prefix: str = "model."  # "language_model.model." in Gemma3ForConditionalGeneration files

    def rope_for(self, i: int) -> Rope:
        return self.local_rope if self.layer_type(i) == SLIDING else self.rope

    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5


def _pattern(num_layers: int) -> tuple:
    return tuple(FULL if (i + 1) % SLIDING_PATTERN == 0 else SLIDING for i in range(num_layers))


class Gemma3ForCausalLM(LlamaForCausalLM):
    norm_upcast = True

    def __init__(self, cfg: Gemma3Config, weights: Mapping, *args, **kwargs):
        super().__init__(cfg, weights, *args, **kwargs)
        self.softcap = cfg.final_logit_softcapping

    @staticmethod
    def embed_scale(cfg) -> float:
        return cfg.hidden_size ** 0.5

    @staticmethod
    def decoder_layer(cfg, weights, i, backend):
        return Gemma3DecoderLayer(cfg, weights, i, backend)

    def logits(self, hidden):
        logits = super().logits(hidden)
        if self.softcap:
            logits = jax.numpy.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def config_from_hf(cls, hf: dict) -> Gemma3Config:
        text = hf.get("text_config", hf)  # Gemma3ForConditionalGeneration nests the text model
        text = {"tie_word_embeddings": True, **text}
        if text.get("attn_logit_softcapping"):
            raise base.ConfigError("attention logit soft-capping (Gemma 2) is not supported")
        fields = hf_fields(text)
        params = text.get("rope_parameters") or {}
        if FULL in params:  # transformers 5: one entry per layer type
            rope = base.rope_from_hf(text, fields["head_dim"], params[FULL])
            local = base.rope_from_hf(text, fields["head_dim"], params[SLIDING])
        else:
            rope = base.rope_from_hf(text, fields["head_dim"])
            local = Rope(float(text.get("rope_local_base_freq", LOCAL_THETA)), fields["head_dim"])
        fields["rope"] = rope
        activation(text.get("hidden_activation") or "gelu_pytorch_tanh")
        return Gemma3Config(
            arch="gemma3", **fields, qk_norm=True,
            attention_bias=bool(text.get("attention_bias", False)),
            sliding_window=text.get("sliding_window"),
            layer_types=tuple(text.get("layer_types") or _pattern(fields["num_layers"])),
            query_pre_attn_scalar=float(text.get("query_pre_attn_scalar", 256)), local_rope=local,
            hidden_activation=text.get("hidden_activation") or "gelu_pytorch_tanh",
            final_logit_softcapping=text.get("final_logit_softcapping"),
            hf_prefix="language_model.model." if "text_config" in hf else "model.")

    @classmethod
    def config_from_gguf(cls, meta) -> Gemma3Config:
        fields = gguf_fields(meta)
        window = meta.get("gemma3.attention.sliding_window")
        hd = fields["head_dim"]
        return Gemma3Config(
            arch="gemma3", **fields, qk_norm=True, sliding_window=int(window) if window else None,
            layer_types=_pattern(fields["num_layers"]) if window else (),
            query_pre_attn_scalar=float(hd), local_rope=Rope(LOCAL_THETA, hd))

    @classmethod
    def gguf_metadata(cls, cfg: Gemma3Config) -> tuple[str, dict, dict]:
        if cfg.layer_types and cfg.layer_types != _pattern(cfg.num_layers):
            raise base.ConfigError("llama.cpp's gemma3 expects every 6th layer global; this "
                                   "model's layer_types differ")
        if cfg.query_pre_attn_scalar != cfg.head_dim or cfg.local_rope.theta != LOCAL_THETA:
            raise base.ConfigError("llama.cpp's gemma3 fixes query_pre_attn_scalar = head_dim "
                                   f"and a local rotary base of {LOCAL_THETA:g}")
        keys = gguf_keys(cfg)
        if cfg.sliding_window:
            keys["attention.sliding_window"] = cfg.sliding_window
        return "gemma3", keys, {}

    @classmethod
    def weights(cls, cfg: Gemma3Config) -> list[Weight]:
        prefix = cfg.hf_prefix
        norm = dict(hf_offset=1.0, dtype="f32")  # held as 1 + w, in float32
        out = embedding_weights(cfg, prefix, **norm)
        for i in range(cfg.num_layers):
            out += layer_weights(cfg, i, prefix, post_norm="pre_feedforward_layernorm", **norm)
            p, g = f"layers.{i}.", f"blk.{i}."
            out += [Weight(p + name, (cfg.hidden_size,), ("embed",), prefix + p + name, g + gguf,
                           **norm)
                    for name, gguf in (("post_attention_layernorm.weight",
                                        "post_attention_norm.weight"),
                                       ("post_feedforward_layernorm.weight",
                                        "post_ffw_norm.weight"))]
            out += mlp_weights(cfg, i, prefix)
        return out


class Gemma3DecoderLayer(nnx.Module):
    """x + post_norm(attn(norm(x))), then x + post_norm(mlp(pre_norm(x)))."""

    def __init__(self, cfg: Gemma3Config, weights: Mapping, i: int, backend: str = "auto"):
        p, eps = f"layers.{i}", cfg.rms_norm_eps

        def norm(name):
            return RMSNorm(weights, f"{p}.{name}", eps, upcast=True)

        self.input_layernorm = norm("input_layernorm")
        self.self_attn = Attention(cfg, weights, f"{p}.self_attn", backend, window=cfg.window(i),
                                   scale=cfg.attention_scale(), norm_upcast=True)
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.mlp = GatedMLP(weights, f"{p}.mlp", backend, cfg.hidden_activation)
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def __call__(self, x, cos, sin, kv, meta, decode):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, meta, decode)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h), kv
