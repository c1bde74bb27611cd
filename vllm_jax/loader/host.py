"""What the weight readers share: dtype names, the dtype a weight is held in, a progress bar."""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from vllm_jax.models.base import ConfigError, Weight

DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f16": jnp.float16,
          "float16": jnp.float16, "fp16": jnp.float16, "f32": jnp.float32,
          "float32": jnp.float32, "fp32": jnp.float32}


def to_dtype(name: str):
    """"auto": float32 on the CPU (bf16 there is slow and costs small models accuracy), else bf16."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; choose from bf16, f16, f32")
    return DTYPES[name]


HALF = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


def host_dtype(spec: Weight, dtype, source=None, keep_half: bool = False) -> np.dtype:
    """The dtype a dense weight is held in: the one the weight asks for, else its own when it
    is a 16-bit matrix and keep_half (the C++ kernel multiplies 16-bit weights by float32
    activations: half the memory and reads, exact products), else the model's."""
    if spec.dtype == "f32":
        return np.dtype(np.float32)
    if keep_half and source is not None and np.dtype(source) in HALF and len(spec.shape) == 2:
        return np.dtype(source)
    return np.dtype(dtype)


def progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())
