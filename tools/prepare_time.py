"""Milliseconds the host spends in ModelRunner.prepare for one decode step: the per-step
block-table and sampling-array build, with no model and no device.

    python tools/prepare_time.py --seqs 16 256 --context 1024 8192 --json prepare_time.json

The runner holds only what prepare reads (page size, pages, eos ids); sequences are fake,
each with its own pages. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax.engine.scheduler import ScheduledBatch  # noqa: E402
from vllm_jax.engine.sequence import Sequence, SequenceStatus  # noqa: E402
from vllm_jax.runner.model_runner import ModelRunner, pick  # noqa: E402
from vllm_jax.sampling_params import SamplingParams  # noqa: E402

PAGE = 16


def host_runner(max_len: int, num_pages: int, page_size: int = PAGE) -> ModelRunner:
    """A runner without a model: prepare and layout_for need only these fields."""
    runner = ModelRunner.__new__(ModelRunner)
    runner.page_size, runner.num_pages, runner.eos_ids = page_size, num_pages, [0]
    runner.max_model_len, runner.max_pages = max_len, -(-max_len // page_size)
    runner.seq_buckets = [2 ** i for i in range(9)]
    return runner


def decode_batch(num_seqs: int, context: int) -> ScheduledBatch:
    pages = -(-(context + 1) // PAGE)
    seqs = []
    for i in range(num_seqs):
        seq = Sequence(list(range(context)), SamplingParams(temperature=0.7, top_p=0.9), seed=i)
        seq.token_ids.append(1)
        seq.status, seq.num_computed_tokens = SequenceStatus.RUNNING, context
        seq.block_table.extend(range(i * pages, (i + 1) * pages))
        seqs.append(seq)
    return ScheduledBatch(True, seqs, [1] * num_seqs, num_seqs)


def time_prepare(num_seqs: int, context: int, repeat: int) -> float:
    runner = host_runner(context + 64, num_seqs * (-(-(context + 1) // PAGE)))
    batch = decode_batch(num_seqs, context)
    layout = runner.layout_for(batch)
    assert layout.num_seqs == pick(runner.seq_buckets, num_seqs)
    runner.prepare(batch, layout)
    number = max(1, 200 // num_seqs)
    best = min(timeit.repeat(lambda: runner.prepare(batch, layout), number=number, repeat=repeat))
    return 1e3 * best / number


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[16, 256])
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [{"num_seqs": s, "context": c, "prepare_ms": round(time_prepare(s, c, args.repeat), 3)}
            for s in args.seqs for c in args.context]
    print(f"{'seqs':>6} {'context':>8} {'prepare ms (best)':>18}")
    for r in rows:
        print(f"{r['num_seqs']:>6} {r['context']:>8} {r['prepare_ms']:>18.3f}")
    if args.json:
        args.json.write_text(json.dumps({"page_size": PAGE, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
