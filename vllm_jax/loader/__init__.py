"""Model files -> (config, NNX model with its weights on the device, tokenizer)."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vllm_jax.config import ConfigError, ModelConfig
from vllm_jax.loader import safetensors as st
from vllm_jax.models.llama import LlamaForCausalLM

log = logging.getLogger("vllm_jax")

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f16": jnp.float16,
          "float16": jnp.float16, "fp16": jnp.float16, "f32": jnp.float32,
          "float32": jnp.float32, "fp32": jnp.float32}


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: object
    path: str
    weight_bytes: int


def to_dtype(name: str):
    """"auto": float32 on the CPU (bf16 there is slow and costs small models accuracy), else bf16."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; choose from bf16, f16, f32")
    return DTYPES[name]


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


def _place_default(name: str, arr):
    return jax.device_put(arr)


def _keep_on_host(name: str, arr):
    return arr


def load_safetensors(path: str, dtype, place: Callable = _place_default):
    from vllm_jax.tokenizer import Tokenizer

    cfg = ModelConfig.from_dir(path)
    files = st.checkpoint_files(path)
    names = st.tensor_names(files)
    np_dtype = np.dtype(dtype)
    weights = {}
    with progress(len(names), f"loading {Path(path).name}") as bar:
        for name, arr in st.iter_tensors(files):
            weights[name] = place(name, np.asarray(arr).astype(np_dtype))
            bar.update()
    tokenizer = Tokenizer.from_dir(path)
    return cfg, weights, tokenizer


def load(path: str, dtype: str = "auto", place: Callable = _place_default,
         mesh=None, quant: str | None = None, attention_backend: str = "auto",
         keep_quantized: bool | None = None) -> LoadedModel:
    """With a mesh, weights stay on the host until the config is known, then each device
    receives only its shards (vllm_jax.parallel). keep_quantized: see EngineConfig."""
    jdtype = to_dtype(dtype)
    if mesh is not None:
        place = _keep_on_host
    p = Path(path)
    # GGUF issue: quant= quantizes a safetensors folder in situ (loader/quantize.py)
    from vllm_jax.loader.quantize import load_quantized, parse_quant
    qtype = parse_quant(quant)
    if p.is_dir() and qtype is not None:
        cfg, weights, tokenizer = load_quantized(path, jdtype, place, qtype)
    elif p.is_dir():
        cfg, weights, tokenizer = load_safetensors(path, jdtype, place)
    elif p.suffix == ".gguf" and p.is_file():
        if qtype is not None:
            raise ConfigError(f"{path}: --quant quantizes safetensors folders; a GGUF file "
                              f"is already quantized")
        from vllm_jax.loader.gguf import load_gguf
        if keep_quantized is None:  # only XLA's path (Metal, or no C++ compiler) unpacks
            from vllm_jax.kernels.quant import default_backend
            keep_quantized = default_backend() != "xla"
        cfg, weights, tokenizer = load_gguf(path, jdtype, place, keep_quantized)
    elif not p.exists():
        raise ConfigError(f"{path}: no such model file or folder")
    else:
        raise ConfigError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    missing = _missing(cfg, weights)
    if missing:
        raise ConfigError(f"{path}: missing weights: {', '.join(missing[:4])}"
                          + (" ..." if len(missing) > 4 else ""))
    if mesh is not None:
        from vllm_jax import parallel
        cfg, weights = parallel.shard_model(weights, cfg, mesh)
        parallel.log_device_bytes("weights", weights, mesh)
    model = LlamaForCausalLM(cfg, weights, jdtype, attention_backend)
    # GGUF issue: skip a PackedWeight's qtype/cols leaves
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights) if hasattr(x, "nbytes"))
    log.info("weights: %.1f MiB on the device", nbytes / 2**20)
    return LoadedModel(cfg, model, tokenizer, str(path), nbytes)


def _missing(cfg: ModelConfig, weights) -> list[str]:
    need = ["embed_tokens.weight", "norm.weight"]
    if not cfg.tie_word_embeddings:
        need.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        need += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        need += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return [n for n in need if n not in weights]
