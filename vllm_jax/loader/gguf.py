"""GGUF files (llama.cpp) -> (ModelConfig, weights, tokenizer); quantized tensors stay packed.

GGUF names and layouts differ from Hugging Face's in three ways handled here: tensor names
(`blk.0.attn_q` = `layers.0.self_attn.q_proj`), metadata keys instead of config.json, and, for
the `llama` architecture, q/k rows that llama.cpp's converter interleaved for its RoPE.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from vllm_jax.config import ConfigError, ModelConfig
from vllm_jax.kernels import quant
from vllm_jax.models.llama import PackedWeight

log = logging.getLogger("vllm_jax")

ARCHS = ("llama", "qwen2", "qwen3")
ARCHS_HELP = "llama (Llama 2/3, Mistral), qwen2, qwen3"
DENSE = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
         gguf.GGMLQuantizationType.BF16}

GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_HF_GLOBAL = {v: k for k, v in GLOBAL_NAMES.items()}
_HF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"


def hf_name(name: str) -> str | None:
    """GGUF tensor name -> the model's weight name; None for tensors the model does not use."""
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 1 and base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def gguf_name(name: str) -> str:
    """The model's weight name -> GGUF tensor name (inverse of hf_name)."""
    base, _, suffix = name.rpartition(".")
    if base in _HF_GLOBAL:
        return f"{_HF_GLOBAL[base]}.{suffix}"
    _, layer, rest = base.split(".", 2)
    return f"blk.{layer}.{_HF_LAYER[rest]}.{suffix}"


def qk_heads(cfg: ModelConfig, name: str) -> int | None:
    """Heads whose rows llama.cpp interleaves in this tensor (llama arch q/k), else None."""
    if cfg.arch not in ("llama", "mistral"):
        return None
    if ".self_attn.q_proj." in name:
        return cfg.num_heads
    if ".self_attn.k_proj." in name:
        return cfg.num_kv_heads
    return None


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate-half) row order -> llama.cpp's interleaved order, per head. Rows may be any
    bytes (a quantized row is self-contained), so this works on packed blocks too."""
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, 2, half, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# reading


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """GGUFReader with every way a damaged file fails turned into one ConfigError."""
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, TypeError, OverflowError,
            UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    size = Path(path).stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ConfigError(f"{path}: truncated GGUF file (tensor data needs {end} bytes, "
                          f"the file has {size})")
    return reader


def _get(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(v: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def config_from_gguf(reader: gguf.GGUFReader, path) -> ModelConfig:
    arch = _get(reader, "general.architecture")
    if arch not in ARCHS:
        raise ConfigError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {ARCHS_HELP}")

    def need(key):
        value = _get(reader, f"{arch}.{key}")
        if value is None:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConfigError(f"{path}: GGUF file has no token_embd.weight tensor")
    rows = int(np.prod(tensors["token_embd.weight"].shape[1:]))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else rows
    if vocab != rows:
        raise ConfigError(f"{path}: {vocab} tokens in the vocabulary but {rows} embedding rows")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = _get(reader, f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ConfigError(f"{path}: per-layer head counts are not supported")
    scaling = _get(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "") or _get(reader, f"{arch}.rope.scaling.factor", 1.0) != 1.0:
        raise ConfigError(f"{path}: unsupported rope scaling {scaling!r}; supported: none, llama3 "
                          f"(as a rope_freqs tensor)")
    window = _get(reader, f"{arch}.attention.sliding_window")
    cfg = ModelConfig(
        arch="mistral" if arch == "llama" and window else arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(_get(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(_get(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_get(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_window=int(window) if window else None,
    )
    if ROPE_FREQS in tensors:
        factors = _dense(tensors[ROPE_FREQS]).astype(np.float64)
        old = _get(reader, f"{arch}.rope.scaling.original_context_length")
        cfg = with_llama3_scaling(cfg, factors, float(old or 8192), path)
    return cfg


def llama3_factors(cfg: ModelConfig) -> np.ndarray:
    """What llama.cpp stores as rope_freqs: base inverse frequency / scaled inverse frequency."""
    plain = replace(cfg, rope_scaling=())
    return (plain.inv_freq() / cfg.inv_freq()).astype(np.float32)


def with_llama3_scaling(cfg: ModelConfig, factors: np.ndarray, old: float, path) -> ModelConfig:
    """Recovers llama3 rope-scaling parameters from llama.cpp's per-frequency divisors.

    Only the ratios old/low and old/high matter, so `old` (original context) can be any value;
    the file's own is used when it has one. Verified by recomputing the frequencies.
    """
    factor = float(factors.max())
    if abs(factor - 1) < 1e-6:
        return cfg
    plain = replace(cfg, rope_scaling=())
    wave = 2 * math.pi / plain.inv_freq().astype(np.float64)
    is_hi = np.abs(factors - 1) < 1e-5
    is_lo = np.abs(factors - factor) < 1e-5 * factor
    mid = ~is_hi & ~is_lo
    # smooth = (old / wave - low) / (high - low), from factors = 1 / ((1 - s) / factor + s)
    smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    x = old / wave[mid]
    if mid.sum() >= 2:
        a, b = np.polyfit(x, smooth, 1)
        low, high = -b / a, -b / a + 1 / a
    else:
        low = old / _boundary(wave[~is_lo], wave[is_lo])
        if mid.sum() == 1:
            high = low + (x[0] - low) / smooth[0]
        else:
            high = old / _boundary(wave[is_hi], wave[~is_hi])
    params = (("factor", factor), ("low_freq_factor", float(low)),
              ("high_freq_factor", float(high)), ("original_max_position_embeddings", old))
    scaled = replace(cfg, rope_scaling=params)
    want = plain.inv_freq() / factors
    if not np.allclose(scaled.inv_freq(), want, rtol=1e-5, atol=0):
        raise ConfigError(f"{path}: rope_freqs does not follow llama3 rope scaling")
    return scaled


def _boundary(below: np.ndarray, above: np.ndarray) -> float:
    """A wavelength between the largest of `below` and the smallest of `above`."""
    lo = below.max() if below.size else above.min() / 4
    hi = above.min() if above.size else lo * 4
    return math.sqrt(lo * hi)


def _dense(t) -> np.ndarray:
    """A dense tensor in numpy's shape (GGUF lists dims innermost first)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if t.tensor_type in DENSE:
        return np.asarray(t.data).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def _weight(t, name: str, cfg: ModelConfig, np_dtype, place: Callable, path, keep: bool):
    heads = qk_heads(cfg, name)
    fix = (lambda x: unpermute_rows(x, heads)) if heads else (lambda x: x)
    if t.tensor_type in DENSE or len(t.shape) == 1 or "norm" in name or not keep:
        return place(name, np.ascontiguousarray(fix(_dense(t))).astype(np_dtype))
    try:
        qtype = quant.qtype_name(t.tensor_type)
    except ValueError:
        raise ConfigError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported: "
                          f"F32, F16, BF16, {', '.join(q.upper() for q in quant.QTYPES)}") from None
    cols = int(t.shape[0])
    rows = int(np.prod(t.shape[1:]))
    raw = fix(np.asarray(t.data).reshape(rows, -1))
    fields = quant.repack(quant.QuantTensor(qtype, (rows, cols), raw))
    return PackedWeight(qtype, cols, {k: place(f"{name}.{k}", v) for k, v in fields.items()})


def load_gguf(path: str, dtype, place: Callable, keep_quantized: bool = True):
    """keep_quantized=False unpacks quantized tensors to dtype (gguf-py's dequantization)."""
    from vllm_jax.loader import progress
    from vllm_jax.tokenizer import Tokenizer

    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    np_dtype = np.dtype(dtype)
    weights, skipped = {}, []
    with progress(len(reader.tensors), f"loading {Path(path).name}") as bar:
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                skipped.append(t.name)
            else:
                try:
                    weights[name] = _weight(t, name, cfg, np_dtype, place, path,
                                            keep_quantized)
                except (ValueError, IndexError) as e:
                    raise ConfigError(f"{path}: corrupt tensor {t.name} ({e})") from None
            bar.update()
    skipped = [n for n in skipped if n != ROPE_FREQS]
    if skipped:
        log.warning("%s: ignoring %d tensors the model does not use: %s", path, len(skipped),
                    ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))
    types = sorted({t.tensor_type.name for t in reader.tensors})
    log.info("%s: %s tensors, %.1f MiB file, %.1f MiB of weights on the device%s",
             Path(path).name, "/".join(types), Path(path).stat().st_size / 2**20,
             weight_bytes(weights) / 2**20, "" if keep_quantized else
             f" (unpacked to {np_dtype.name}; --keep-quantized keeps the GGUF blocks)")
    return cfg, weights, Tokenizer.from_gguf(reader, path)


def weight_bytes(weights: dict) -> int:
    total = 0
    for w in weights.values():
        arrays = w.fields.values() if isinstance(w, PackedWeight) else [w]
        total += sum(int(a.nbytes) for a in arrays)
    return total
