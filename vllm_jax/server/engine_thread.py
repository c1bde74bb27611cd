"""The engine in one background thread: the only thread that ever touches the LLMEngine.

Other threads send commands (add, abort) through a queue; each request's outputs go to the
callback given with it, called on the engine thread (the server forwards them to its event
loop with `loop.call_soon_threadsafe`).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("vllm_jax")

Sink = Callable[[object], None]  # receives a RequestOutput, or the exception that ended it


class EngineThread:
    def __init__(self, load: Callable[[], object], metrics=None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self._load = load
        self.metrics = metrics
        self.on_load_error = on_load_error
        self.engine = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vllm_jax-engine", daemon=True)

    # -- called from other threads ----------------------------------------------------------------
    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 10.0):
        self._stop = True
        self._commands.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def add(self, request_id: str, prompt_ids: list[int], params, sink: Sink):
        self._commands.put(("add", request_id, prompt_ids, params, sink, time.monotonic()))

    def abort(self, request_id: str):
        self._commands.put(("abort", request_id))

    def call(self, fn: Callable[[object], object], timeout: float = 60.0):
        """Run fn(engine) on the engine thread between steps and return its result."""
        done, box = threading.Event(), {}

        def run(engine):
            try:
                box["value"] = fn(engine)
            except BaseException as e:  # handed back to the caller
                box["error"] = e
            done.set()

        self._commands.put(("call", run))
        if not done.wait(timeout):
            raise TimeoutError("the engine thread did not answer")
        if "error" in box:
            raise box["error"]
        return box["value"]

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self):
        try:
            self.engine = self._load()
        except BaseException as e:
            log.error("could not load the model: %s", e)
            self.error = e
            self.ready.set()
            if self.on_load_error:
                self.on_load_error(e)
            return
        self.ready.set()
        if self.metrics:
            self.metrics.attach(self.engine)
        while not self._stop:
            self._drain(block=not self.engine.has_unfinished_requests())
            if self.engine.has_unfinished_requests():
                self._step()
            if self.metrics:
                self.metrics.tick(self.engine)
        for sink in self._sinks.values():
            sink(RuntimeError("the server is shutting down"))

    def _drain(self, block: bool):
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
            while True:
                self._handle(cmd)
                cmd = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, cmd):
        kind = cmd[0]
        if kind == "add":
            _, request_id, prompt_ids, params, sink, arrival = cmd
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except Exception as e:  # refused (ValueError) or a bug: this request's answer
                sink(e)
                return
            self._sinks[request_id] = sink
            if self.metrics:
                self.metrics.on_add(request_id, arrival)
        elif kind == "abort":
            request_id = cmd[1]
            if self._sinks.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
                if self.metrics:
                    self.metrics.on_finish(request_id, None, aborted=True)
        elif kind == "call":
            cmd[1](self.engine)

    def _step(self):
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug in the engine's own recovery: fail all, keep serving
            log.exception("engine step failed")
            for request_id, sink in list(self._sinks.items()):
                self.engine.abort_request(request_id)
                sink(e)
            self._sinks.clear()
            return
        now = time.monotonic()
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if self.metrics:
                self.metrics.on_output(out, now)
            if out.finished:
                del self._sinks[out.request_id]
                if self.metrics:
                    self.metrics.on_finish(out.request_id, out, now=now)
            sink(out if out.error is None else out.error)
