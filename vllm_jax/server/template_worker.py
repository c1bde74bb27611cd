"""Request-supplied chat templates, rendered where a hostile one can be stopped.

A Jinja template runs as Python in the thread that renders it, and a thread cannot be killed: a
template of nested loops would keep its thread (and the GIL) busy for as long as it likes. So a
template that comes with a request renders in a worker process (this module run as `-m`), one
job at a time, with a memory cap; the server kills the process when a job runs past the time
limit and starts another for the next job. A rendered prompt longer than `max_chars` is refused.

The pipe carries one JSON line per job and one per reply ({"text"} or {"error"}), ASCII-escaped
so that any string (lone surrogates too) goes through.
"""
from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
from pathlib import Path

WORKER_MEMORY_BYTES = 1 << 30  # on top of what the worker uses when it starts
READY = b"ready\n"


class TemplateError(ValueError):
    """The template failed, ran too long, or rendered too much."""


class TemplateWorker:
    def __init__(self, timeout_s: float, max_chars: int):
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._proc: subprocess.Popen | None = None
        self._lock = asyncio.Lock()

    async def render(self, template: str, messages: list[dict], special_tokens: dict[str, str],
                     add_generation_prompt: bool, tools, kwargs: dict) -> str:
        job = {"template": template, "messages": messages, "special_tokens": special_tokens,
               "add_generation_prompt": add_generation_prompt, "tools": tools, "kwargs": kwargs,
               "max_chars": self.max_chars}
        line = json.dumps(job).encode() + b"\n"
        async with self._lock:
            reply = await self._run(line)
        if "error" in reply:
            raise TemplateError(reply["error"])
        return reply["text"]

    def close(self):
        proc = self._stop()
        if proc is not None:
            proc.wait()

    async def _run(self, line: bytes) -> dict:
        loop = asyncio.get_running_loop()
        if self._proc is None or self._proc.poll() is not None:
            self._proc = await loop.run_in_executor(None, _start_worker)
        # The exchange blocks a pool thread, not the loop; killing the worker ends it.
        exchange = loop.run_in_executor(None, _exchange, self._proc, line)
        try:
            reply = await asyncio.wait_for(exchange, self.timeout_s)
        except asyncio.TimeoutError:
            self._stop()
            raise TemplateError(f"it ran longer than {self.timeout_s:g} s") from None
        except BaseException:  # a broken pipe, a cancelled request: the worker may still be
            self._stop()       # busy with this job, so it goes
            raise
        if not reply:
            self._stop()
            raise TemplateError("the template worker died (out of memory?)")
        return json.loads(reply)

    def _stop(self) -> subprocess.Popen | None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        return proc


def _exchange(proc: subprocess.Popen, line: bytes) -> bytes:
    proc.stdin.write(line)
    proc.stdin.flush()
    return proc.stdout.readline()


def _start_worker() -> subprocess.Popen:
    """A worker that has imported what it renders with: its start-up (a second or more on a
    busy machine) is not counted against the first template's time limit."""
    # subprocess (not the event loop's own spawning, which runs fork handlers in the child of a
    # multithreaded process); run from the folder holding this package, to import this code.
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "vllm_jax.server.template_worker"], cwd=root,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if proc.stdout.readline() != READY:
        proc.kill()
        raise TemplateError("the template worker did not start")
    return proc


# -- the worker process ----------------------------------------------------------------------------

def _cap_memory():
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = in_use + WORKER_MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))


def _render(job: dict) -> dict:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from vllm_jax.tokenizer import Tokenizer

    # Templates see the special tokens' text, never the vocabulary: an empty one will do.
    tok = Tokenizer(Backend(models.BPE()), job["special_tokens"])
    try:
        text = tok.apply_chat_template(job["messages"], job["add_generation_prompt"], job["tools"],
                                       chat_template=job["template"], **job["kwargs"])
    except Exception as e:  # whatever the template did, it is the request's error
        return {"error": str(e) or type(e).__name__}
    if len(text) > job["max_chars"]:
        return {"error": f"it rendered more than {job['max_chars']} characters"}
    return {"text": text}


def main():
    import vllm_jax.tokenizer  # noqa: F401  (before the first job's clock starts)

    try:
        _cap_memory()
    except (OSError, ValueError):  # no /proc or no RLIMIT_AS here: the time limit still holds
        pass
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    for line in sys.stdin.buffer:
        sys.stdout.write(json.dumps(_render(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
