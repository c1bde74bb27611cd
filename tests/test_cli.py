"""The command line: two prompts give two answers in order; user mistakes give one line, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vllm_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_two_prompts_two_answers_in_order(model_dir):
    from vllm_jax import LLM, SamplingParams

    path = str(model_dir("llama")[0])
    r = cli("--w", path, "--prompts", " Hello world |  How are you today? ", "--max-tokens", "8",
            "--kvmem", "8", "--max-model-len", "128", "--dtype", "f32")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("===== ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["[1/2] Hello world", "[2/2] How are you today?"]
    llm = LLM(model=path, dtype="f32", max_model_len=128, kvcache_mem_mb=8)
    want = llm.chat([[{"role": "user", "content": p}] for p in ("Hello world", "How are you today?")],
                    SamplingParams(temperature=0, max_tokens=8))
    for block, out in zip(blocks, want):
        assert "\n".join(block.splitlines()[1:]).strip() == out.outputs[0].text.strip()
    assert "Prompt tokens:" in r.stderr and "decoding throughput" in r.stderr
    assert "Prompt tokens:" not in r.stdout


def _rates(stderr: str) -> tuple[float, float, float]:
    """(prompt tokens/s, decode tokens/s, compile seconds) from the stats lines."""
    import re

    prompt = float(re.search(r"Prompt tokens: \d+ in [\d.]+ s \(([\d.]+) tokens/s\)", stderr)[1])
    decode = float(re.search(r"decoding throughput ([\d.]+) tokens/s", stderr)[1])
    compile_s = float(re.search(r"Compiling .*: ([\d.]+) s", stderr)[1])
    return prompt, decode, compile_s


def test_stats_lines_leave_compilation_out(model_dir, tmp_path):
    """A cold run (empty compiled-step cache: it compiles every step it runs) reports the decode
    rate of a warm run, not one diluted by seconds of compiling; compiling is its own line."""
    import os

    path = str(model_dir("llama")[0])
    args = ("--w", path, "--prompts", "Hello world", "--max-tokens", "24", "--kvmem", "8",
            "--max-model-len", "128", "--dtype", "f32", "--raw")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
    cold = subprocess.run([sys.executable, "-m", "vllm_jax.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)
    warm = subprocess.run([sys.executable, "-m", "vllm_jax.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr
    (_, cold_decode, cold_compile), (_, warm_decode, _) = _rates(cold.stderr), _rates(warm.stderr)
    decode_time = 23 / cold_decode
    assert cold_compile > 2 * decode_time  # compiling dominates a cold run of a tiny model...
    assert cold_decode > 0.4 * warm_decode  # ...and is not in its decode rate


@pytest.mark.parametrize("args, message", [
    (["--prompts", "x", "--max-tokens", "-3"], "must be positive"),
    (["--prompts", "x", "--dtype", "f8"], "invalid choice"),
    (["--prompts", "x", "--kvmem", "lots"], "invalid int value"),
    (["--prompts", "x", "--d", "0,0"], "distinct"),
    (["--bogus"], "unrecognized arguments"),
    (["--prompts", "a | | b"], "prompt 2 of 3 is empty"),
    (["--w", "/nonexistent/model", "--prompts", "x"], "no such model file or folder"),
])
def test_user_mistakes_are_one_line(args, message):
    r = cli(*args, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    if message in ("must be positive", "invalid choice", "invalid int value", "distinct",
                   "unrecognized arguments"):  # argparse's: the usage line and the reason only
        assert len(r.stderr.strip().splitlines()) == 2, r.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    r = cli("--w", str(tmp_path), "--prompts", "x", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unsupported architecture 'GPT2LMHeadModel'" in r.stderr


def test_default_model_run_holds_the_cache_one_prompt_needs(real_model):
    """One prompt on the default model: a KV cache for one sequence of max_model_len (4096
    tokens: 30 layers x K and V x 3 heads x 64 dims x 4 bytes = 180 MiB), not --kvmem's 4 GiB
    ceiling, and the whole run under 1.5 GB."""
    import re

    real_model("smollm2-135m")  # fetched beforehand, not inside the timed child
    # VmHWM: this process's own peak. ru_maxrss would also count the pytest process it was
    # forked from (Linux folds the parent's high-water mark into it across exec).
    wrapper = ("import re, sys\nfrom vllm_jax.cli import main\n"
               "try:\n    main()\n"
               "finally:\n    status = open('/proc/self/status').read()\n"
               "    print('PEAK_KB', re.search(r'VmHWM:\\s*(\\d+)', status)[1], file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", wrapper, "--prompts", "Hi", "--max-tokens", "4"],
                       capture_output=True, text=True, timeout=600)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    kv = re.search(r"KV cache: (\d+) tokens .* ([\d.]+) MiB per device", r.stderr)
    assert kv and int(kv[1]) == 4096 and float(kv[2]) == 30 * 2 * 3 * 64 * 4 * 4096 / 2**20
    peak = int(re.search(r"PEAK_KB (\d+)", r.stderr)[1]) / 2**20
    assert peak < 1.5, f"peak RSS {peak:.2f} GB"
