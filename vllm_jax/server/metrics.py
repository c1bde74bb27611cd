"""Prometheus metrics (vLLM's names) and the periodic stats log line; fed by the engine thread."""
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("vllm_jax")

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class _Timing:
    __slots__ = ("arrival", "first", "last", "tokens")

    def __init__(self, arrival: float):
        self.arrival, self.first, self.last, self.tokens = arrival, None, None, 0


class Metrics:
    def __init__(self, model_name: str, log_interval: float = 5.0):
        self.registry = r = CollectorRegistry()
        self.log_interval = log_interval
        name = [model_name]

        def gauge(metric, doc):
            return Gauge(metric, doc, ["model_name"], registry=r).labels(*name)

        def counter(metric, doc):
            return Counter(metric, doc, ["model_name"], registry=r).labels(*name)

        def histogram(metric, doc):
            return Histogram(metric, doc, ["model_name"], buckets=LATENCY_BUCKETS,
                             registry=r).labels(*name)

        self.running = gauge("vllm:num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = 100%).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.preemptions = counter("vllm:num_preemptions", "Sequences preempted.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt pages looked up.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt pages found cached.")
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, end to end.")
        self.success = Counter("vllm:request_success", "Finished requests.",
                               ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        self._timings: dict[str, _Timing] = {}
        self._seen = {"prompt": 0, "generated": 0, "preemptions": 0, "queries": 0, "hits": 0}
        self._last_log = time.monotonic()
        self._logged = dict(self._seen)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- engine thread ----------------------------------------------------------------------------
    def attach(self, engine):
        self._seen = self._engine_counts(engine)
        self._logged = dict(self._seen)

    def on_add(self, request_id: str, arrival: float):
        self._timings[request_id] = _Timing(arrival)

    def on_output(self, out, now: float):
        t = self._timings.get(out.request_id)
        if t is None:
            return
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if tokens > t.tokens:
            if t.first is None:
                t.first = now
                self.ttft.observe(now - t.arrival)
            else:
                gap = (now - t.last) / (tokens - t.tokens)
                for _ in range(tokens - t.tokens):
                    self.itl.observe(gap)
            t.last, t.tokens = now, tokens

    def on_finish(self, request_id: str, out, now: float | None = None, aborted: bool = False):
        t = self._timings.pop(request_id, None)
        if aborted or t is None:
            return
        self.e2e.observe((now or time.monotonic()) - t.arrival)
        for c in out.outputs:
            self.success.labels(self.model_name, c.finish_reason or "abort").inc()

    def tick(self, engine):
        """Bring gauges and counters up to date; log a stats line every log_interval s."""
        sched, bm = engine.scheduler, engine.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(1.0 - bm.num_free / max(bm.num_blocks, 1))
        counts = self._engine_counts(engine)
        for key, metric in (("prompt", self.prompt_tokens), ("generated", self.generation_tokens),
                            ("preemptions", self.preemptions), ("queries", self.prefix_queries),
                            ("hits", self.prefix_hits)):
            if counts[key] > self._seen[key]:
                metric.inc(counts[key] - self._seen[key])
        self._seen = counts
        now = time.monotonic()
        if now - self._last_log < self.log_interval:
            return
        busy = sched.running or sched.waiting or counts != self._logged
        if busy:
            self._log_line(engine, counts, now - self._last_log)
        self._last_log, self._logged = now, counts

    def _log_line(self, engine, counts: dict, elapsed: float):
        sched, bm = engine.scheduler, engine.block_manager
        elapsed = max(elapsed, 1e-6)
        prompt_rate = (counts["prompt"] - self._logged["prompt"]) / elapsed
        gen_rate = (counts["generated"] - self._logged["generated"]) / elapsed
        queries = counts["queries"] - self._logged["queries"]
        hits = counts["hits"] - self._logged["hits"]
        log.info("Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                 "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                 "tokens/s, Prefix cache hit rate: %.1f%%", len(sched.running),
                 len(sched.waiting), 100.0 * (1.0 - bm.num_free / max(bm.num_blocks, 1)),
                 prompt_rate, gen_rate, 100.0 * hits / queries if queries else 0.0)

    @staticmethod
    def _engine_counts(engine) -> dict:
        bm = engine.block_manager
        return {"prompt": engine.num_prompt_tokens, "generated": engine.num_generated_tokens,
                "preemptions": engine.scheduler.num_preemptions,
                "queries": getattr(bm, "prefix_queries", 0), "hits": getattr(bm, "prefix_hits", 0)}
