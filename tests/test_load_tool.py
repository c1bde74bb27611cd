"""tools/load.py against the server over loopback: every request's tokens counted, latencies
measured per stream, the table printed and the JSON written."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run_uvicorn

from vllm_jax import LLM
from vllm_jax.server import build_app
from vllm_jax.server.serving import ServerState

TOOL = Path(__file__).resolve().parent.parent / "tools" / "load.py"


@pytest.fixture(scope="module")
def load_tool():
    spec = importlib.util.spec_from_file_location("load_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def url(model_dir):
    llm = LLM(model=str(model_dir("llama")[0]), dtype="f32", max_model_len=256,
              kvcache_mem_mb=16, max_num_seqs=8)
    state = ServerState(lambda: llm.llm_engine, ["tiny"], log_interval=0.05)
    srv, thread, base = run_uvicorn(build_app(state))
    assert state.engine_thread.ready.wait(30)
    yield base + "/v1"
    srv.should_exit = True
    thread.join(30)


def test_load_counts_every_token_and_reports_latency_percentiles(load_tool, url, tmp_path,
                                                                 capsys):
    out = tmp_path / "load.json"
    load_tool.main(["--url", url, "--clients", "3", "--requests", "7", "--max-tokens", "5",
                    "--json", str(out)])
    summary = json.loads(out.read_text())
    assert summary["output_tokens"] == 7 * 5  # ignore_eos: exactly max_tokens each
    assert summary["model"] == "tiny" and summary["clients"] == 3
    ttft, gap = summary["ttft_s"], summary["inter_token_s"]
    assert 0 < ttft["p50"] <= ttft["p99"] < summary["wall_s"]
    assert 0 < gap["p50"] <= gap["p99"] < summary["wall_s"]
    assert summary["tokens_per_s"] == pytest.approx(35 / summary["wall_s"])
    table = capsys.readouterr().out
    assert "| 3 | 7 |" in table and f"{summary['tokens_per_s']:.1f}" in table
