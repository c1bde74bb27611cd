"""Offline throughput: N requests of random token ids, fixed input/output lengths, ignore_eos.

    python tools/bench.py --w MODEL --num-seqs 16 --input-len 128 --output-len 128
    python tools/bench.py --model-shape llama3.1-8b --dtype bf16 --num-seqs 16 --output-len 512
    python tools/bench.py --num-seqs 16 --json-schema tools/bench_schema.json

--json-schema constrains every request to a JSON schema (structured output) and reports the
host time the matchers take per step (the bitmask they fill, the tokens they consume).

--model-shape builds a named architecture with random weights made on the device (nothing to
download; --quant packs them in a GGUF block format). Prints a table and writes JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax import models  # noqa: E402
from vllm_jax.args import Parser, add_engine_args, engine_config, positive  # noqa: E402
from vllm_jax.config import ModelConfig  # noqa: E402
from vllm_jax.engine.llm_engine import LLMEngine  # noqa: E402
from vllm_jax.kernels import backend as kernel_backend  # noqa: E402
from vllm_jax.kernels import quant as q  # noqa: E402
from vllm_jax.loader import LoadedModel, to_dtype  # noqa: E402
from vllm_jax.loader.host import host_dtype  # noqa: E402
from vllm_jax.sampling_params import SamplingParams, StructuredOutputs  # noqa: E402

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
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          norm_topk_prob=True, rope_theta=1000000.0,
                          max_position_embeddings=40960, rms_norm_eps=1e-6),
    "gemma3-270m": dict(architectures=["Gemma3ForCausalLM"], vocab_size=262144, hidden_size=640,
                        intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, sliding_window=512,
                        max_position_embeddings=32768, rms_norm_eps=1e-6,
                        rope_theta=1000000.0, query_pre_attn_scalar=256),
}


class RandomTokenizer:
    """Stands in for a tokenizer when weights are random (requests are token ids, not detokenized)."""
    eos_token_ids: list[int] = []
    chat_template = None
    vocab_size = 0  # the model's vocabulary is the one that counts


def weight_shapes(cls, cfg: ModelConfig, dtype, quant: str | None) -> dict:
    """The model's declared weights as jax.ShapeDtypeStructs, nothing allocated (lowering needs
    only these); quantized matrices as a PackedWeight of their fields' shapes."""
    shapes = {}
    for spec in cls.weights(cfg):
        shape = spec.shape
        if len(shape) == 1:
            shapes[spec.name] = jax.ShapeDtypeStruct(shape, host_dtype(spec, dtype))
        elif quant and spec.quantize and q.can_quantize(shape, quant):
            shapes[spec.name] = packed_shape(quant, shape)
        else:
            shapes[spec.name] = jax.ShapeDtypeStruct(shape, dtype)
    return shapes


def packed_shape(qtype: str, shape: tuple) -> q.PackedWeight:
    """A [..., rows, cols] matrix packed in `qtype`, its fields as jax.ShapeDtypeStructs."""
    sample = q.repack(q.quantize(np.zeros((1, shape[-1]), np.float32), qtype))
    return q.PackedWeight(qtype, shape[-1], {
        name: jax.ShapeDtypeStruct(tuple(shape[:-1]) + a.shape[1:], a.dtype)
        for name, a in sample.items()})


def random_weights(cls, cfg: ModelConfig, dtype, quant: str | None, seed: int = 0):
    """The model's declared weights made on the device: norms ones, dense matrices normal,
    quantized matrices random packed blocks."""
    key = jax.random.key(seed)
    weights = {}
    for i, (name, shape) in enumerate(weight_shapes(cls, cfg, dtype, quant).items()):
        k = jax.random.fold_in(key, i)
        if isinstance(shape, q.PackedWeight):
            weights[name] = random_packed(k, shape)
        elif len(shape.shape) == 1:
            weights[name] = jnp.ones(shape.shape, shape.dtype)
        else:
            weights[name] = (jax.random.normal(k, shape.shape, jnp.float32) * 0.02).astype(dtype)
    return weights


def random_packed(key, packed: q.PackedWeight) -> q.PackedWeight:
    """`packed` (fields as shape structs, see packed_shape) filled on the device."""
    return packed._replace(fields={f: random_field(jax.random.fold_in(key, j), a)
                                   for j, (f, a) in enumerate(packed.fields.items())})


def random_field(key, a: jax.ShapeDtypeStruct):
    """Random bits, or small positive scales for a packed weight's float fields."""
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jax.random.uniform(key, a.shape, jnp.float32, 1e-4, 2e-3).astype(a.dtype)
    # jax.random.bits makes unsigned ints only; int8 fields (q8_0, q3_k, q6_k) take them bitcast
    bits = jax.random.bits(key, a.shape, np.dtype(f"u{np.dtype(a.dtype).itemsize}"))
    return jax.lax.bitcast_convert_type(bits, a.dtype)


def measure_bandwidth(nbytes: int | None = None) -> float:
    """Device read bandwidth in bytes/s: a sum over an array far larger than any cache."""
    n = nbytes or (2**30 if jax.default_backend() != "cpu" else 512 * 2**20)
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
    cfg = engine_config(args, max_num_seqs=args.num_seqs,
                        max_model_len=args.max_model_len or args.input_len + args.output_len + 16,
                        quant=None if args.model_shape else args.quant)
    if not args.model_shape:
        return LLMEngine(cfg)
    shape = dict(SHAPES[args.model_shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cls, mcfg = models.from_hf(shape)
    dtype = to_dtype(args.dtype)
    t = time.perf_counter()
    weights = random_weights(cls, mcfg, dtype, args.quant)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(weights) if hasattr(x, "nbytes"))
    jax.block_until_ready(weights)
    print(f"random weights: {nbytes / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    loaded = LoadedModel(mcfg, cls(mcfg, weights, dtype, cfg.backends()), RandomTokenizer(),
                         args.model_shape, nbytes)
    return LLMEngine(cfg, loaded=loaded)


def kernels_used(backends: kernel_backend.Backends) -> dict:
    """Each kernel family's backend, and the Pallas kernels that fell back to XLA."""
    return dict(attention=kernel_backend.resolve(backends.attention),
                matmul=kernel_backend.resolve(backends.matmul),
                fell_back_to_xla=kernel_backend.fallen_back())


class HostClock:
    """Seconds spent inside each wrapped method of an object."""

    def __init__(self, obj, names):
        self.seconds = dict.fromkeys(names, 0.0)
        for name in names:
            setattr(obj, name, self._timed(name, getattr(obj, name)))

    def _timed(self, name, fn):
        def run(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[name] += time.perf_counter() - t
        return run


class StepCounter:
    """Steps scheduled, a run of decode steps in one dispatch counted as its steps."""

    def __init__(self, scheduler):
        self.steps, self._schedule = 0, scheduler.schedule
        scheduler.schedule = self._counted

    def _counted(self):
        batch = self._schedule()
        self.steps += batch.num_steps if batch else 0
        return batch


def prompts_done(scheduler) -> bool:
    """Every prompt computed and its first token read back: from here on steps are pure decode
    steps (with mixed steps the first sequences decode while the later prompts prefill, all
    counted as the prefill phase; with async scheduling a step counts once it is read)."""
    return not scheduler.waiting and all(seq.num_known_tokens > seq.num_prompt_tokens
                                         for seq in scheduler.running)


def main(argv=None):
    p = Parser(prog="tools/bench.py", description=__doc__.split("\n")[0])
    add_engine_args(p)
    p.add_argument("--model-shape", choices=sorted(SHAPES),
                   help="a named architecture with random weights instead of --w")
    p.add_argument("--layers", type=positive(), metavar="N",
                   help="with --model-shape: only the first N layers (a big shape on a small host)")
    p.add_argument("--num-seqs", type=positive(), default=16)
    p.add_argument("--input-len", type=positive(), default=128)
    p.add_argument("--output-len", type=positive(), default=128)
    p.add_argument("--compare", action="store_true",
                   help="also run transformers and llama.cpp (llama-batched-bench in "
                        "$LLAMA_CPP_BIN or on PATH), where installed, on --w")
    p.add_argument("--json-schema", metavar="FILE",
                   help="constrain every request's output to this JSON schema")
    p.add_argument("--json", default="bench.json")
    args = p.parse_args(argv)
    if args.model_shape and args.w:
        p.error("--model-shape makes random weights; it takes no --w")

    t0 = time.perf_counter()
    engine = build_engine(args)
    load_s = time.perf_counter() - t0
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(100, vocab - 100, args.input_len)]
               for _ in range(args.num_seqs)]
    so = None
    if args.json_schema:
        so = StructuredOutputs(json=json.loads(Path(args.json_schema).read_text()))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True,
                            detokenize=False, structured_outputs=so)

    t = time.perf_counter()
    compiles = engine.num_compiles
    # the same batch shape once, briefly: compiles the buckets the timed run uses (with mixed
    # steps the first sequences finish one step per prefill step before the last: that tail too;
    # and a run of decode steps in one dispatch)
    warm = [[int(x) for x in rng.integers(100, vocab - 100, args.input_len)] for _ in prompts]
    prefill_steps = -(-args.num_seqs * args.input_len // engine.scheduler.max_num_batched_tokens)
    warm_tokens = min(args.output_len, 3 + prefill_steps + engine.config.decode_steps)
    engine.generate(warm, SamplingParams(temperature=0, max_tokens=warm_tokens, ignore_eos=True,
                                         detokenize=False, structured_outputs=so))
    if engine.speculator:  # verification steps come when proposals do: compile them all
        engine.speculator.warmup()
    warm_s = time.perf_counter() - t
    host = HostClock(engine.structured, ["bitmask", "advance"])
    counter = StepCounter(engine.scheduler)

    t = time.perf_counter()
    for pr in prompts:
        engine.add_request(pr, params)
    first, gen0 = None, engine.num_generated_tokens
    gen_first, steps_first = gen0 + args.num_seqs, 1
    while engine.has_unfinished_requests():
        engine.step()
        if first is None and prompts_done(engine.scheduler):
            first, gen_first = time.perf_counter(), engine.num_generated_tokens
            steps_first = counter.steps
    num_steps = counter.steps
    end = time.perf_counter()
    generated = engine.num_generated_tokens - gen0
    prefill_s = (first or end) - t
    decode_s = end - (first or t)
    decode_tps = (engine.num_generated_tokens - gen_first) / max(decode_s, 1e-9)
    step_ms = 1000 * decode_s / max(num_steps - steps_first, 1)

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
        kernels=kernels_used(engine.config.backends()),
        kv_cache_dtype=str(engine.runner.kv[0].dtype),
        quant=args.quant, num_seqs=args.num_seqs, input_len=args.input_len,
        output_len=args.output_len, load_s=load_s, warmup_s=warm_s,
        compiles=engine.num_compiles - compiles, prefill_tok_s=args.num_seqs * args.input_len
        / max(prefill_s, 1e-9), decode_tok_s=decode_tps, total_s=end - t,
        decode_step_ms=step_ms, roofline_step_ms=roofline_ms,
        roofline_fraction=roofline_ms / step_ms, read_bandwidth_gbs=bw / 1e9,
        weight_gib=weight_bytes / 2**30, preemptions=engine.scheduler.num_preemptions,
        json_schema=args.json_schema, generated=generated,
        speculative=engine.speculator and engine.speculator.stats.as_dict(),
        structured_host_step_ms={k: 1000 * v / num_steps for k, v in host.seconds.items()})
    print(f"[{args.num_seqs} requests] {generated} tokens generated in {end - t:.2f} s "
          f"(decoding throughput {decode_tps:.2f} tokens/s)")
    rows = [("prefill tok/s", f"{result['prefill_tok_s']:.1f}"),
            ("decode tok/s", f"{decode_tps:.1f}"),
            ("decode step ms", f"{step_ms:.2f}"),
            *[(f"structured {k} ms/step", f"{v:.3f}")
              for k, v in result["structured_host_step_ms"].items() if args.json_schema],
            ("roofline step ms", f"{roofline_ms:.2f} ({100 * result['roofline_fraction']:.0f}%)"),
            ("read bandwidth GB/s", f"{bw / 1e9:.1f}"),
            *[("speculative acceptance", f"{result['speculative']['acceptance_rate']:.2f}")
              for _ in [0] if result["speculative"]],
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
