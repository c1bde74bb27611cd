"""Offline throughput: N requests of random token ids, fixed input/output lengths, ignore_eos.

    python tools/bench.py --w MODEL --num-seqs 16 --input-len 128 --output-len 128
    python tools/bench.py --model-shape llama3.1-8b --dtype bf16 --num-seqs 16 --output-len 512

--model-shape builds a named architecture with random weights made on the device (nothing to
download; --quant packs them in a GGUF block format). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax.config import EngineConfig, ModelConfig  # noqa: E402
from vllm_jax.engine.llm_engine import LLMEngine  # noqa: E402
from vllm_jax.loader import LoadedModel, to_dtype  # noqa: E402
from vllm_jax.sampling_params import SamplingParams  # noqa: E402

SHAPES = {  # Hugging Face config.json fields of the named models
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_scaling=dict(
                            rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwq-32b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=5120,
                    intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                    num_key_value_heads=8, rope_theta=1000000.0, max_position_embeddings=131072,
                    rms_norm_eps=1e-5),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
}


class RandomTokenizer:
    """Stands in for a tokenizer when weights are random (requests are token ids, not detokenized)."""
    eos_token_ids: list[int] = []
    chat_template = None


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (cfg.intermediate_size, d),
                   p + "mlp.up_proj.weight": (cfg.intermediate_size, d),
                   p + "mlp.down_proj.weight": (d, cfg.intermediate_size)}
        if cfg.attention_bias:
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv),
                                                                          ("v", kv))}
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (cfg.head_dim,),
                       p + "self_attn.k_norm.weight": (cfg.head_dim,)}
    return shapes


def random_weights(cfg: ModelConfig, dtype, quant: str | None, seed: int = 0):
    """Weights made on the device; quantized matrices get random packed blocks."""
    from vllm_jax.kernels import quant as q
    from vllm_jax.models.llama import PackedWeight

    key = jax.random.key(seed)
    weights = {}
    for i, (name, shape) in enumerate(weight_shapes(cfg).items()):
        k = jax.random.fold_in(key, i)
        if len(shape) == 1:
            weights[name] = jnp.ones(shape, dtype)
        elif quant and name != "embed_tokens.weight" and q.can_quantize(shape, quant):
            sample = q.repack(q.quantize(np.random.default_rng(0).normal(
                size=(1, shape[1])).astype(np.float32) * 0.02, quant))
            fields = {}
            for j, (fname, a) in enumerate(sample.items()):
                fk, fshape = jax.random.fold_in(k, j), (shape[0],) + a.shape[1:]
                if np.issubdtype(a.dtype, np.floating):
                    fields[fname] = jax.random.uniform(fk, fshape, jnp.float32, 1e-4, 2e-3).astype(a.dtype)
                else:
                    fields[fname] = jax.random.bits(fk, fshape, a.dtype)
            weights[name] = PackedWeight(quant, shape[1], fields)
        else:
            weights[name] = (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)
    return weights


def measure_bandwidth() -> float:
    """Device read bandwidth in bytes/s: a sum over an array far larger than any cache."""
    n = 2**30 if jax.default_backend() != "cpu" else 512 * 2**20
    x = jnp.ones((n // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    return n * reps / (time.perf_counter() - t)


def build_engine(args) -> LLMEngine:
    cfg = EngineConfig(model_path=args.w, dtype=args.dtype, quant=args.quant,
                       kv_cache_dtype=args.kv_cache_dtype,
                       max_num_seqs=args.num_seqs, kvcache_mem_mb=args.kvmem,
                       max_model_len=args.input_len + args.output_len + 16,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       keep_quantized=args.keep_quantized)
    if not args.model_shape:
        return LLMEngine(cfg)
    from vllm_jax.models.llama import LlamaForCausalLM

    mcfg = ModelConfig.from_hf(SHAPES[args.model_shape])
    dtype = to_dtype(args.dtype)
    t = time.perf_counter()
    weights = random_weights(mcfg, dtype, args.quant)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights))
    jax.block_until_ready(weights)
    print(f"random weights: {nbytes / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    loaded = LoadedModel(mcfg, LlamaForCausalLM(mcfg, weights, dtype), RandomTokenizer(),
                         args.model_shape, nbytes)
    return LLMEngine(cfg, loaded=loaded)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--w", help="model folder or .gguf (default: the built-in model)")
    src.add_argument("--model-shape", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "f16", "f32"])
    p.add_argument("--quant")
    p.add_argument("--num-seqs", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--kvmem", type=float, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--keep-quantized", action="store_const", const=True,
                   help="keep GGUF weights packed on the CPU too")
    p.add_argument("--compare", action="store_true",
                   help="also run transformers (and llama-cpp-python, if installed) on --w")
    p.add_argument("--json", default="bench.json")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    engine = build_engine(args)
    load_s = time.perf_counter() - t0
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(100, vocab - 100, args.input_len)]
               for _ in range(args.num_seqs)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False)

    t = time.perf_counter()
    compiles = engine.num_compiles
    # the same batch shape once, briefly: compiles the buckets the timed run uses
    warm = [[int(x) for x in rng.integers(100, vocab - 100, args.input_len)] for _ in prompts]
    engine.generate(warm, SamplingParams(temperature=0, max_tokens=3,
                                         ignore_eos=True, detokenize=False))
    warm_s = time.perf_counter() - t

    t = time.perf_counter()
    for pr in prompts:
        engine.add_request(pr, params)
    first, gen0 = None, engine.num_generated_tokens
    while engine.has_unfinished_requests():
        engine.step()
        if first is None and engine.num_generated_tokens - gen0 >= args.num_seqs:
            first = time.perf_counter()
    end = time.perf_counter()
    generated = args.num_seqs * args.output_len
    prefill_s = (first or end) - t
    decode_s = end - (first or t)
    decode_tps = (generated - args.num_seqs) / max(decode_s, 1e-9)
    step_ms = 1000 * decode_s / max(args.output_len - 1, 1)

    weight_bytes = engine.loaded.weight_bytes
    mc = engine.model_config
    itemsize = engine.runner.kv[0].dtype.itemsize
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * itemsize
    avg_ctx = args.input_len + args.output_len / 2
    step_bytes = weight_bytes + kv_per_token * avg_ctx * args.num_seqs
    bw = measure_bandwidth()
    roofline_ms = 1000 * step_bytes / bw
    result = dict(
        model=args.model_shape or engine.loaded.path, backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, dtype=args.dtype,
        kv_cache_dtype=str(engine.runner.kv[0].dtype),
        quant=args.quant, num_seqs=args.num_seqs, input_len=args.input_len,
        output_len=args.output_len, load_s=load_s, warmup_s=warm_s,
        compiles=engine.num_compiles - compiles, prefill_tok_s=args.num_seqs * args.input_len
        / max(prefill_s, 1e-9), decode_tok_s=decode_tps, total_s=end - t,
        decode_step_ms=step_ms, roofline_step_ms=roofline_ms,
        roofline_fraction=roofline_ms / step_ms, read_bandwidth_gbs=bw / 1e9,
        weight_gib=weight_bytes / 2**30, preemptions=engine.scheduler.num_preemptions)
    print(f"[{args.num_seqs} requests] {generated} tokens generated in {end - t:.2f} s "
          f"(decoding throughput {decode_tps:.2f} tokens/s)")
    rows = [("prefill tok/s", f"{result['prefill_tok_s']:.1f}"),
            ("decode tok/s", f"{decode_tps:.1f}"),
            ("decode step ms", f"{step_ms:.2f}"),
            ("roofline step ms", f"{roofline_ms:.2f} ({100 * result['roofline_fraction']:.0f}%)"),
            ("read bandwidth GB/s", f"{bw / 1e9:.1f}"),
            ("warm-up (compile) s", f"{warm_s:.1f}"),
            ("load s", f"{load_s:.1f}")]
    for k, v in rows:
        print(f"  {k:<28} {v}")
    if args.compare:
        from compare import compare
        result["compare"] = compare(engine.loaded.path, prompts, args.output_len)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
