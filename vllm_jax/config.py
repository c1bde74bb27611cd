"""Model and engine configuration: plain, hashable data."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ConfigError(ValueError):
    """A user-facing problem with a model folder or file (one line, no traceback)."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) pairs of the llama3 scaling, () for none
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = ARCHITECTURES.get(archs[0])
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs[0]!r}; supported: {', '.join(ARCHITECTURES)}")
        num_heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or rope
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"unsupported rope scaling {rope_type!r}; supported: default, llama3")
        llama3 = ()
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            llama3 = tuple((k, float(scaling[k])) for k in keys)
        window = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=llama3,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            sliding_window=window,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{path}: no config.json (not a Hugging Face model folder)")
        try:
            return cls.from_hf(json.loads(file.read_text()))
        except (KeyError, json.JSONDecodeError) as e:
            raise ConfigError(f"{file}: malformed config ({e})") from None

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2], computed as transformers does (float32)."""
        dim = self.head_dim
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv = (1.0 / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
        if not self.rope_scaling:
            return inv
        s = dict(self.rope_scaling)
        factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                  s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclass
class EngineConfig:
    model_path: str | None = None  # None = the built-in default model
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None = min(model's context, 4096)
    max_num_batched_tokens: int = 512
    kvcache_mem_mb: float = 4096
    page_size: int = 16
    quant: str | None = None
    dtype: str = "auto"  # auto = f32 on the CPU, bf16 on accelerators
    kv_cache_dtype: str = "auto"  # auto = dtype; f16/bf16 halve a float32 cache (llama.cpp: f16)
    device_ids: list[int] | None = None  # global ids of the "tp" mesh; None = one device
    tensor_parallel_size: int | None = None  # the first N devices when no ids are given
    coordinator_address: str | None = None  # multi-host: host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | xla | cpu | pallas
    # GGUF weights: None = packed where a fused kernel multiplies them (Pallas on GPUs, the C++
    # kernel on the CPU), unpacked to dtype at load where only XLA's path runs (it cannot fuse
    # the unpacking into the matmul: 5x slower than dense there)
    keep_quantized: bool | None = None
    extra: dict = field(default_factory=dict)
