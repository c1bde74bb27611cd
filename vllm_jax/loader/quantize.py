"""In-situ quantization of safetensors checkpoints to GGUF block formats, cached on disk.

The weights the model declares as matmul weights (Weight.quantize: q/k/v/o, gate/up/down,
experts, lm_head, a tied embedding) are quantized. A weight whose in_features is not a multiple
of the type's block falls back to Q8_0 (32-element blocks), then to staying dense.

The result is cached with orbax under <cache_dir>/quant/<key>, the key hashing the source files
(paths, sizes, mtimes) and the type, so the next start skips the quantization.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from vllm_jax import models
from vllm_jax.kernels import quant
from vllm_jax.kernels.quant import PackedWeight
from vllm_jax.loader import safetensors as st
from vllm_jax.loader.default_model import cache_dir
from vllm_jax.loader.gguf_writer import save_gguf
from vllm_jax.loader.host import host_dtype, progress
from vllm_jax.models.base import ConfigError, ModelConfig, Weight

log = logging.getLogger("vllm_jax")

CACHE_VERSION = 2  # 2: weights named by the model's declarations
FALLBACK = "q8_0"
ALIASES = {
    "q4_0": "q4_0", "q40": "q4_0",
    "q4_1": "q4_1", "q41": "q4_1", "q4": "q4_1",
    "q5_0": "q5_0", "q50": "q5_0",
    "q5_1": "q5_1", "q51": "q5_1", "q5": "q5_1",
    "q8_0": "q8_0", "q80": "q8_0", "q8": "q8_0",
    "q2_k": "q2_k", "q2k": "q2_k",
    "q3_k": "q3_k", "q3k": "q3_k",
    "q4_k": "q4_k", "q4k": "q4_k",
    "q5_k": "q5_k", "q5k": "q5_k",
    "q6_k": "q6_k", "q6k": "q6_k",
}


def parse_quant(name: str | None) -> str | None:
    """A --quant value (any case, with or without the underscore) -> a quant.QTYPES key."""
    if name is None:
        return None
    qtype = ALIASES.get(name.strip().lower())
    if qtype is None:
        names = {}
        for alias, q in ALIASES.items():
            names.setdefault(q, []).append(alias)
        listing = ", ".join("/".join(a) for a in names.values())
        raise ConfigError(f"unknown quantization type {name!r}; choose from {listing}")
    return qtype


def pick_qtype(shape: tuple, qtype: str) -> str | None:
    """qtype if its blocks tile the rows, else the Q8_0 fallback, else None (stay dense)."""
    if len(shape) < 2:
        return None
    for q in (qtype, FALLBACK):
        if quant.can_quantize(shape, q):
            return q
    return None


# ---------------------------------------------------------------------------------------------
# host weights: {name: QuantTensor | numpy array}


def host_weights(path, qtype: str | None) -> tuple[type, ModelConfig, dict]:
    """A safetensors folder -> (model class, config, {weight name: quant.QuantTensor or numpy
    array}), quantizing the declared matmul weights to `qtype` (None: everything dense) or
    restoring them from the cache."""
    cls, cfg = models.from_dir(path)
    specs = cls.weights(cfg)
    files = st.checkpoint_files(path)
    if qtype is None:
        return cls, cfg, {s.name: x for s, x in st.read_weights(files, specs)}
    folder = cache_dir() / "quant" / cache_key(path, files, qtype)
    cached = restore(folder)
    if cached is not None:
        log.info("loaded quantized weights from cache %s", folder)
        rest = st.read_weights(files, specs, skip=set(cached))
        return cls, cfg, {**cached, **{s.name: x for s, x in rest}}
    out, fallbacks = {}, {}
    with progress(len(specs), f"quantizing to {qtype}") as bar:
        for spec, arr in st.read_weights(files, specs):
            q = pick_qtype(arr.shape, qtype) if spec.quantize else None
            if spec.quantize and q != qtype:
                fallbacks[spec.name] = q
            out[spec.name] = arr if q is None else quant.quantize(np.asarray(arr, np.float32), q)
            bar.update()
    if fallbacks:
        n8 = sum(q is not None for q in fallbacks.values())
        log.warning("%s needs in_features %% %d == 0: %d weights fall back to %s, %d stay dense "
                    "(e.g. %s)", qtype, quant.QTYPES[qtype][0], n8, FALLBACK,
                    len(fallbacks) - n8, next(iter(fallbacks)))
    save(folder, {n: x for n, x in out.items() if isinstance(x, quant.QuantTensor)})
    return cls, cfg, out


def to_device(weights_host: dict, specs: list[Weight], dtype, place: Callable,
              keep_half: bool = False) -> dict:
    by_name = {s.name: s for s in specs}
    out = {}
    for name, x in weights_host.items():
        if isinstance(x, quant.QuantTensor):
            fields = quant.repack(x)
            out[name] = PackedWeight(x.qtype, x.shape[-1],
                                     {k: place(f"{name}.{k}", v) for k, v in fields.items()})
        else:
            held = host_dtype(by_name[name], dtype, np.asarray(x).dtype, keep_half)
            out[name] = place(name, np.asarray(x).astype(held))
    return out


def load_quantized(path: str, specs: list[Weight], dtype, place: Callable, qtype: str,
                   keep_half: bool = False) -> dict:
    """load()'s path for `quant=`: the device weights."""
    _, _, host = host_weights(path, qtype)
    counts = {}
    for x in host.values():
        if isinstance(x, quant.QuantTensor):
            counts[x.qtype] = counts.get(x.qtype, 0) + 1
    log.info("quantized weights: %s", ", ".join(f"{n} {q}" for q, n in counts.items()))
    return to_device(host, specs, dtype, place, keep_half)


# ---------------------------------------------------------------------------------------------
# the orbax cache


def cache_key(path, files: list[Path], qtype: str) -> str:
    sources = sorted({Path(f).resolve() for f in files} | {(Path(path) / "config.json").resolve()})
    stats = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sources]
    text = json.dumps({"version": CACHE_VERSION, "qtype": qtype, "files": stats})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every step of a save at INFO through absl; keep the engine's log readable."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def save(folder: Path, tensors: dict[str, quant.QuantTensor]) -> None:
    """Arrays through orbax, then meta.json last: a folder without it is an unfinished save."""
    import orbax.checkpoint as ocp

    keys = {name: f"t{i:05d}" for i, name in enumerate(sorted(tensors))}
    meta = {"version": CACHE_VERSION,
            "tensors": {n: {"key": keys[n], "qtype": t.qtype, "shape": list(t.shape)}
                        for n, t in tensors.items()}}
    try:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with _quiet_orbax():
            ocp.PyTreeCheckpointer().save((folder / "arrays").resolve(),
                                          {keys[n]: t.raw for n, t in tensors.items()})
        (folder / "meta.json").write_text(json.dumps(meta))
        log.info("cached quantized weights in %s", folder)
    except (OSError, ValueError) as e:
        log.warning("could not cache the quantized weights in %s: %s", folder, e)


def restore(folder: Path) -> dict[str, quant.QuantTensor] | None:
    import orbax.checkpoint as ocp

    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        with _quiet_orbax():
            arrays = ocp.PyTreeCheckpointer().restore((folder / "arrays").resolve())
        return {n: quant.QuantTensor(m["qtype"], tuple(m["shape"]), np.asarray(arrays[m["key"]]))
                for n, m in meta["tensors"].items()}
    except Exception as e:  # a damaged cache is only a slower start: quantize again
        log.warning("ignoring the unreadable quantization cache %s: %s", folder, e)
        return None


# ---------------------------------------------------------------------------------------------
# --save-gguf


def save_engine_gguf(engine, path_out) -> None:
    """Writes the model an engine runs (its --w folder, quantized as --quant says) as GGUF."""
    src = Path(engine.loaded.path)
    if not src.is_dir():
        raise ConfigError(f"--save-gguf converts a Hugging Face model folder; {src} is not one")
    cls, cfg, host = host_weights(src, parse_quant(engine.config.quant))
    save_gguf(path_out, cls, cfg, host, src)
