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


@pytest.mark.parametrize("args, message", [
    (["--prompts", "x", "--max-tokens", "-3"], "must be positive"),
    (["--prompts", "x", "--dtype", "f8"], "invalid choice"),
    (["--prompts", "x", "--kvmem", "lots"], "invalid int value"),
    (["--prompts", "x", "--d", "0,0"], "distinct"),
    (["--bogus"], "unrecognized arguments"),
    (["--w", "/nonexistent/model", "--prompts", "x"], "no such model file or folder"),
])
def test_user_mistakes_are_one_line(args, message):
    r = cli(*args, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    r = cli("--w", str(tmp_path), "--prompts", "x", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unsupported architecture 'GPT2LMHeadModel'" in r.stderr
