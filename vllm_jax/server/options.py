"""What the operator sets about who may call the server and how much one request may cost it."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

# 4 MiB holds any prompt this engine can serve: ~500k token ids or ~1M tokens of text as JSON (a
# 128k-token prompt is ~1 MB). Reading a body holds the GIL in pieces proportional to its size
# (json.loads, the garbage collector): the worst 4 MiB bodies kept /health under ~0.2 s, median
# 4 ms, on 2 busy cores (tools/health_probe.py); 8 MiB bodies were somewhat slower.
DEFAULT_MAX_REQUEST_BYTES = 4 << 20


@dataclass(slots=True, frozen=True)
class ServerOptions:
    api_key: str | None = None  # required as `Authorization: Bearer KEY` beyond auth.PUBLIC_PATHS
    trust_request_chat_template: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    header_timeout_s: float = 5.0  # a request line and its headers must arrive within this
    template_timeout_s: float = 5.0  # a request's own chat template is stopped after this
    tool_call_parser: str | None = None  # None: the format the chat template shows


def add_server_limit_args(p: argparse.ArgumentParser):
    from vllm_jax.args import positive

    p.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on every route but /health, "
                        "/metrics and the API docs (default: $VLLM_API_KEY, else no key)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests, rendered in a worker process "
                        "stopped after 5 s (refused with 400 without this flag)")
    p.add_argument("--max-request-bytes", type=positive(), default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="N", help="a larger request body gets 413 (default 4 MiB)")


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(api_key=args.api_key or os.environ.get("VLLM_API_KEY") or None,
                         trust_request_chat_template=args.trust_request_chat_template,
                         max_request_bytes=args.max_request_bytes,
                         tool_call_parser=args.tool_call_parser)
