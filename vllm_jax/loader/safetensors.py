"""Hugging Face safetensors checkpoints (one file or sharded) -> the model's declared weights.

Each declared Weight (models/base.py) names its checkpoint tensor, or one tensor per expert
(stacked here into [experts, out, in]), or a row range of a fused tensor. Tensors are read one at
a time (memory-mapped) and a weight is yielded as soon as all its pieces are in.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from vllm_jax.models.base import ConfigError, Weight

log = logging.getLogger("vllm_jax")


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


def _tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for f in files:
        try:
            with safe_open(f, framework="np") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{f}: cannot read safetensors file ({e})") from None


def read_weights(files: list[Path], specs: list[Weight],
                 skip: set[str] = frozenset()) -> Iterator[tuple[Weight, np.ndarray]]:
    """(spec, host array) for every declared weight found (not in `skip`), in the checkpoint's
    own dtype (float32 where hf_offset applies)."""
    wanted: dict[str, list[tuple[Weight, int | None]]] = {}
    for spec in specs:
        sources = spec.hf if isinstance(spec.hf, tuple) else (spec.hf,)
        for e, src in enumerate(sources):
            entry = wanted.setdefault(src, [])
            if spec.name not in skip:
                entry.append((spec, e if isinstance(spec.hf, tuple) else None))
    stacks: dict[str, tuple[np.ndarray, set]] = {}
    ignored = []
    for name, arr in _tensors(files):
        if name not in wanted:
            ignored.append(name)
            continue
        for spec, e in wanted[name]:
            piece = arr[spec.rows[0]:spec.rows[1]] if spec.rows else arr
            if spec.hf_offset:
                piece = piece.astype(np.float32) + np.float32(spec.hf_offset)
            if e is None:
                yield spec, piece
                continue
            buf, seen = stacks.setdefault(spec.name, (np.empty(spec.shape, piece.dtype), set()))
            buf[e] = piece
            seen.add(e)
            if len(seen) == spec.shape[0]:
                del stacks[spec.name]
                yield spec, buf
    ignored = [n for n in ignored if "rotary_emb" not in n]
    if ignored:
        log.warning("ignoring %d checkpoint tensors the model does not use: %s", len(ignored),
                    ", ".join(ignored[:4]) + (" ..." if len(ignored) > 4 else ""))
