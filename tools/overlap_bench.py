"""Decode with and without async scheduling (and with runs of K decode steps in one dispatch),
interleaved in one process, so every mode sees the same machine load: per mode, decode tok/s,
ms per step, and the host's busy ms per step (the step's wall time less the time it waited for
the device in jax.device_get: all of it adds to the step without async scheduling, it overlaps
the device's work with it). A run of K steps counts as K steps. Compile time, if any, is left
out.

    python tools/overlap_bench.py --num-seqs 1 16 256 --input-len 128 --output-len 128 \
        --rounds 3 --json overlap.json
    python tools/overlap_bench.py --num-seqs 1 16 --runs-of 4 8 --rounds 5

Requests: random token ids, greedy, ignore_eos, detokenized (the host work a server does).
Prints median and range over the rounds, and each round's ratio of each mode to sync (the runs
of a round are back to back, and their order alternates: the ratio is what to compare on a
machine whose load changes); writes JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench import HostClock, StepCounter, prompts_done  # noqa: E402
from vllm_jax.args import Parser, add_engine_args, engine_config, positive  # noqa: E402
from vllm_jax.engine.llm_engine import LLMEngine  # noqa: E402
from vllm_jax.sampling_params import SamplingParams  # noqa: E402

def decode_run(engine, prompts, output_len: int, mode: tuple[bool, int]) -> dict:
    """One batch to completion (mode: async scheduling, decode steps per dispatch); figures
    over its pure-decode steps."""
    engine.config.async_scheduling, engine.scheduler.decode_steps = mode
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while not prompts_done(engine.scheduler):
        engine.step()
    device_get = jax.device_get
    waited = HostClock(jax, ["device_get"])
    schedule = engine.scheduler.schedule
    counter = StepCounter(engine.scheduler)
    gen0, t = engine.num_generated_tokens, time.perf_counter()
    compiled = engine.compile_seconds
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        jax.device_get, engine.scheduler.schedule = device_get, schedule
    steps = max(counter.steps, 1)
    wall = time.perf_counter() - t - (engine.compile_seconds - compiled)
    return dict(decode_tok_s=(engine.num_generated_tokens - gen0) / wall,
                step_ms=1000 * wall / steps,
                host_ms=1000 * (wall - waited.seconds["device_get"]) / steps)


def summary(runs: list[dict]) -> dict:
    return {k: dict(median=statistics.median(r[k] for r in runs),
                    low=min(r[k] for r in runs), high=max(r[k] for r in runs))
            for k in runs[0]}


def main(argv=None):
    p = Parser(prog="tools/overlap_bench.py", description=__doc__.split("\n")[0])
    add_engine_args(p, dtype="f32", kvmem=512)
    p.add_argument("--num-seqs", type=positive(), nargs="+", default=[1, 16])
    p.add_argument("--input-len", type=positive(), default=128)
    p.add_argument("--output-len", type=positive(), default=128)
    p.add_argument("--rounds", type=positive(), default=3)
    p.add_argument("--runs-of", type=positive(), nargs="+", default=[], metavar="K",
                   help="also async with runs of K decode steps in one dispatch")
    p.add_argument("--json", default="overlap.json")
    args = p.parse_args(argv)
    modes = {"sync": (False, 1), "async": (True, 1),
             **{f"async x{k}": (True, k) for k in args.runs_of if k > 1}}
    result = {}
    for n in args.num_seqs:
        engine = LLMEngine(engine_config(args, max_num_seqs=n,
                                         max_model_len=args.input_len + args.output_len + 16))
        rng = np.random.default_rng(0)
        vocab = engine.model_config.vocab_size
        prompts = [[int(x) for x in rng.integers(100, vocab - 100, args.input_len)]
                   for _ in range(n)]
        for k in {1, *args.runs_of}:  # compiles the buckets every mode uses
            decode_run(engine, prompts, k + 3, (True, k))
        runs = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode, m in list(modes.items())[::1 if r % 2 == 0 else -1]:  # order alternates
                engine.block_manager.reset_prefix_cache()  # every round prefills alike
                runs[mode].append(decode_run(engine, prompts, args.output_len, m))
        speedups = {mode: [a["decode_tok_s"] / s["decode_tok_s"]
                           for s, a in zip(runs["sync"], r)]
                    for mode, r in runs.items() if mode != "sync"}
        result[n] = {**{mode: summary(r) for mode, r in runs.items()}, "runs": runs,
                     "speedup_per_round": speedups}
        for mode in modes:
            print(f"{n:>4} seqs {mode:>8}: " + "  ".join(
                f"{k} {v['median']:.2f} ({v['low']:.2f}-{v['high']:.2f})"
                for k, v in result[n][mode].items()))
        for mode, ratios in speedups.items():
            print(f"{n:>4} seqs {mode}/sync tok/s per round: "
                  + " ".join(f"{x:.2f}" for x in ratios))
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
