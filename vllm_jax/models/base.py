"""What every architecture declares: its config, its weights (names in both formats, shapes,
logical axes) and its rotary embedding. Plain, hashable data; no JAX here.

An architecture is an NNX module class with three class methods beside its forward:
`config_from_hf(hf: dict)`, `config_from_gguf(meta)` and `weights(cfg) -> list[Weight]`.
The loader, the GGUF writer, `--quant`, tensor parallelism and tools/bench.py only read these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np


class ConfigError(ValueError):
    """A user-facing problem with a model folder or file (one line, no traceback)."""


@dataclass(frozen=True)
class Rope:
    """Rotary embedding as transformers computes it (float32), for `dim` of the head's dims.

    scaling: sorted (key, value) pairs of the HF rope parameters other than the base, e.g.
    (("factor", 8.0), ..., ("rope_type", "llama3")); () for the default rotary embedding.
    """
    theta: float = 10000.0
    dim: int = 0  # rotary dims (head_dim x partial_rotary_factor), set by the config
    scaling: tuple = ()

    TYPES = ("default", "linear", "llama3", "yarn", "longrope")

    @property
    def params(self) -> dict:
        return dict(self.scaling)

    @property
    def type(self) -> str:
        return self.params.get("rope_type", "default")

    def _base(self) -> np.ndarray:
        exponent = np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(self.dim)
        return (np.float32(self.theta) ** exponent).astype(np.float32)  # [dim / 2]

    def inv_freq(self, max_len: int | None = None) -> np.ndarray:
        """[dim / 2] float32. max_len: the longest sequence it will run (LongRoPE picks its long
        factors past the original context, as llama.cpp does for the whole run)."""
        p, base = self.params, self._base()
        kind = self.type
        if kind == "default":
            return (1.0 / base).astype(np.float32)
        if kind == "linear":
            return (1.0 / base / np.float32(p["factor"])).astype(np.float32)
        if kind == "llama3":
            return _llama3(1.0 / base, p)
        if kind == "yarn":
            return _yarn(base, self.dim, self.theta, p)
        long = max_len is not None and max_len > p["original_max_position_embeddings"]
        ext = np.asarray(p["long_factor" if long else "short_factor"], np.float32)
        return (1.0 / (ext * base)).astype(np.float32)

    def attention_factor(self) -> float:
        """What cos and sin are multiplied by (yarn, longrope), else 1."""
        p = self.params
        if self.type == "yarn":
            if p.get("attention_factor") is not None:
                return float(p["attention_factor"])
            factor = p["factor"]
            if p.get("mscale") and p.get("mscale_all_dim"):
                return _mscale(factor, p["mscale"]) / _mscale(factor, p["mscale_all_dim"])
            return _mscale(factor)
        if self.type == "longrope":
            if p.get("attention_factor") is not None:
                return float(p["attention_factor"])
            factor = p["factor"]
            if factor <= 1:
                return 1.0
            return math.sqrt(1 + math.log(factor) / math.log(p["original_max_position_embeddings"]))
        return 1.0


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv: np.ndarray, p: dict) -> np.ndarray:
    factor, low, high, old = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                              p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(base: np.ndarray, dim: int, theta: float, p: dict) -> np.ndarray:
    """YaRN: interpolated frequencies below a ramp of dims, extrapolated above it."""
    factor, old = p["factor"], p["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = (1 - ramp).astype(np.float32)
    inv = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    return inv.astype(np.float32)


def rope_from_hf(hf: dict, head_dim: int, params: dict | None = None) -> Rope:
    """A Rope from a config.json: `rope_parameters` (transformers 5) or `rope_theta` +
    `rope_scaling` (older files); `params` overrides both (a per-layer-type entry)."""
    p = dict(params if params is not None else
             (hf.get("rope_parameters") or hf.get("rope_scaling") or {}))
    theta = p.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = p.pop("rope_type", None) or p.pop("type", None) or "default"
    p.pop("type", None)
    partial = p.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0
    if kind not in Rope.TYPES:
        raise ConfigError(f"unsupported rope scaling {kind!r}; supported: {', '.join(Rope.TYPES)}")
    dim = int(head_dim * partial)
    if kind == "default":
        return Rope(float(theta), dim)
    old = p.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if kind in ("yarn", "longrope"):
        old = old or hf.get("max_position_embeddings")
        if p.get("factor") is None:
            p["factor"] = hf["max_position_embeddings"] / old
    if old is not None:
        p["original_max_position_embeddings"] = old
    p["rope_type"] = kind
    return Rope(float(theta), dim, _frozen(p))


def _frozen(p: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in p.items()
                        if v is not None))


FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer; families add their own fields by subclassing.

    layer_types: per layer "full_attention" or "sliding_attention" (a window of
    `sliding_window` tokens); () means every layer is full, or sliding when a window is set.
    """
    arch: str  # the family's variant, e.g. llama | mistral | qwen2 | qwen3 | gemma3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: Rope = field(default_factory=Rope)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple = ()

    def __post_init__(self):
        if not self.rope.dim:
            object.__setattr__(self, "rope", Rope(self.rope.theta, self.head_dim,
                                                  self.rope.scaling))

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return SLIDING if self.sliding_window else FULL

    def window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_type(i) == SLIDING else None

    def rope_for(self, i: int) -> Rope:
        return self.rope

    def attention_scale(self) -> float:
        return self.head_dim ** -0.5

    def is_moe(self, i: int) -> bool:
        return False


@dataclass(frozen=True)
class MoEConfig(ModelConfig):
    """Mixture of Experts: a router picks num_experts_per_tok of num_experts gated MLPs."""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple = ()  # layers with a plain MLP instead of experts

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers


@dataclass(frozen=True)
class Weight:
    """One weight of a model, as the model holds it.

    name: the model's name, the path of its module ("layers.0.self_attn.q_proj.weight").
    shape: [out, in] for matrices (Hugging Face's layout), [experts, out, in] for experts.
    axes: the logical axis of each dim ("heads", "kv_heads", "embed", "mlp", "vocab", ...), which
      vllm_jax.parallel maps to the device mesh.
    hf: its checkpoint tensor, or one per expert (stacked along dim 0 at load).
    gguf: its GGUF tensor. rows: this weight is rows [a, b) of that tensor (a fused layout:
      several weights share one tensor, in both formats).
    quantize: a matmul weight that --quant packs. gguf_permute: llama.cpp interleaved the rows
      of this many heads for its RoPE. hf_offset: added to the checkpoint's values (Gemma keeps
      norms as w with 1 + w applied; llama.cpp stores 1 + w). dtype: kept in this dtype
      whatever the model's ("f32" for norms whose math stays float32).
    """
    name: str
    shape: tuple
    axes: tuple
    hf: str | tuple
    gguf: str
    rows: tuple | None = None
    quantize: bool = False
    gguf_permute: int = 0
    hf_offset: float = 0.0
    dtype: str | None = None
    optional: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)


def gguf_rope(meta, arch: str, head_dim: int) -> Rope:
    """A Rope from llama.cpp's metadata (llama3 scaling arrives separately, as rope_freqs)."""
    theta = meta.float(f"{arch}.rope.freq_base", 10000.0)
    dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    kind = meta.get(f"{arch}.rope.scaling.type", "none") or "none"
    factor = meta.float(f"{arch}.rope.scaling.factor", 1.0)
    if kind == "none" or factor in (0.0, 1.0) and kind != "longrope":
        return Rope(theta, dim)
    old = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "linear":
        return Rope(theta, dim, _frozen({"rope_type": "linear", "factor": factor}))
    if kind == "yarn" and old:
        return Rope(theta, dim, _frozen({"rope_type": "yarn", "factor": factor,
                                         "original_max_position_embeddings": int(old)}))
    raise ConfigError(f"{meta.path}: unsupported rope scaling {kind!r}; supported: none, "
                      f"linear, yarn, llama3 (as a rope_freqs tensor)")


ROPE_FREQS = "rope_freqs.weight"


def rope_freqs_tensor(cfg: ModelConfig) -> dict:
    """llama3 scaling the way llama.cpp's converter stores it: a rope_freqs tensor of
    base inverse frequency / scaled inverse frequency."""
    if cfg.rope.type != "llama3":
        return {}
    plain = Rope(cfg.rope.theta, cfg.rope.dim)
    return {ROPE_FREQS: (plain.inv_freq() / cfg.rope.inv_freq()).astype(np.float32)}


def with_rope_freqs(cfg: ModelConfig, meta) -> ModelConfig:
    """cfg with the llama3 rope scaling that a GGUF rope_freqs tensor describes, if any."""
    if ROPE_FREQS not in meta.tensors:
        return cfg
    factors = meta.dense(ROPE_FREQS).astype(np.float64)
    old = meta.get(f"{meta.arch}.rope.scaling.original_context_length")
    return replace(cfg, rope=llama3_from_factors(cfg.rope, factors, float(old or 8192), meta.path))


def llama3_from_factors(rope: Rope, factors: np.ndarray, old: float, path) -> Rope:
    """Recovers llama3 rope-scaling parameters from llama.cpp's per-frequency divisors.

    Only the ratios old/low and old/high matter, so `old` (original context) can be any value;
    the file's own is used when it has one. Verified by recomputing the frequencies.
    """
    factor = float(factors.max())
    plain = Rope(rope.theta, rope.dim)
    if abs(factor - 1) < 1e-6:
        return plain
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
    scaled = Rope(rope.theta, rope.dim, _frozen({
        "rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
        "high_freq_factor": float(high), "original_max_position_embeddings": old}))
    if not np.allclose(scaled.inv_freq(), plain.inv_freq() / factors, rtol=1e-5, atol=0):
        raise ConfigError(f"{path}: rope_freqs does not follow llama3 rope scaling")
    return scaled


def _boundary(below: np.ndarray, above: np.ndarray) -> float:
    """A wavelength between the largest of `below` and the smallest of `above`."""
    lo = below.max() if below.size else above.min() / 4
    hi = above.min() if above.size else lo * 4
    return math.sqrt(lo * hi)
