"""Serving latency under load: N concurrent streaming chat clients against a running server.

    python -m vllm_jax.server --port 8000 &
    python tools/load.py --url http://127.0.0.1:8000/v1 --clients 32 --requests 96 --max-tokens 32

Each client sends its share of `--requests` chat requests one after another (greedy, exactly
`--max-tokens` tokens: ignore_eos, which vLLM-style servers and llama-server honour), a
different question each, streamed through the official `openai` client. Special tokens are
shown as text (skip_special_tokens false): past the end of an answer a model writes end-of-turn
and role tokens, which would otherwise decode to no text, send no content, and count a gap of
two or three steps as one. Time to first token is measured from sending a request to its first
content chunk; the gap between tokens from each chunk to the next within a stream; output
tokens from the usage each stream ends with. Prints a table and writes JSON (--json). Any
OpenAI-compatible server works, llama-server (`--parallel N`) included.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time

import numpy as np
from openai import AsyncOpenAI

TOPICS = ["the sea", "a lighthouse", "bread", "winter", "a violin", "trains", "bees", "the moon",
          "a library", "rain", "chess", "a garden", "volcanoes", "owls", "a bridge", "coffee"]


def question(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"Request {i}: tell me something surprising about {topic}, in a few sentences, "
            f"and then explain why it matters to someone who has never thought about {topic}.")


async def one_request(client: AsyncOpenAI, model: str, i: int, max_tokens: int) -> dict:
    sent = time.perf_counter()
    stamps = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question(i)}], stream=True,
        max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True, "skip_special_tokens": False},
        stream_options={"include_usage": True})
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": stamps[0] - sent if stamps else None, "gaps": np.diff(stamps).tolist(),
            "tokens": tokens or len(stamps)}


async def client_loop(client, model, ids, max_tokens, results):
    for i in ids:
        results.append(await one_request(client, model, i, max_tokens))


async def run_load(url: str, clients: int, requests: int, max_tokens: int, api_key: str) -> dict:
    client = AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await one_request(client, model, requests, max_tokens)  # warm: not counted
    results: list[dict] = []
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(client, model, range(c, requests, clients), max_tokens,
                                       results) for c in range(clients)))
    wall = time.perf_counter() - start
    return summarize(results, wall, model, url, clients, requests, max_tokens)


def percentiles(values) -> dict:
    v = np.asarray(values, float)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))} if len(v) else {}


def summarize(results, wall, model, url, clients, requests, max_tokens) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {
        "url": url, "model": model, "clients": clients, "requests": requests,
        "max_tokens": max_tokens, "wall_s": wall, "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r["ttft"] for r in results if r["ttft"] is not None]),
        "inter_token_s": percentiles([g for r in results for g in r["gaps"]]),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def table(s: dict) -> str:
    ttft, itl = s["ttft_s"], s["inter_token_s"]
    return "\n".join([
        "| server | clients | requests | wall s | TTFT p50 / p99 s | inter-token p50 / p99 ms "
        "| tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {s['url']} ({s['model']}) | {s['clients']} | {s['requests']} | {s['wall_s']:.1f} "
        f"| {ttft['p50']:.2f} / {ttft['p99']:.2f} | {itl['p50'] * 1e3:.0f} / "
        f"{itl['p99'] * 1e3:.0f} | {s['tokens_per_s']:.1f} |"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default="none")
    p.add_argument("--json", default="load.json", help="where to write the figures")
    args = p.parse_args(argv)
    summary = asyncio.run(run_load(args.url, args.clients, args.requests, args.max_tokens,
                                   args.api_key))
    print(table(summary))
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
