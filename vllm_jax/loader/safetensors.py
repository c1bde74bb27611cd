"""Hugging Face safetensors checkpoints (one file or sharded) -> {name: host array} stream."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from vllm_jax.config import ConfigError


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no .safetensors weights found")
    return files


def tensor_names(files: list[Path]) -> list[tuple[Path, str]]:
    out = []
    for f in files:
        try:
            with safe_open(f, framework="np") as st:
                out += [(f, n) for n in st.keys()]
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{f}: cannot read safetensors file ({e})") from None
    return out


def canonical_name(name: str) -> str | None:
    """HF checkpoint name -> the model's weight name; None for tensors the model does not use."""
    if name.startswith("model."):
        name = name[len("model."):]
    if "rotary_emb" in name:
        return None
    return name


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (canonical name, array) one tensor at a time (memory-mapped, never all at once)."""
    for f in files:
        try:
            with safe_open(f, framework="np") as st:
                for name in st.keys():
                    canon = canonical_name(name)
                    if canon is not None:
                        yield canon, st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{f}: cannot read safetensors file ({e})") from None
