"""tools/gpu_preflight.py: the --cpu run passes every stage (the same code the GPU run takes,
kernels interpreted at tiny shapes), and a failing stage is recorded with its error, stops the
run and makes the exit status non-zero."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_preflight.py"


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, str(TOOL), "--cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cpu_preflight_passes_every_stage_and_marks_timings_not_meaningful(tmp_path):
    out = tmp_path / "x.json"
    proc = run_tool("--out", str(out))
    report = json.loads(out.read_text())
    failed = {s["name"]: s.get("error") for s in report["stages"] if not s["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    names = [s["name"] for s in report["stages"]]
    assert names == ["environment", "lowering", "correctness", "speed", "engine", "bench"]
    assert report["ok"] and report["cpu"]
    stages = {s["name"]: s for s in report["stages"]}
    assert all(r["meaningful"] is False for r in stages["speed"]["rows"])
    assert {r.get("impl") for r in stages["speed"]["rows"]} >= {"pallas decode", "pallas prefill"}
    # every kernel checked against XLA on both cache dtypes, and the engine ran tokens
    for kind in ("decode", "prefill", "qmatmul"):
        rows = [r for r in stages["correctness"]["rows"] if r["case"].startswith(kind)]
        assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}, kind
    assert all(sum(r["tokens_compared"]) > 0 for r in stages["engine"]["rows"])


def test_failed_bench_is_recorded_with_its_error_and_exit_status(tmp_path):
    out = tmp_path / "x.json"
    proc = run_tool("--stages", "environment,bench", "--bench-args", "--model-shape no-such",
                    "--out", str(out))
    report = json.loads(out.read_text())
    bench = report["stages"][-1]
    assert proc.returncode == 1 and not report["ok"]
    assert bench["name"] == "bench" and not bench["ok"]
    assert "invalid choice: 'no-such'" in bench["error"]


def load_tool():
    spec = importlib.util.spec_from_file_location("gpu_preflight", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_raising_stage_stops_the_run_and_its_exception_is_in_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # what --cpu sets; restored afterwards
    tool = load_tool()
    # json.loads(ctx) raises TypeError: a stage that breaks; "after" must then not run
    monkeypatch.setattr(tool, "STAGES", {"broken": "json:loads", "after": "json:dumps"})
    out = tmp_path / "x.json"
    status = tool.main(["--cpu", "--out", str(out), "--stages", "broken,after"])
    report = json.loads(out.read_text())
    assert status == 1 and not report["ok"]
    assert [s["name"] for s in report["stages"]] == ["broken"]
    assert report["stages"][0]["error"].startswith("TypeError")
    assert "Traceback" in report["stages"][0]["traceback"]
