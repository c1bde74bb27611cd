"""OpenAI-compatible HTTP server: `python -m vllm_jax.server --w PATH [--host H] [--port P]`.

`serve(engine_config, host, port, ..., options)` runs it (the CLI's --server calls it);
`main(argv)` parses the engine flags (vllm_jax.args) plus the server's own (`add_server_args`,
`server_options`: API key, request limits).
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

from vllm_jax.config import EngineConfig
from vllm_jax.server.tool_parsers import PARSERS
from vllm_jax.server.options import ServerOptions, add_server_limit_args, server_options

log = logging.getLogger("vllm_jax")

__all__ = ["ServerOptions", "add_server_args", "build_app", "build_parser", "main", "serve",
           "served_model_names", "server_options"]


def build_app(state):
    from vllm_jax.server.app import build_app as build
    return build(state)


def add_server_args(p: argparse.ArgumentParser):
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name clients send (default: the model path's basename)")
    p.add_argument("--log-interval", type=float, default=5.0, metavar="S",
                   help="seconds between stats log lines while busy")
    p.add_argument("--tool-call-parser", choices=sorted(PARSERS), metavar="NAME",
                   help="the format the model writes tool calls in: "
                        f"{', '.join(sorted(PARSERS))} (default: the one its chat template shows)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: tool_choice 'auto' is on whenever a "
                        "tool-call format is known")
    add_server_limit_args(p)


def build_parser() -> argparse.ArgumentParser:
    from vllm_jax.args import Parser, add_engine_args

    p = Parser(prog="python -m vllm_jax.server", description="Serve a model over the OpenAI API.")
    # streams are watched here: prompt tokens beside decode rows are capped (engine/step_cost.py),
    # and one decode step a dispatch (a run of K would hand each stream its tokens K at a time
    # and keep an arriving request waiting for the run)
    add_engine_args(p, decode_steps=1, mixed_step_slowdown=2.0)
    add_server_args(p)
    return p


def served_model_names(config: EngineConfig, served_model_name: str | None = None) -> list[str]:
    """The name requests use and /v1/models shows: --served-model-name, else the model's folder
    or file name. Never its path: no response reveals where the server keeps its files."""
    from vllm_jax.loader.default_model import DEFAULT_MODEL

    path = config.model_path
    return [served_model_name or (Path(path.rstrip("/")).name if path else DEFAULT_MODEL)]


def serve(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, log_interval: float = 5.0,
          options: ServerOptions = ServerOptions()) -> int:
    """Start uvicorn at once (/health answers 503) and load the model in the engine thread."""
    import uvicorn

    from vllm_jax.server.http_limits import uvicorn_config
    from vllm_jax.server.serving import ServerState

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)

    def load():
        from vllm_jax.engine.llm_engine import LLMEngine  # imports JAX: off the startup path
        engine = LLMEngine(engine_config)  # with --warmup, compiles before /health is ready
        # The million objects of JAX and the model stay for good: out of the garbage collector's
        # full passes, which hold the GIL (~0.4 s each under load, then ~0.05 s).
        gc.freeze()
        return engine

    state = ServerState(load, served_model_names(engine_config, served_model_name), log_interval,
                        options=options)
    server = uvicorn.Server(uvicorn_config(build_app(state), host, port, options,
                                           timeout_graceful_shutdown=5))

    def stop(error: BaseException):
        server.should_exit = True

    state.engine_thread.on_load_error = stop
    server.run()
    return 1 if state.engine_thread.error is not None else 0


def main(argv=None) -> int:
    from vllm_jax.args import engine_config

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return serve(engine_config(args), args.host, args.port, args.served_model_name,
                     args.log_interval, server_options(args))
    except KeyboardInterrupt:
        return 130
