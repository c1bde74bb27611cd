"""The interactive chat, driven through a pseudo-terminal; history trimming without one."""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest

from vllm_jax.repl import Chat
from vllm_jax.sampling_params import SamplingParams

pexpect = pytest.importorskip("pexpect")
# pexpect forks and at once execs the chat in a fresh interpreter: JAX's threads do not matter.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called")

STATS = r"\[ Prompt: [\d.]+ t/s \| Generation: [\d.]+ t/s \] \d+ of 512 context tokens left"


@pytest.fixture
def spawn_chat(model_dir):
    """spawn_chat(setup="") -> the chat in a pseudo-terminal; `setup` runs first in the child."""
    path = model_dir("llama")[0]
    children = []

    def spawn(setup: str = ""):
        # every engine step takes >= 10 ms and computes one token (decode_steps=1), so an
        # answer of 100 tokens outlasts the 0.3 s before the Ctrl+C below however fast this
        # machine runs the tiny model
        script = (setup + "import sys, time; from vllm_jax.repl import run_chat; "
                  "from vllm_jax.engine.llm_engine import LLMEngine; step = LLMEngine.step; "
                  "LLMEngine.step = lambda self: (time.sleep(0.01), step(self))[1]; "
                  "from vllm_jax import EngineConfig, SamplingParams; "
                  f"sys.exit(run_chat(EngineConfig(model_path={str(path)!r}, dtype='f32', "
                  "max_model_len=512, kvcache_mem_mb=16, max_num_seqs=2, decode_steps=1), "
                  "dict(temperature=0, max_tokens=100, ignore_eos=True)))")
        child = pexpect.spawn(sys.executable, ["-c", script], encoding="utf-8", timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "TERM": "dumb"},
                              dimensions=(50, 200))
        children.append(child)
        return child

    yield spawn
    for child in children:
        if child.isalive():
            child.terminate(force=True)


@pytest.fixture
def chat(spawn_chat):
    return spawn_chat()


def test_chat_in_a_terminal(chat):
    chat.expect(">>> ")
    chat.sendline("Hello there")
    chat.expect(STATS)
    chat.expect(">>> ")
    chat.sendline("And a second question")
    chat.expect(STATS)
    chat.expect(">>> ")
    chat.sendline("/regen")
    chat.expect(STATS)
    chat.expect(">>> ")
    chat.sendline("/clear")
    chat.expect(r"\(conversation cleared\)")
    chat.expect(">>> ")
    chat.sendline("Tell me a long story")
    chat.expect("story\r\n")
    chat.expect(r"\S")  # the answer has begun
    time.sleep(0.3)
    chat.sendintr()
    chat.expect(r"\[stopped\]")
    chat.expect(STATS)
    chat.expect(">>> ")
    chat.sendline("still here?")  # Ctrl+C stopped the answer, not the chat
    chat.expect(STATS)
    chat.expect(">>> ")
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


# A shell starts background jobs with SIGINT ignored, and exec keeps that: the chat must still
# take Ctrl+C (a test run started in the background spawns it so).
SIGINT_IGNORED = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "


@pytest.mark.parametrize("keys", ["ctrl-c twice", "ctrl-d"])
@pytest.mark.parametrize("setup", ["", SIGINT_IGNORED], ids=["", "sigint-ignored"])
def test_ctrl_c_twice_or_ctrl_d_at_the_prompt_exits(spawn_chat, keys, setup):
    chat = spawn_chat(setup)
    chat.expect(">>> ")
    if keys == "ctrl-d":
        chat.sendeof()
    else:
        chat.sendintr()
        chat.expect("Ctrl\\+C again")
        chat.expect(">>> ")
        chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


# A Ctrl+C at every prompt at the worst moment: readline's pre-input hook runs once the prompt
# is written, just before input() blocks in select(). raise(3) called from C (no Python code
# runs, so CPython's handler only sets its flag) is what a Ctrl+C sent by a fast reader of the
# prompt does to a slow chat; without the chat's ticks the flag waited for the next key press.
CTRL_C_BEFORE_SELECT = (
    "import ctypes, functools, signal, readline; readline.set_pre_input_hook("
    "functools.partial(getattr(ctypes.CDLL(None), 'raise'), signal.SIGINT)); ")


def test_ctrl_c_just_before_input_blocks_is_not_lost(spawn_chat):
    readline = pytest.importorskip("readline")
    if not hasattr(readline, "set_pre_input_hook"):
        pytest.skip("this readline has no pre-input hook")
    chat = spawn_chat(CTRL_C_BEFORE_SELECT)
    chat.expect(">>> ")
    chat.expect("Ctrl\\+C again", timeout=30)  # after the model has loaded: within 0.1 s
    chat.expect(pexpect.EOF, timeout=30)  # the second prompt's Ctrl+C
    chat.close()
    assert chat.exitstatus == 0


class FakeEngine:
    """One token per character of each message: enough to test the context arithmetic."""

    max_model_len = 100

    def encode_chat(self, messages):
        return [0] * sum(len(m["content"]) + 2 for m in messages)


def test_history_keeps_turns_that_fit_and_drops_the_oldest():
    chat = Chat(FakeEngine(), SamplingParams(max_tokens=20), system="sys")
    chat.turns += [{"role": "user", "content": "a" * 10},
                   {"role": "assistant", "content": "b" * 10},
                   {"role": "user", "content": "c" * 10}]
    ids, dropped = chat.fit()
    assert dropped == 0 and len(ids) == 5 + 36 and len(chat.turns) == 3
    chat.turns += [{"role": "assistant", "content": "d" * 30},
                   {"role": "user", "content": "e" * 10}]
    ids, dropped = chat.fit()  # 5 + 80 > 100 - 20: the first user/assistant pair goes
    assert dropped == 2 and [t["content"][0] for t in chat.turns] == ["c", "d", "e"]
    assert len(ids) <= 80 and chat.context_left() == 100 - len(ids)


def test_a_message_too_long_for_the_context_is_dropped():
    from vllm_jax.repl import answer

    chat = Chat(FakeEngine(), SamplingParams(max_tokens=20))
    chat.turns.append({"role": "user", "content": "x" * 200})
    out = SimpleNamespace(lines=[], write=lambda s: out.lines.append(s), flush=lambda: None)
    assert answer(chat, out)
    assert chat.turns == [] and "does not fit" in "".join(out.lines)
