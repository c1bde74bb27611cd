"""The architectures: one module each, found here by Hugging Face `architectures` and by GGUF
`general.architecture`. Adding one = its module + one line below (see README, "Adding an
architecture").
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from vllm_jax.models.base import ConfigError

# module: class, HF architectures, GGUF architectures ("<arch>+moe": that arch with experts)
REGISTRY = {
    "llama": ("LlamaForCausalLM", ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                   "Qwen3ForCausalLM"), ("llama", "qwen2", "qwen3")),
    "mixtral": ("MixtralForCausalLM", ("MixtralForCausalLM",), ("llama+moe",)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", ("Qwen3MoeForCausalLM",), ("qwen3moe",)),
    "gemma3": ("Gemma3ForCausalLM", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
               ("gemma3",)),
    "phi3": ("Phi3ForCausalLM", ("Phi3ForCausalLM",), ("phi3",)),
}


def _class(module: str):
    return getattr(importlib.import_module(f"vllm_jax.models.{module}"), REGISTRY[module][0])


def supported_hf() -> list[str]:
    return [a for _, archs, _ in REGISTRY.values() for a in archs]


def supported_gguf() -> list[str]:
    return [a for _, _, archs in REGISTRY.values() for a in archs]


def for_hf(hf: dict):
    """The model class for a config.json."""
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    for module, (_, archs, _) in REGISTRY.items():
        if arch in archs:
            return _class(module)
    raise ConfigError(f"unsupported architecture {arch!r}; supported: {', '.join(supported_hf())}")


def for_gguf(meta):
    """The model class for a GGUF file (GGUFMeta)."""
    arch = meta.arch
    keys = ([f"{arch}+moe"] if meta.get(f"{arch}.expert_count") else []) + [arch]
    for key in keys:
        for module, (_, _, archs) in REGISTRY.items():
            if key in archs:
                return _class(module)
    raise ConfigError(f"{meta.path}: unsupported GGUF architecture {arch!r}; supported: "
                      f"{', '.join(a.replace('+moe', ' with experts') for a in supported_gguf())}")


def from_hf(hf: dict, where: str = "config.json"):
    """(model class, config) for a config.json's contents."""
    cls = for_hf(hf)
    try:
        return cls, cls.config_from_hf(hf)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: malformed config ({type(e).__name__}: {e})") from None


def from_dir(path: str | Path):
    """(model class, config) of a Hugging Face folder."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: malformed config ({e})") from None
    return from_hf(hf, str(file))
