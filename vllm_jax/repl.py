"""Interactive chat in the terminal: `python -m vllm_jax.cli --i` calls run_chat().

Multi-turn history rendered through the model's chat template, answers streamed as they are
generated. Ctrl+C stops the answer and stays in the chat; Ctrl+D, /exit, or Ctrl+C twice at the
prompt leaves. When the history outgrows the context, the oldest turns are dropped.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time

from vllm_jax.api import Engine
from vllm_jax.config import EngineConfig
from vllm_jax.sampling_params import SamplingParams, describe

HELP = """commands:
  /clear   forget the conversation
  /regen   answer the last message again
  /exit    leave (also Ctrl+D, or Ctrl+C twice)
Ctrl+C while an answer streams stops it."""


class Chat:
    """The conversation and its fit in the context window; no terminal I/O."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine = engine
        self.params = params
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # alternating user / assistant messages

    @property
    def reserve(self) -> int:
        """Context kept free for the answer."""
        limit = self.engine.max_model_len
        return min(self.params.max_tokens or limit // 4, limit // 2)

    def prompt_ids(self) -> list[int]:
        return self.engine.encode_chat(self.system + self.turns)

    def fit(self) -> tuple[list[int], int]:
        """Prompt ids for the history, dropping the oldest turns until the answer has room;
        also how many messages were dropped."""
        dropped = 0
        budget = self.engine.max_model_len - self.reserve
        ids = self.prompt_ids()
        while len(ids) > budget and len(self.turns) > 1:
            cut = 2 if len(self.turns) > 2 else 1
            del self.turns[:cut]
            dropped += cut
            ids = self.prompt_ids()
        return ids, dropped

    def context_left(self) -> int:
        return max(0, self.engine.max_model_len - len(self.prompt_ids()))


class _Interrupt:
    """While active, Ctrl+C sets a flag (checked between engine steps) instead of raising, so
    the engine is never interrupted halfway through a step."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)


@contextlib.contextmanager
def _prompt_ticks(restart_reads: bool, interval: float = 0.1):
    """While input() waits, a no-op SIGALRM every `interval` seconds, so that a Ctrl+C is
    never lost at the prompt.

    CPython's SIGINT handler only sets a flag, checked when a system call fails with EINTR;
    a Ctrl+C landing after the prompt is written but before input() blocks in select()
    (readline) or read() (without readline) interrupts nothing, and the flag waited for the
    next key press. The ticks interrupt the wait: input() then sees the pending Ctrl+C and
    raises KeyboardInterrupt. select() is interrupted whatever SA_RESTART says; with readline
    (restart_reads) the ticks restart reads and writes instead of failing them.
    """
    if not hasattr(signal, "setitimer"):  # Windows
        yield
        return
    old = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.siginterrupt(signal.SIGALRM, not restart_reads)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def answer(chat: Chat, out=sys.stdout) -> bool:
    """Generate and print the reply to the history; False if it was interrupted."""
    ids, dropped = chat.fit()
    if dropped:
        print(f"(the conversation outgrew the context of {chat.engine.max_model_len} tokens: "
              f"dropped the oldest {dropped} message(s))", file=out)
    if len(ids) >= chat.engine.max_model_len - 1:
        print("(this message alone does not fit in the context; it was dropped)", file=out)
        chat.turns.pop()
        return True
    start = time.monotonic()
    first = last = None
    text, tokens, cached = "", 0, 0
    stream = chat.engine.stream(chat.params, ids)
    with _Interrupt() as interrupt:
        try:
            for result in stream:
                now = time.monotonic()
                first = first or now
                last = now
                c = result.outputs[0]
                tokens, cached = len(c.token_ids), result.num_cached_tokens
                out.write(c.text[len(text):])
                out.flush()
                text = c.text
                if interrupt.hit:
                    break
        finally:
            stream.close()
    chat.turns.append({"role": "assistant", "content": text})
    if interrupt.hit:
        print(" [stopped]", file=out)
    else:
        print(file=out)
    if first is not None:
        prompt_rate = (len(ids) - cached) / max(first - start, 1e-9)
        gen_rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
        print(f"[ Prompt: {prompt_rate:.1f} t/s | Generation: {gen_rate:.1f} t/s ] "
              f"{chat.context_left()} of {chat.engine.max_model_len} context tokens left",
              file=out)
    return not interrupt.hit


def run_chat(engine_config: EngineConfig, overrides: dict | None = None,
             system: str | None = None) -> int:
    """The chat loop. Sampling: the model's defaults (generation_config.json, else llama.cpp's),
    with `overrides` (SamplingParams fields: the flags the user gave) on top."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
        has_readline = True
    except ImportError:
        has_readline = False
    # Ctrl+C is the chat's own key, also when it was started with SIGINT ignored (as a shell
    # starts background jobs, which the ignored disposition survives exec into)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("loading the model ...", file=sys.stderr, flush=True)
    engine = Engine(engine_config)
    if not engine.tokenizer.chat_template:
        print("this model has no chat template; use --prompts instead", file=sys.stderr)
        return 2
    llm = engine.llm_engine
    chosen = {**llm.sampling_defaults, **(overrides or {})}
    params = SamplingParams(**{"max_tokens": None, **chosen})
    source = llm.sampling_defaults_source + (" and your flags" if overrides else "")
    chat = Chat(engine, params, system)
    print(f"chatting with {engine_config.model_path or 'the default model'} "
          f"(context {engine.max_model_len} tokens; sampling {describe(chosen)}, from {source}); "
          f"/help for commands")
    interrupted = False
    while True:
        try:
            with _prompt_ticks(restart_reads=has_readline):
                line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print()
                return 0
            interrupted = True
            print("\n(Ctrl+C again or Ctrl+D to exit)")
            continue
        interrupted = False
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/help":
            print(HELP)
        elif line == "/clear":
            chat.turns.clear()
            print("(conversation cleared)")
        elif line == "/regen":
            if chat.turns and chat.turns[-1]["role"] == "assistant":
                chat.turns.pop()
            if not chat.turns:
                print("(nothing to regenerate)")
                continue
            answer(chat)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; /help lists them")
        else:
            chat.turns.append({"role": "user", "content": line})
            answer(chat)
