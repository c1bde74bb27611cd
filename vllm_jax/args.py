"""The engine's command-line flags, shared by the CLI (`python -m vllm_jax.cli`), the server
(`python -m vllm_jax.server`) and tools/bench.py, and the one way they become an EngineConfig."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_jax.config import WARMUPS, ConfigError, EngineConfig
from vllm_jax.engine.speculative import SpeculativeConfig
from vllm_jax.loader.default_model import named_model
from vllm_jax.kernels.backend import BACKENDS


class Parser(argparse.ArgumentParser):
    """argparse, with errors as the usage line and the reason (not the whole option list);
    the speculative decoding flags are combined (and checked) into args.speculative_config."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if hasattr(ns, "num_speculative_tokens"):
            try:
                ns.speculative_config = speculative_config(ns)
            except ConfigError as e:
                self.error(str(e))
        return ns, rest

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]  (--help lists them)\n"
                     f"{self.prog}: error: {message}\n")


def positive(kind=int):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return v
    return parse


def device_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated device ids, got {s!r}") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative device ids, got {s!r}")
    return ids


def add_engine_args(p: argparse.ArgumentParser, **defaults):
    """The engine's flags; `defaults` overrides some (tools/bench.py: dtype, kvmem)."""
    p.add_argument("--w", "--weights", dest="w", metavar="PATH",
                   help="model folder (safetensors), .gguf file or a named model "
                        "(smollm2-135m, gemma3-270m); default: smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"],
                   help="compute dtype (auto: f32 on the CPU, bf16 on accelerators)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "f16", "f32"],
                   help="KV cache dtype (auto: the compute dtype, f16 for bf16 on the CPU; f16 "
                        "halves a float32 cache's memory and reads, as llama.cpp's cache does)")
    p.add_argument("--quant", help="quantize safetensors weights in situ (q4_0, q4k, q8_0, ...)")
    p.add_argument("--kvmem", type=positive(), default=4096, metavar="MB",
                   help="KV cache limit in MB per device (default 4096); the cache holds "
                        "max-num-seqs sequences of max-model-len tokens, or what fits")
    p.add_argument("--max-model-len", type=positive(), metavar="N")
    p.add_argument("--max-num-seqs", type=positive(), metavar="N",
                   help="sequences run at once (default 64; the CLI: the number of prompts)")
    p.add_argument("--max-num-batched-tokens", type=positive(), default=512, metavar="N")
    p.add_argument("--d", type=device_ids, metavar="IDS", help="device ids, e.g. 0,1,2,3")
    p.add_argument("--tp", type=positive(), metavar="N",
                   help="tensor parallel over the first N devices")
    p.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="multi-host: process 0's address")
    p.add_argument("--num-processes", type=positive(), metavar="N",
                   help="multi-host: process count")
    p.add_argument("--process-id", type=int, metavar="I", help="multi-host: this process's index")
    choices = [b for b in BACKENDS if b != "pallas_interpret"]
    p.add_argument("--kernel-backend", default="auto", choices=choices,
                   help="kernels for attention and quantized matmuls (auto: pallas on GPUs, "
                        "cpu = the C++ kernels on the CPU, xla elsewhere; a Pallas kernel that "
                        "does not compile runs on XLA, with a warning)")
    p.add_argument("--attention-backend", choices=choices,
                   help="paged attention's kernels (default: --kernel-backend)")
    p.add_argument("--matmul-backend", choices=choices,
                   help="the matmuls' kernels (default: --kernel-backend)")
    p.add_argument("--cpu-activations", default="f32", choices=["f32", "int16", "int8"],
                   help="the C++ quantized matmul's activations: float32 (default); int16 per "
                        "32 with integer dot products for Q4_0, Q4_1, Q8_0 weights (within "
                        "~1e-5 of float32, ~1.3x faster); or int8 (llama.cpp's arithmetic; "
                        "Q4_0-Q8_0, Q4_K, Q6_K; the MLP's down projection takes int16): faster "
                        "still, +0.35%% to +1.1%% perplexity on the default model")
    p.add_argument("--keep-quantized", action="store_const", const=True,
                   help="keep GGUF weights packed even where only XLA's path runs")
    p.add_argument("--pooling", default="last", choices=["last", "mean"],
                   help="embeddings (/v1/embeddings, LLM.embed): the final hidden state of the "
                        "last token (default, as vLLM pools decoder models) or the mean of all")
    p.add_argument("--warmup", default="none", choices=WARMUPS,
                   help="step buckets to compile at start (default none: each on first use); "
                        "decode: the decode buckets, all: prompt and mixed steps too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-mixed-steps", action="store_true",
                   help="prompt chunks and decode rows in separate steps (prompts first), as "
                        "before mixed steps")
    p.add_argument("--mixed-prefill-tokens", type=positive(), metavar="N",
                   help="at most N prompt tokens in a step that carries decode rows (default: "
                        "the whole --max-num-batched-tokens): shorter gaps between a stream's "
                        "tokens, later first tokens")
    p.add_argument("--speculative-config", type=json_object, metavar="JSON",
                   help='speculative decoding, as vLLM\'s: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                        '"prompt_lookup_min": 1}\' or \'{"model": PATH, '
                        '"num_speculative_tokens": 4}\' (a draft model with the same vocabulary)')
    p.add_argument("--speculative-model", metavar="PATH",
                   help="draft model for speculative decoding (folder, .gguf or named model); "
                        "needs --num-speculative-tokens")
    p.add_argument("--num-speculative-tokens", type=positive(), metavar="K",
                   help="tokens proposed per step (with --speculative-model, or overriding "
                        "--speculative-config's)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="dispatch each step before the previous one's tokens are read back, so "
                        "the host's scheduling, detokenizing and stop checks overlap the "
                        "device's work (default: on)")
    p.add_argument("--decode-steps", type=positive(), default=4, metavar="K",
                   help="decode steps in one dispatch while no prompt waits: the host's work "
                        "per step is spread over K, a prompt arriving meanwhile waits for up to "
                        "K steps and a stream gets its tokens K at a time (default 4, the "
                        "server's 1: one step a dispatch)")
    p.add_argument("--mixed-step-slowdown", type=positive(float), metavar="X",
                   help="without --mixed-prefill-tokens: prompt tokens beside decode rows are "
                        "capped so that a step takes at most X times a decode step of every "
                        "running and waiting stream, as measured while serving (the server's "
                        "default 2; offline no cap)")
    p.set_defaults(**defaults)


def json_object(s: str) -> dict:
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return value


def speculative_config(args: argparse.Namespace) -> dict | None:
    """The speculative_config dict the three flags describe, checked (ConfigError)."""
    spec = dict(args.speculative_config or {})
    if args.speculative_model:
        spec["model"] = args.speculative_model
    if args.num_speculative_tokens:
        spec["num_speculative_tokens"] = args.num_speculative_tokens
    if not spec:
        return None
    if "model" not in spec and "method" not in spec:
        raise ConfigError("--num-speculative-tokens needs --speculative-model or "
                          "--speculative-config")
    if "num_speculative_tokens" not in spec:
        raise ConfigError("speculative decoding needs --num-speculative-tokens (or "
                          "\"num_speculative_tokens\" in --speculative-config)")
    model = SpeculativeConfig.parse(spec).model
    if model and not Path(model).exists() and named_model(model) is None:
        raise ConfigError(f"speculative model {model!r} not found (a folder, a .gguf file or "
                          f"a named model)")
    return spec


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig the parsed flags describe (overrides: fields set by the caller)."""
    return EngineConfig(**{**dict(
        model_path=args.w, dtype=args.dtype, quant=args.quant, kv_cache_dtype=args.kv_cache_dtype,
        kvcache_mem_mb=args.kvmem, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs or 64,
        max_num_batched_tokens=args.max_num_batched_tokens,
        device_ids=args.d, tensor_parallel_size=args.tp,
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id, kernel_backend=args.kernel_backend,
        attention_backend=args.attention_backend, matmul_backend=args.matmul_backend,
        cpu_activations=args.cpu_activations, seed=args.seed, warmup=args.warmup,
        keep_quantized=args.keep_quantized, pooling=args.pooling,
        enable_prefix_caching=not args.no_prefix_caching,
        mixed_steps=not args.no_mixed_steps,
        mixed_prefill_tokens=args.mixed_prefill_tokens,
        speculative_config=getattr(args, "speculative_config", None),
        async_scheduling=args.async_scheduling, decode_steps=args.decode_steps,
        mixed_step_slowdown=args.mixed_step_slowdown), **overrides})
