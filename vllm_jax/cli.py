"""python -m vllm_jax.cli: run a batch of prompts, chat (--i) or serve (--server)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from vllm_jax.args import Parser, add_engine_args, engine_config, positive
from vllm_jax.config import ConfigError
from vllm_jax.server import add_server_args, server_options


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m vllm_jax.cli", description="Generate text with vllm_jax.")
    add_engine_args(p)
    p.add_argument("--prompts", help='prompts separated by "|", run as one batch')
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, no chat template")
    p.add_argument("--max-tokens", "--max", dest="max_tokens", type=positive(), default=256)
    p.add_argument("--temperature", type=float,
                   help="default: 0 (greedy) for --prompts; the chat: the model's "
                        "(generation_config.json, else llama.cpp's 0.8)")
    p.add_argument("--top-k", type=int, help="default: off for --prompts; the chat: the model's")
    p.add_argument("--top-p", type=float, help="default: off for --prompts; the chat: the model's")
    p.add_argument("--min-p", type=float, help="default: off for --prompts; the chat: the model's")
    p.add_argument("--batch", type=positive(), metavar="N",
                   help="benchmark: run the (first) prompt N times")
    p.add_argument("--i", action="store_true", help="interactive chat")
    p.add_argument("--server", action="store_true", help="serve the OpenAI-compatible API")
    add_server_args(p)
    p.add_argument("--save-gguf", metavar="PATH", help="write the (quantized) model as GGUF")
    return p


def render(engine, prompt: str, raw: bool) -> str:
    tok = engine.tokenizer
    if raw or not tok.chat_template:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True)


def run_prompts(engine, prompts: list[str], params, raw: bool):
    """Runs the prompts as one batch; prints vLLM.rs's stats lines, compile time on its own."""
    ids = [engine.add_request(engine.tokenizer.encode_prompt(render(engine, p, raw)), params)
           for p in prompts]
    num_prompt = sum(len(engine.requests[i].prompt_token_ids) for i in ids)
    done, first_token_at, last_report = {}, {}, time.monotonic()
    start, compile0 = time.monotonic(), engine.compile_seconds
    prefill_compile = None
    while len(done) < len(ids):
        for out in engine.step():
            first_token_at.setdefault(out.request_id, time.monotonic())
            if out.finished:
                done[out.request_id] = out
        if prefill_compile is None and len(first_token_at) == len(ids):
            prefill_compile = engine.compile_seconds - compile0
        now = time.monotonic()
        if now - last_report > 5:
            active = len(ids) - len(done)
            rate = engine.num_generated_tokens / max(now - start, 1e-9)
            print(f"[{active} active requests] {engine.num_generated_tokens} tokens generated "
                  f"({rate:.1f} tokens/s)", file=sys.stderr)
            last_report = now
    end, compiled = time.monotonic(), engine.compile_seconds - compile0
    outs = [done[i] for i in ids]
    generated = sum(len(o.token_ids) for r in outs for o in r.outputs)
    decode_tokens = generated - sum(len(r.outputs) for r in outs)
    pt = max(first_token_at.values()) - start - prefill_compile
    dt = end - max(first_token_at.values()) - (compiled - prefill_compile)
    print(f"Prompt tokens: {num_prompt} in {pt:.2f} s ({num_prompt / max(pt, 1e-9):.2f} tokens/s)",
          file=sys.stderr)
    print(f"[{len(ids)} requests] {generated} tokens generated in {pt + dt:.2f} s "
          f"(decoding throughput {decode_tokens / max(dt, 1e-9):.2f} tokens/s)", file=sys.stderr)
    print(f"Compiling (or loading compiled steps from the cache): {compiled:.2f} s",
          file=sys.stderr)
    return outs


def split_prompts(text: str) -> list[str]:
    """--prompts "a | b" -> ["a", "b"]; an empty prompt between separators is an error."""
    prompts = [p.strip() for p in text.split("|")]
    empty = [i + 1 for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"--prompts: prompt {empty[0]} of {len(prompts)} is empty")
    return prompts


def main(argv=None):
    # flax imports IPython (0.14 s of a 3 s start) only to ask whether it runs inside one
    sys.modules.setdefault("IPython", None)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)  # no probing of absent TPU/GPU plugins
    try:
        if args.server:
            from vllm_jax.server import serve
            return serve(engine_config(args), args.host, args.port, args.served_model_name,
                         args.log_interval, server_options(args), args.warmup)
        if args.i:
            from vllm_jax.repl import run_chat
            flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                     "min_p": args.min_p}
            return run_chat(engine_config(args, max_num_seqs=args.max_num_seqs or 1),
                            {k: v for k, v in flags.items() if v is not None})
        if not args.prompts and not args.save_gguf:
            parser.error("nothing to do: pass --prompts, --i or --server")
        from vllm_jax.engine.llm_engine import LLMEngine
        from vllm_jax.sampling_params import SamplingParams

        params = SamplingParams(temperature=args.temperature or 0.0, top_k=args.top_k or 0,
                                top_p=args.top_p or 1.0, min_p=args.min_p or 0.0,
                                max_tokens=args.max_tokens)
        prompts = split_prompts(args.prompts) if args.prompts else []
        if args.batch:
            prompts = [prompts[0]] * args.batch
        batch = {} if args.max_num_seqs else {"max_num_seqs": min(64, max(1, len(prompts)))}
        engine = LLMEngine(engine_config(args, **batch))
        if args.save_gguf:
            from vllm_jax.loader.quantize import save_engine_gguf
            save_engine_gguf(engine, args.save_gguf)
            print(f"wrote {args.save_gguf}", file=sys.stderr)
        if not prompts:
            return 0
        print("Sampling: " + ("greedy (--temperature to sample)" if params.temperature == 0 else
                              f"temperature {params.temperature}, top_k {params.top_k}, "
                              f"top_p {params.top_p}, min_p {params.min_p} (your flags)"),
              file=sys.stderr)
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
    code = main()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code or 0)  # the answers are out: skip ~0.5 s of JAX and thread teardown
