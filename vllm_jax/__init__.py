"""vllm_jax: a minimal vLLM-style LLM inference engine on JAX/XLA.

    from vllm_jax import LLM, SamplingParams
    llm = LLM(model="path/to/model", dtype="f32")
    print(llm.generate("Hello", SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text)

The names below load on first use, so `import vllm_jax.tokenizer` (say) does not import JAX.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CompletionOutput": "vllm_jax.api",
    "ConfigError": "vllm_jax.config",
    "EmbeddingOutput": "vllm_jax.api",
    "EmbeddingRequestOutput": "vllm_jax.api",
    "Engine": "vllm_jax.api",
    "EngineConfig": "vllm_jax.config",
    "LLM": "vllm_jax.api",
    "Logprob": "vllm_jax.api",
    "Message": "vllm_jax.api",
    "PoolingParams": "vllm_jax.pooling_params",
    "RequestOutput": "vllm_jax.api",
    "SamplingParams": "vllm_jax.sampling_params",
    "StructuredOutputs": "vllm_jax.sampling_params",
    "forward_logits": "vllm_jax.api",
    "load_model": "vllm_jax.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vllm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
