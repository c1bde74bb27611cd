"""What the operator sets about who may call the server and how much one request may cost it."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

# A 128k-token prompt is at most ~1 MB of JSON (token ids or escaped text); 8 MiB leaves room for
# batched completions and million-token prompts. The worst 8 MiB bodies (2.8M token ids, 270k
# one-letter messages) held /health up to ~0.13 s on 2 busy cores: json.loads and the garbage
# collector hold the GIL in one piece, in proportion to the body.
DEFAULT_MAX_REQUEST_BYTES = 8 << 20


@dataclass(slots=True, frozen=True)
class ServerOptions:
    api_key: str | None = None  # required as `Authorization: Bearer KEY` beyond auth.PUBLIC_PATHS
    trust_request_chat_template: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    header_timeout_s: float = 5.0  # a request line and its headers must arrive within this
    template_timeout_s: float = 5.0  # a request's own chat template is stopped after this


def add_server_limit_args(p: argparse.ArgumentParser):
    from vllm_jax.args import positive

    p.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on every route but /health, "
                        "/metrics and the API docs (default: $VLLM_API_KEY, else no key)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat_template in requests, rendered in a worker process "
                        "stopped after 5 s (refused with 400 without this flag)")
    p.add_argument("--max-request-bytes", type=positive(), default=DEFAULT_MAX_REQUEST_BYTES,
                   metavar="N", help="a larger request body gets 413 (default 8 MiB)")


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(api_key=args.api_key or os.environ.get("VLLM_API_KEY") or None,
                         trust_request_chat_template=args.trust_request_chat_template,
                         max_request_bytes=args.max_request_bytes)
