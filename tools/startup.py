"""Start-up time: what `python -m vllm_jax.cli --prompts PROMPT` spends before and after the
first token, each run in a fresh process.

    python tools/startup.py                  # a warm start (compiled steps in the cache)
    python tools/startup.py --cold           # with an empty compiled-step cache
    python tools/startup.py --w gemma3-270m --runs 3

Prints import / load / compile / first-token / total seconds and peak RSS per run (a table) and
writes them as JSON. `llama-cli` runs the same prompt beside it when found in $LLAMA_CPP_BIN or
on PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the child: one CLI-shaped run, timestamps on stdout as one JSON line
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import jax
from vllm_jax.config import EngineConfig
from vllm_jax.engine.llm_engine import LLMEngine
from vllm_jax.sampling_params import SamplingParams
t_import = time.perf_counter()
model, prompt, max_tokens = sys.argv[1] or None, sys.argv[2], int(sys.argv[3])
engine = LLMEngine(EngineConfig(model_path=model, max_num_seqs=1))
t_load = time.perf_counter()
compile_load = engine.compile_seconds
tok = engine.tokenizer
text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if tok.chat_template else prompt
engine.add_request(tok.encode_prompt(text), SamplingParams(temperature=0, max_tokens=max_tokens))
first = None
while engine.has_unfinished_requests():
    if engine.step() and first is None:
        first = time.perf_counter()
end = time.perf_counter()
print("TIMES " + json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import,
                             "compile_s": engine.compile_seconds - compile_load,
                             "first_token_s": first - t0, "total_s": end - t0,
                             "tokens": engine.num_generated_tokens,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_ours(model: str | None, prompt: str, max_tokens: int, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, model or "", prompt, str(max_tokens)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TIMES ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("TIMES "):])
    out["wall_s"] = wall
    return out


def run_llama_cli(path: str, prompt: str, max_tokens: int) -> dict | None:
    folder = os.environ.get("LLAMA_CPP_BIN")
    tool = (shutil.which("llama-cli", path=folder) if folder else None) or shutil.which("llama-cli")
    if tool is None or not path.endswith(".gguf"):
        return None
    t = time.perf_counter()
    subprocess.run([tool, "-m", path, "-p", prompt, "-n", str(max_tokens), "-no-cnv",
                    "--temp", "0", "-t", str(os.cpu_count())], capture_output=True, text=True)
    return {"wall_s": time.perf_counter() - t}


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/startup.py", description=__doc__.split("\n")[0])
    p.add_argument("--w", help="model (default: the built-in model)")
    p.add_argument("--prompt", default="Hi")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="an empty compiled-step cache each run")
    p.add_argument("--json", default="startup.json")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from vllm_jax.loader.default_model import resolve_model_path

    path = resolve_model_path(args.w)  # fetched once, outside the timed runs
    rows = []
    for _ in range(args.runs):
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        with tempfile.TemporaryDirectory() as tmp:
            if args.cold:
                env["JAX_COMPILATION_CACHE_DIR"] = tmp
            rows.append(run_ours(path, args.prompt, args.max_tokens, env))
    print(f"{'run':<6}{'import':>8}{'load':>8}{'compile':>9}{'1st token':>11}{'total':>8}"
          f"{'wall':>8}{'peak RSS':>10}")
    for i, r in enumerate(rows):
        print(f"{i + 1:<6}{r['import_s']:8.2f}{r['load_s']:8.2f}{r['compile_s']:9.2f}"
              f"{r['first_token_s']:11.2f}{r['total_s']:8.2f}{r['wall_s']:8.2f}"
              f"{r['peak_rss_mb']:9.0f}M")
    result = {"model": path, "cold": args.cold, "runs": rows,
              "llama_cli": run_llama_cli(path, args.prompt, args.max_tokens)}
    if result["llama_cli"]:
        print(f"llama-cli, same prompt: {result['llama_cli']['wall_s']:.2f} s wall")
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
