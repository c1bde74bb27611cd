"""The same workload (prompt length, output length, number of sequences) through transformers
and llama.cpp, for tools/bench.py --compare. llama.cpp is its `llama-batched-bench` tool, found
in $LLAMA_CPP_BIN or on PATH (llama.cpp's own random prompts of the same length); each is
skipped when it is not installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _row(name, prefill_tps, decode_tps, note=""):
    print(f"  {name:<28} prefill {prefill_tps:8.1f} tok/s   decode {decode_tps:8.1f} tok/s  {note}")
    return {"prefill_tok_s": prefill_tps, "decode_tok_s": decode_tps, "note": note}


def run_transformers(path: str, prompts: list[list[int]], output_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(p.parent if kw else p, dtype=torch.float32, **kw)
    model.eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        mask = torch.ones_like(ids)
        model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2,
                       do_sample=False)  # warm-up
        t = time.perf_counter()
        model(ids)
        prefill = ids.numel() / (time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False)
        total = time.perf_counter() - t
    generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    # generate() includes one prefill: take it out to get the decode rate
    decode = (generated - ids.shape[0]) / max(total - ids.numel() / prefill, 1e-9)
    return _row(f"transformers {torch.__version__}", prefill, decode,
                f"{torch.get_num_threads()} threads, f32, batch {ids.shape[0]}")


def run_llama_cpp(path: str, prompts: list[list[int]], output_len: int) -> dict:
    folder = os.environ.get("LLAMA_CPP_BIN")
    tool = shutil.which("llama-batched-bench", path=folder) if folder else None
    tool = tool or shutil.which("llama-batched-bench")
    if tool is None:
        raise ImportError("llama.cpp", name="llama-batched-bench (set LLAMA_CPP_BIN)")
    n, length, threads = len(prompts), len(prompts[0]), os.cpu_count()
    cmd = [tool, "-m", path, "-npp", str(length), "-ntg", str(output_len), "-npl", str(n),
           "-t", str(threads), "-c", str(n * (length + output_len) + 64),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    return _row("llama.cpp (llama-batched-bench)", row["speed_pp"], row["speed_tg"],
                f"{threads} threads, batch {n}, f16 KV cache")


def compare(path: str, prompts: list[list[int]], output_len: int) -> dict:
    results = {}
    for name, fn in (("transformers", run_transformers), ("llama_cpp", run_llama_cpp)):
        if name == "llama_cpp" and not path.endswith(".gguf"):
            continue
        try:
            results[name] = fn(path, prompts, output_len)
        except ImportError as e:
            print(f"  {name:<28} not installed ({e.name})", file=sys.stderr)
    return results
