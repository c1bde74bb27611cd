"""Speculative decoding on an edit workload: acceptance rate and speed-up against plain decoding.

    python tools/spec_bench.py --num-seqs 1,16 --output-len 128
    python tools/spec_bench.py --methods plain,ngram,draft --speculative-model smollm2-135m

Each prompt asks the model (through its chat template) to fix the typos in a paragraph or to
rename a variable in a function, so the answer copies much of the prompt. Greedy; every method
runs the same prompts once to compile, then once timed, and its output is compared with plain
decoding's. Prints a table and writes JSON (--json-out).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_jax.args import Parser, add_engine_args, engine_config, positive  # noqa: E402
from vllm_jax.engine.llm_engine import LLMEngine  # noqa: E402
from vllm_jax.engine.speculative import make_speculator  # noqa: E402
from vllm_jax.sampling_params import SamplingParams  # noqa: E402

TEXTS = [
    "The comittee met on tuesday to discus the new budjet. Most members agred that the "
    "spending on roads was to high, but nobody could say wich projects should be cut first.",
    "Our libary will be closed for renovasions from monday untill the end of the month. "
    "Books can still be returnd at the front desk, and late fees will be waived durring this "
    "time.",
    "She opend the window and looked out at the garden. The roses were in full bloom and the "
    "air smelld of rain; somewere a dog was barking at the postman.",
    "To instal the program, downlaod the archive, unpack it in a new folder and run the setup "
    "scipt. If the instalation fails, check that you have enuogh disk space.",
]
CODE = [
    "def total(xs):\n    s = 0\n    for x in xs:\n        s = s + x\n    return s\n",
    "def mean(values):\n    n = len(values)\n    if n == 0:\n        return 0.0\n"
    "    return sum(values) / n\n",
    "def longest(words):\n    best = ''\n    for w in words:\n        if len(w) > len(best):\n"
    "            best = w\n    return best\n",
    "def count_vowels(text):\n    c = 0\n    for ch in text.lower():\n        if ch in 'aeiou':\n"
    "            c += 1\n    return c\n",
]


def edit_tasks() -> list[str]:
    return ([f"Fix the typos in this text and write it out again in full:\n\n{t}" for t in TEXTS]
            + [f"Rename the variable in this function to a clearer name and write out the whole "
               f"function:\n\n{c}" for c in CODE])


def prompts(engine: LLMEngine, n: int) -> list[str]:
    tasks = edit_tasks()
    return [engine.tokenizer.apply_chat_template([{"role": "user", "content": tasks[i % len(tasks)]}])
            for i in range(n)]


def run(engine: LLMEngine, batch: list[str], params: SamplingParams) -> tuple[float, list]:
    """-> (generated tokens per second, each output's token ids)."""
    start = time.perf_counter()
    outs = engine.generate(batch, params)
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(map(len, tokens)) / (time.perf_counter() - start), tokens


def compare(engine: LLMEngine, speculators: dict, batch: list[str], params: SamplingParams,
            repeats: int) -> list[dict]:
    """Each method once to compile, then `repeats` rounds of every method in turn (so a busy
    spell on the shared cores hits them alike): median, min and max throughput."""
    rates, outputs = {m: [] for m in speculators}, {}
    for method, speculator in speculators.items():
        engine.speculator = speculator
        engine.generate(batch, params)
    before = {m: copy.copy(s.stats) for m, s in speculators.items() if s}
    for _ in range(repeats):
        for method, speculator in speculators.items():
            engine.speculator = speculator
            rate, outputs[method] = run(engine, batch, params)
            rates[method].append(rate)
    rows = []
    for method, speculator in speculators.items():
        r = rates[method]
        row = dict(method=method, num_seqs=len(batch), tok_s=statistics.median(r),
                   tok_s_min=min(r), tok_s_max=max(r), outputs=outputs[method])
        if speculator:
            row.update(spec_stats(speculator.stats, before[method]))
        rows.append(row)
    for row in rows:
        row["speedup"] = row["tok_s"] / rows[0]["tok_s"]
    engine.speculator = None
    return rows


def spec_stats(now, before) -> dict:
    drafted = now.draft_tokens - before.draft_tokens
    accepted = now.accepted_tokens - before.accepted_tokens
    verified = now.rows - before.rows
    return dict(draft_tokens=drafted, accepted_tokens=accepted, spec_steps=now.steps - before.steps,
                acceptance_rate=accepted / drafted if drafted else 0.0,
                tokens_per_row_step=(now.emitted_tokens - before.emitted_tokens) / verified
                if verified else 0.0)


def main(argv=None):
    p = Parser(prog="tools/spec_bench.py", description=__doc__.split("\n")[0])
    add_engine_args(p, kvmem=512)
    p.add_argument("--num-seqs", default="1,16", help="batch sizes, comma-separated")
    p.add_argument("--output-len", type=positive(), default=128)
    p.add_argument("--k", type=positive(), default=4, help="n-gram proposals per step")
    p.add_argument("--disable-by-batch-size", type=positive(), metavar="N",
                   help="n-gram: decode plainly in steps of more than N sequences")
    p.add_argument("--methods", default="plain,ngram",
                   help="plain, ngram, draft (draft: --speculative-model and "
                        "--num-speculative-tokens)")
    p.add_argument("--repeats", type=positive(), default=3,
                   help="timed runs per method (other processes share the cores: ranges)")
    p.add_argument("--json-out", default="spec_bench.json")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    sizes = [int(n) for n in args.num_seqs.split(",")]
    if "draft" in methods and not (args.speculative_config or {}).get("model"):
        p.error("--methods draft needs --speculative-model and --num-speculative-tokens")
    # no prefix caching: the timed run would compute only the prompts' tails
    engine = LLMEngine(engine_config(args, max_num_seqs=max(sizes), enable_prefix_caching=False,
                                     max_model_len=args.max_model_len or 1024))
    speculators = {"plain": None, "draft": engine.speculator,
                   "ngram": make_speculator(engine, {
                       "method": "ngram", "num_speculative_tokens": args.k,
                       "prompt_lookup_max": 4, "prompt_lookup_min": 1,
                       "disable_by_batch_size": args.disable_by_batch_size})}
    speculators = {m: speculators[m] for m in methods}
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    rows = []
    for n in sizes:
        batch = prompts(engine, n)
        engine.speculator = None
        _, reference = run(engine, batch, params)
        for row in compare(engine, speculators, batch, params, args.repeats):
            row["same_as_plain"] = row.pop("outputs") == reference
            rows.append(row)
    print_table(rows)
    Path(args.json_out).write_text(json.dumps(dict(config=vars(args), rows=rows), indent=1))


def print_table(rows: list[dict]):
    head = ("method", "seqs", "tok/s", "range", "speed-up", "accept", "tok/verify", "same")
    print(" | ".join(f"{h:>10}" for h in head))
    for r in rows:
        cells = (r["method"], r["num_seqs"], f"{r['tok_s']:.1f}",
                 f"{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}",
                 f"{r['speedup']:.2f}",
                 f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "-",
                 f"{r['tokens_per_row_step']:.2f}" if "tokens_per_row_step" in r else "-",
                 r["same_as_plain"])
        print(" | ".join(f"{str(c):>10}" for c in cells))


if __name__ == "__main__":
    main()
