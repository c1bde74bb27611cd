"""GPU pre-flight: the first thing to run on a GPU. Stages stop at the first failure; the JSON
report is rewritten after every stage, so a run cut short still leaves what it learnt.

    python tools/gpu_preflight.py --out preflight.json            # on the GPU
    python tools/gpu_preflight.py --cpu --out /tmp/preflight.json  # interpreted, tiny shapes

Stages: environment (versions, devices, backend, dtype), lowering (every Pallas kernel lowers
and compiles, small and realistic shapes), correctness (Pallas against the XLA reference, NaN
in unused pages, bf16 and f32), speed (GB/s against a measured read), engine (a 2-layer model,
Pallas against XLA), bench (tools/bench.py on a model shape). Exit status 0 only when every
stage that ran passed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

from preflight import Context, error_text  # noqa: E402

STAGES = {  # name -> "module:function" (imported when the stage runs; see environment.py)
    "environment": "preflight.environment:environment",
    "lowering": "preflight.kernels:lowering",
    "correctness": "preflight.kernels:correctness",
    "speed": "preflight.speed:speed",
    "engine": "preflight.engine:engine",
    "bench": "preflight.engine:bench",
}
_HIDDEN = ("ok", "traceback", "bench_json")


def stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; choose from "
                                         f"{', '.join(STAGES)}")
    return [s for s in STAGES if s in names]


def run_stage(name: str, ctx: Context) -> dict:
    """{"name", "ok", "seconds", "rows", "error"?}: rows from the stage; ok when all rows are."""
    t = time.perf_counter()
    result = dict(name=name, ok=False, rows=[])
    try:
        module, fn = STAGES[name].split(":")
        result["rows"] = getattr(importlib.import_module(module), fn)(ctx)
        failed = [r for r in result["rows"] if not r.get("ok", True)]
        result["ok"] = not failed
        if failed:
            result["error"] = "; ".join(
                f"{r.get('case') or r.get('item')}: {r.get('error', 'outside tolerance')}"
                for r in failed)
    except Exception as e:  # noqa: BLE001 - the report carries it and the run stops
        result.update(error=error_text(e), traceback=traceback.format_exc())
    result["seconds"] = round(time.perf_counter() - t, 2)
    return result


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if not isinstance(v, (list, dict)) else json.dumps(v)[:60]


def print_table(result: dict):
    status = "PASS" if result["ok"] else "FAIL"
    print(f"\n== {result['name']}: {status} ({result['seconds']} s)")
    rows = result["rows"]
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in _HIDDEN]
    if rows:
        cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
        widths = [min(60, max(len(c), *(len(row[i]) for row in cells))) for i, c in
                  enumerate(cols)]
        print("  ".join(["ok  "] + [c.ljust(w) for c, w in zip(cols, widths)]))
        for r, row in zip(rows, cells):
            mark = "ok  " if r.get("ok", True) else "FAIL"
            print("  ".join([mark] + [v[:w].ljust(w) for v, w in zip(row, widths)]))
    if not result["ok"]:
        print(f"  error: {result.get('error', '')[:2000]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/gpu_preflight.py", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="run on the CPU: Pallas interpreted, tiny shapes (speed not meaningful)")
    p.add_argument("--stages", type=stage_list, default=list(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--out", default="preflight.json", help="the JSON report (default %(default)s)")
    p.add_argument("--keep-going", action="store_true",
                   help="run the later stages after a failed one")
    p.add_argument("--bench-args", type=shlex.split, metavar="ARGS",
                   help="tools/bench.py's arguments for the bench stage, quoted as one string")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    ctx = Context(cpu=args.cpu, bench_args=tuple(args.bench_args) if args.bench_args else None)
    report = dict(tool="gpu_preflight", argv=sys.argv[1:], cpu=args.cpu,
                  started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  stages=[], ok=True)
    out = Path(args.out)
    for name in args.stages:
        result = run_stage(name, ctx)
        report["stages"].append(result)
        report["ok"] &= result["ok"]
        out.write_text(json.dumps(report, indent=1, default=str))
        print_table(result)
        if not result["ok"] and not args.keep_going:
            break
    ran = [s["name"] for s in report["stages"]]
    print(f"\n{'all stages passed' if report['ok'] else 'FAILED'}: {', '.join(ran)} -> {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
