"""Engine configuration: plain data. (A model's configuration is its architecture's:
models/base.py ModelConfig.)"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm_jax.kernels.backend import Backends
from vllm_jax.models.base import ConfigError, ModelConfig

__all__ = ["ConfigError", "EngineConfig", "ModelConfig", "WARMUPS"]

WARMUPS = ("none", "decode", "all")  # EngineConfig.warmup choices


@dataclass
class EngineConfig:
    model_path: str | None = None  # None = the built-in default model
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None = min(model's context, 4096)
    max_num_batched_tokens: int = 512
    kvcache_mem_mb: float = 4096
    page_size: int = 16
    mixed_steps: bool = True  # decode rows and prompt chunks in one step (engine/scheduler.py)
    # most prompt tokens in a step beside decode rows (None: the whole budget); fewer keep the
    # running streams' gaps short, at the cost of time to first token
    mixed_prefill_tokens: int | None = None
    # else a mixed step takes at most this many times a decode step of all the streams (running
    # and waiting), its prompt tokens capped by costs measured while serving
    # (engine/step_cost.py); None (offline, where nobody watches a stream's gaps): the whole
    # budget. The server's default is 2.
    mixed_step_slowdown: float | None = None
    # dispatch step N+1 before reading step N's tokens, so the host's work per step overlaps the
    # device's (engine/llm_engine.py); off: every step is read before the next is scheduled
    async_scheduling: bool = True
    # decode steps in one dispatch while no prompt waits (engine/scheduler.py): the host's work
    # per step (dispatch, preparation, read-back) is spread over them; 1: one step a dispatch
    decode_steps: int = 4
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
    kernel_backend: str = "auto"  # auto | xla | cpu | pallas: attention and quantized matmuls
    attention_backend: str | None = None  # paged attention's; None = kernel_backend
    matmul_backend: str | None = None  # the matmuls' (packed and dense); None = kernel_backend
    cpu_activations: str = "f32"  # f32 | int16 (~f32, faster) | int8 (+0.35..1.1% perplexity)
    # step buckets compiled at start: none (each on first use), decode, or all (prompt chunks
    # and mixed steps too: the most start-up time, no compile pause in any later step)
    warmup: str = "none"
    pooling: str = "last"  # embeddings: last | mean of the final hidden states (vLLM: LAST)
    # GGUF weights: None = packed where a fused kernel multiplies them (Pallas on GPUs, the C++
    # kernel on the CPU), unpacked to dtype at load where only XLA's path runs (it cannot fuse
    # the unpacking into the matmul: 5x slower than dense there)
    keep_quantized: bool | None = None
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": k,
    # "prompt_lookup_max": n, "prompt_lookup_min": m} or {"model": PATH, "num_speculative_tokens": k}
    speculative_config: dict | None = None
    extra: dict = field(default_factory=dict)

    def backends(self) -> Backends:
        """Each kernel family's backend: its own switch, else kernel_backend."""
        return Backends(self.attention_backend or self.kernel_backend,
                        self.matmul_backend or self.kernel_backend, self.cpu_activations)
