"""How long /health waits while the server reads one worst-case request body at the size limit.

    python tools/health_probe.py [--w MODEL] [--max-request-bytes N] [--json out.json]

Starts `python -m vllm_jax.server` on a free port, sends each body below (exactly N bytes) while
polling /health every 20 ms, and prints a table: the request's time and status, and /health's
worst and median latency meanwhile. Each body is refused (longer than the model's context), so
the time is all parsing, validating, rendering and tokenizing.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

DEFAULT_BYTES = 4 << 20


def padded(data: dict, size: int) -> bytes:
    body = json.dumps(data).encode()
    assert len(body) <= size, (len(body), size)
    return body[:-1] + b" " * (size - len(body)) + b"}"


def bodies(size: int) -> dict[str, tuple[str, bytes]]:
    message = {"role": "user", "content": "a"}
    return {
        "completion: token ids": ("/v1/completions", padded(
            {"prompt": [7] * ((size - 64) // 3), "max_tokens": 1}, size)),
        "completion: one text": ("/v1/completions", padded(
            {"prompt": "Hello world! " * ((size - 64) // 13), "max_tokens": 1}, size)),
        "chat: one message": ("/v1/chat/completions", padded(
            {"messages": [{"role": "user", "content": "Hello world! " * ((size - 96) // 13)}],
             "max_tokens": 1}, size)),
        "chat: one-letter messages": ("/v1/chat/completions", padded(
            {"messages": [message] * ((size - 64) // 34), "max_tokens": 1}, size)),
    }


def probe(url: str, route: str, body: bytes) -> dict:
    result = {}

    def post():
        start = time.monotonic()
        r = httpx.post(url + route, content=body, timeout=600,
                       headers={"Content-Type": "application/json"})
        result.update(status=r.status_code, request_s=time.monotonic() - start)

    worker = threading.Thread(target=post)
    latencies = []
    with httpx.Client(base_url=url) as http:
        http.get("/health")
        worker.start()
        while worker.is_alive():
            start = time.monotonic()
            http.get("/health")
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
    worker.join()
    latencies.sort()
    return {**result, "health_max_ms": 1e3 * latencies[-1],
            "health_median_ms": 1e3 * latencies[len(latencies) // 2], "polls": len(latencies)}


def start_server(argv: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vllm_jax.server", *argv, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--w", help="the model (default: the default model)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_BYTES)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    argv = ["--max-request-bytes", str(args.max_request_bytes)]
    proc, url = start_server(argv + (["--w", args.w] if args.w else []))
    rows = []
    try:
        print(f"{'body':28} {'bytes':>9} {'request s':>9} {'status':>6} "
              f"{'/health max ms':>14} {'median ms':>9}")
        for name, (route, body) in bodies(args.max_request_bytes).items():
            row = {"body": name, "bytes": len(body), **probe(url, route, body)}
            rows.append(row)
            print(f"{name:28} {len(body):>9} {row['request_s']:>9.2f} {row['status']:>6} "
                  f"{row['health_max_ms']:>14.0f} {row['health_median_ms']:>9.0f}", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
