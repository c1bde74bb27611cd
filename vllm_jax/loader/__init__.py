"""Model files -> (config, NNX model with its weights on the device, tokenizer).

The model class (models/ registry) declares its weights; the readers here fill them in from a
safetensors folder (optionally quantized in situ, loader/quantize.py) or a GGUF file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from vllm_jax import models, parallel
from vllm_jax.kernels.backend import Backends, matmul_of, resolve
from vllm_jax.loader import gguf
from vllm_jax.loader import safetensors as st
from vllm_jax.loader.host import host_dtype, progress, to_dtype
from vllm_jax.loader.quantize import load_quantized, parse_quant
from vllm_jax.models.base import ConfigError, ModelConfig
from vllm_jax.tokenizer import Tokenizer

__all__ = ["LoadedModel", "load", "to_dtype"]

log = logging.getLogger("vllm_jax")

@dataclass
class LoadedModel:
    config: ModelConfig
    model: nnx.Module
    tokenizer: object
    path: str
    weight_bytes: int


def _place_default(name: str, arr):
    return jax.device_put(arr)


def _keep_on_host(name: str, arr):
    return arr


def load(path: str, dtype: str = "auto", place: Callable = _place_default,
         mesh=None, quant: str | None = None, backend: str | Backends = "auto",
         keep_quantized: bool | None = None, max_model_len: int | None = None) -> LoadedModel:
    """With a mesh, weights stay on the host until the config is known, then each device
    receives only its shards (vllm_jax.parallel). keep_quantized: see EngineConfig.
    max_model_len: the longest sequence the model will run (LongRoPE picks its factors by it).
    backend: a kernels.backend name for every kernel, or Backends."""
    jdtype = to_dtype(dtype)
    keep_half = resolve(matmul_of(backend)) == "cpu"
    if mesh is not None:
        place = _keep_on_host
    p = Path(path)
    qtype = parse_quant(quant)
    if p.is_dir():
        cls, cfg, weights, tokenizer = _load_folder(path, jdtype, place, qtype, keep_half)
    elif p.suffix == ".gguf" and p.is_file():
        if qtype is not None:
            raise ConfigError(f"{path}: --quant quantizes safetensors folders; a GGUF file "
                              f"is already quantized")
        cls, cfg, weights, tokenizer = _load_gguf(path, jdtype, place, keep_half, keep_quantized)
    elif not p.exists():
        raise ConfigError(f"{path}: no such model file or folder")
    else:
        raise ConfigError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    specs = cls.weights(cfg)
    missing = [s.name for s in specs if s.name not in weights and not s.optional]
    if missing:
        raise ConfigError(f"{path}: missing weights: {', '.join(missing[:4])}"
                          + (" ..." if len(missing) > 4 else ""))
    if mesh is not None:
        cfg, weights = parallel.shard_model(weights, cfg, specs, mesh)
        parallel.log_device_bytes("weights", weights, mesh)
    model = cls(cfg, weights, jdtype, backend, max_model_len)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights) if hasattr(x, "nbytes"))
    log.info("weights: %.1f MiB on the device", nbytes / 2**20)
    return LoadedModel(cfg, model, tokenizer, str(path), nbytes)


def _load_folder(path, dtype, place, qtype, keep_half):
    cls, cfg = models.from_dir(path)
    specs = cls.weights(cfg)
    if qtype is not None:
        weights = load_quantized(path, specs, dtype, place, qtype, keep_half)
    else:
        weights = {}
        with progress(len(specs), f"loading {Path(path).name}") as bar:
            for spec, arr in st.read_weights(st.checkpoint_files(path), specs):
                held = host_dtype(spec, dtype, arr.dtype, keep_half)
                weights[spec.name] = place(spec.name, np.asarray(arr).astype(held))
                bar.update()
    return cls, cfg, weights, Tokenizer.from_dir(path)


def _load_gguf(path, dtype, place, keep_half, keep_quantized):
    meta = gguf.GGUFMeta(gguf.open_gguf(path), path)
    cls = models.for_gguf(meta)
    cfg = cls.config_from_gguf(meta)
    if keep_quantized is None:  # only XLA's path (Metal, or no C++ compiler) unpacks
        keep_quantized = keep_half or jax.default_backend() == "gpu"
    weights = gguf.read_weights(meta, cls.weights(cfg), dtype, place, keep_quantized, keep_half)
    return cls, cfg, weights, Tokenizer.from_gguf(meta.reader, path)
