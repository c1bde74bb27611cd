"""python -m vllm_jax.cli: run a batch of prompts, chat (--i) or serve (--server)."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from vllm_jax.config import ConfigError, EngineConfig


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


def add_engine_args(p: argparse.ArgumentParser):
    p.add_argument("--w", "--weights", dest="w", metavar="PATH",
                   help="model folder (safetensors) or .gguf file; default: smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "f16", "f32"],
                   help="compute dtype (auto: f32 on the CPU, bf16 on accelerators)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "f16", "f32"],
                   help="KV cache dtype (auto: the compute dtype; f16 halves a float32 cache's "
                        "memory and reads, as llama.cpp's default cache does)")
    p.add_argument("--quant", help="quantize safetensors weights in situ (q4_0, q4k, q8_0, ...)")
    p.add_argument("--kvmem", type=positive(), default=4096, metavar="MB",
                   help="KV cache size in MB (default 4096)")
    p.add_argument("--max-model-len", type=positive(), metavar="N")
    p.add_argument("--max-num-seqs", type=positive(), default=64, metavar="N")
    p.add_argument("--max-num-batched-tokens", type=positive(), default=512, metavar="N")
    p.add_argument("--d", type=device_ids, metavar="IDS", help="device ids, e.g. 0,1,2,3")
    p.add_argument("--tp", type=positive(), metavar="N", help="tensor parallel over the first N devices")
    p.add_argument("--coordinator-address", metavar="HOST:PORT", help="multi-host: process 0's address")
    p.add_argument("--num-processes", type=positive(), metavar="N", help="multi-host: process count")
    p.add_argument("--process-id", type=int, metavar="I", help="multi-host: this process's index")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "xla", "cpu", "pallas"])
    p.add_argument("--keep-quantized", action="store_const", const=True,
                   help="keep GGUF weights packed on the CPU too (less memory, slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prefix-caching", action="store_true")


def engine_config(args) -> EngineConfig:
    return EngineConfig(model_path=args.w, dtype=args.dtype, quant=args.quant,
                        kv_cache_dtype=args.kv_cache_dtype,
                        kvcache_mem_mb=args.kvmem, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        device_ids=args.d, tensor_parallel_size=args.tp,
                        coordinator_address=args.coordinator_address,
                        num_processes=args.num_processes, process_id=args.process_id,
                        attention_backend=args.attention_backend, seed=args.seed,
                        keep_quantized=args.keep_quantized,
                        enable_prefix_caching=not args.no_prefix_caching)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vllm_jax.cli",
                                description="Generate text with vllm_jax.")
    add_engine_args(p)
    p.add_argument("--prompts", help='prompts separated by "|", run as one batch')
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, no chat template")
    p.add_argument("--max-tokens", "--max", dest="max_tokens", type=positive(), default=256)
    p.add_argument("--temperature", type=float,
                   help="default: 0 (greedy) for --prompts, 0.7 for the chat")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch", type=positive(), metavar="N",
                   help="benchmark: run the (first) prompt N times")
    p.add_argument("--i", action="store_true", help="interactive chat")
    p.add_argument("--server", action="store_true", help="serve the OpenAI-compatible API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--save-gguf", metavar="PATH", help="write the (quantized) model as GGUF")
    return p


def render(engine, prompt: str, raw: bool) -> str:
    tok = engine.tokenizer
    if raw or not tok.chat_template:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True)


def run_prompts(engine, prompts: list[str], params, raw: bool):
    ids = [engine.add_request(engine.tokenizer.encode(render(engine, p, raw),
                                                      add_special_tokens=False), params)
           for p in prompts]
    num_prompt = sum(len(engine.requests[i].prompt_token_ids) for i in ids)
    done, first_token_at, last_report = {}, {}, time.monotonic()
    start = time.monotonic()
    while len(done) < len(ids):
        for out in engine.step():
            first_token_at.setdefault(out.request_id, time.monotonic())
            if out.finished:
                done[out.request_id] = out
        now = time.monotonic()
        if now - last_report > 5:
            active = len(ids) - len(done)
            rate = engine.num_generated_tokens / max(now - start, 1e-9)
            print(f"[{active} active requests] {engine.num_generated_tokens} tokens generated "
                  f"({rate:.1f} tokens/s)", file=sys.stderr)
            last_report = now
    end = time.monotonic()
    prefill_end = max(first_token_at.values())
    outs = [done[i] for i in ids]
    generated = sum(len(o.token_ids) for r in outs for o in r.outputs)
    decode_tokens = generated - sum(len(r.outputs) for r in outs)
    pt = prefill_end - start
    dt = max(end - prefill_end, 1e-9)
    print(f"Prompt tokens: {num_prompt} in {pt:.2f} s ({num_prompt / max(pt, 1e-9):.2f} tokens/s)",
          file=sys.stderr)
    print(f"[{len(ids)} requests] {generated} tokens generated in {end - start:.2f} s "
          f"(decoding throughput {decode_tokens / dt:.2f} tokens/s)", file=sys.stderr)
    return outs


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.server:
            from vllm_jax.server import serve
            return serve(engine_config(args), args.host, args.port)
        if args.i:
            from vllm_jax.repl import run_chat
            from vllm_jax.sampling_params import SamplingParams
            chat_params = SamplingParams(temperature=0.7 if args.temperature is None else args.temperature,
                                         top_k=args.top_k,
                                         top_p=args.top_p, max_tokens=None)
            return run_chat(engine_config(args), chat_params)
        if not args.prompts and not args.save_gguf:
            parser.error("nothing to do: pass --prompts, --i or --server")
        from vllm_jax.engine.llm_engine import LLMEngine
        from vllm_jax.sampling_params import SamplingParams

        params = SamplingParams(temperature=args.temperature or 0.0, top_k=args.top_k,
                                top_p=args.top_p, max_tokens=args.max_tokens)
        engine = LLMEngine(engine_config(args))
        if args.save_gguf:
            from vllm_jax.loader.quantize import save_engine_gguf
            save_engine_gguf(engine, args.save_gguf)
            print(f"wrote {args.save_gguf}", file=sys.stderr)
        if not args.prompts:
            return 0
        prompts = [p.strip() for p in args.prompts.split("|") if p.strip()]
        if not prompts:
            parser.error("--prompts holds no prompt")
        if args.batch:
            prompts = [prompts[0]] * args.batch
        outs = run_prompts(engine, prompts, params, args.raw)
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            print(f"===== [{i + 1}/{len(outs)}] {prompt}")
            print(out.outputs[0].text.strip())
        return 0
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
