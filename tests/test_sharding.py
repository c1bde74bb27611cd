"""Tensor parallelism on 4 fake CPU devices gives the single-device results, each device holding
its shard only; two processes form one mesh through jax.distributed.

The device count is fixed when JAX starts, and other tests start it first, so the sharded runs
happen in a subprocess (this file run as a script) that reports back one JSON line.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from vllm_jax import parallel
from vllm_jax.config import ConfigError, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES = 4
CASES = {  # name: (arch, config overrides, in-situ quantization)
    "llama_2kv_heads_copied": ("llama", {}, None),
    "mistral_sliding_window": ("mistral", {}, None),
    "qwen2_bias_tied_embeddings": ("qwen2", {"tie_word_embeddings": True}, None),
    "qwen3_qk_norm_4kv_heads": ("qwen3", {"num_key_value_heads": 4}, None),
    "qwen3_6_heads_attention_replicated": (
        "qwen3", {"num_attention_heads": 6, "num_key_value_heads": 3}, None),
    "llama_q4_0": ("llama", {}, "q4_0"),
    "gemma3_1kv_head_copied": ("gemma3", {}, None),
    "qwen3_moe_expert_ffn_split": ("qwen3_moe", {}, None),
    "mixtral_q8_0_experts": ("mixtral", {}, "q8_0"),
    "phi3_fused_weights": ("phi3", {}, None),
}
PROMPT_LEN, MAX_TOKENS, MAX_MODEL_LEN = 40, 8, 64


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")  # quantized weights and compiled programs

    def env(num_devices: int) -> dict:
        return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                "VLLM_JAX_CACHE": str(cache),
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}"}

    return env


@pytest.fixture(scope="module")
def results(model_dir, worker_env):
    jobs = {name: (str(model_dir(arch, **over)[0]), quant)
            for name, (arch, over, quant) in CASES.items()}
    proc = subprocess.run([sys.executable, __file__, "cases", json.dumps(jobs)],
                          env=worker_env(NUM_DEVICES), capture_output=True, text=True,
                          timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_greedy_tokens_and_logits_match_one_device(results, case):
    r = results[case]
    assert r["tokens_sharded"] == r["tokens_single"]
    assert r["max_logit_diff"] <= 1e-5 * r["logit_scale"], r["max_logit_diff"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_device_holds_only_its_shard(results, case):
    r = results[case]
    assert r["uneven_shards"] == [], r["uneven_shards"]
    total, split = r["weight_bytes"], r["sharded_weight_bytes"]
    assert r["weight_bytes_per_device"] == [total - split + split // NUM_DEVICES] * NUM_DEVICES
    if case == "qwen3_6_heads_attention_replicated":  # 6 heads do not split over 4 devices
        assert r["kv_bytes_per_device"] == [r["kv_bytes"]] * NUM_DEVICES
    else:
        assert split > 0.9 * total
        assert r["kv_bytes_per_device"] == [r["kv_bytes"] // NUM_DEVICES] * NUM_DEVICES


def test_decode_step_has_two_all_reduces_per_layer(results):
    for case in ("llama_2kv_heads_copied", "qwen3_qk_norm_4kv_heads"):
        ops = results[case]["decode_collectives"]
        # o_proj and down_proj in each of the 2 layers, plus the vocab-parallel embedding
        assert ops.get("all-reduce") == 2 * 2 + 1, ops
        assert ops.get("all-gather", 0) <= 2, ops  # greedy argmax over the vocab shards only


def test_kv_cache_holds_the_work_and_splits_per_device(results):
    """max_num_seqs x max_model_len tokens and no more (the --kvmem default is a ceiling, per
    device), split by KV head: the tiny llama's 2 KV heads of 16 dims are copied to one a
    device, 2 layers x K and V x 16 dims x 4 bytes a token each."""
    r = results["kv_sizing"]
    pages = 3 * MAX_MODEL_LEN // 16
    assert r["num_pages"] == pages
    assert r["kv_bytes_per_device"] == [pages * 16 * 2 * 2 * 16 * 4] * NUM_DEVICES


def test_no_compiles_after_warmup_on_the_mesh(results):
    assert results["compiles_after_warmup"] == 0


def test_quantized_columns_split_on_block_boundaries_only(results):
    specs = results["llama_q4_0"]["specs"]
    assert specs["layers.0.mlp.down_proj.weight"] == [None, "tp"]  # 128 cols = 4 blocks of 32
    assert specs["layers.0.self_attn.o_proj.weight"] == [None, None]  # 64 cols = 2 blocks
    assert specs["layers.0.self_attn.q_proj.weight"] == ["tp", None]  # rows split freely


def test_shard_map_kernels_match_unsharded(results):
    """shard_heads / shard_qmatmul: the Pallas kernels (interpreted) and the XLA references,
    largest error relative to the largest output."""
    diffs = results["shard_map"]
    assert set(diffs) >= {"attention_xla", "qmatmul_xla_dim0", "qmatmul_xla_dim1"}, diffs
    for name, diff in diffs.items():
        assert diff <= 1e-5, (name, diff)


def test_rules_split_whole_heads_only():
    from vllm_jax.models.llama import LlamaForCausalLM

    cfg = ModelConfig("llama", vocab_size=320, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True)
    specs = {s.name: s for s in LlamaForCausalLM.weights(cfg)}
    assert parallel.kv_repeats(cfg, 4) == 2 and parallel.kv_repeats(cfg, 2) == 1
    rules = parallel.logical_rules(cfg, 2, list(specs.values()))

    def spec(name):
        return parallel.weight_spec(specs[name].axes, specs[name].shape, rules, 2)

    assert spec("layers.0.self_attn.k_proj.weight") == P("tp", None)
    assert spec("layers.0.self_attn.o_proj.weight") == P(None, "tp")
    assert spec("layers.0.self_attn.q_proj.bias") == P("tp")
    assert spec("layers.0.input_layernorm.weight") == P(None)
    odd = ModelConfig("qwen3", vocab_size=321, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=6, num_kv_heads=3, head_dim=32)
    rules = parallel.logical_rules(odd, 4, LlamaForCausalLM.weights(odd))
    assert parallel.kv_repeats(odd, 4) == 1
    assert rules["heads"] is None and rules["kv_heads"] is None and rules["vocab"] is None
    assert rules["mlp"] == "tp"


def test_device_ids_must_exist():
    with pytest.raises(ConfigError, match="no device with id 99"):
        parallel.make_mesh([99])
    with pytest.raises(ConfigError, match="does not match"):
        parallel.make_mesh([0], tensor_parallel_size=2)
    assert parallel.make_mesh() is None


def test_init_distributed_reads_env_and_checks_it(monkeypatch):
    for var in ("VLLM_JAX_COORDINATOR", "VLLM_JAX_NUM_PROCESSES", "VLLM_JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.init_distributed() is False
    monkeypatch.setenv("VLLM_JAX_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(ConfigError, match="number of processes"):
        parallel.init_distributed()
    monkeypatch.setenv("VLLM_JAX_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="outside"):
        parallel.init_distributed(process_id=2)


def test_two_processes_form_one_mesh_and_run_the_engine(model_dir, results, worker_env):
    """2 processes x 2 CPU devices: one global 4-device mesh; a sharded sum across processes,
    then the engine on that mesh, each process driving its 2 devices through the same steps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(model_dir("llama")[0])
    procs = [subprocess.Popen(
        [sys.executable, __file__, "multihost", path],
        env={**worker_env(2), "VLLM_JAX_COORDINATOR": f"127.0.0.1:{port}",
             "VLLM_JAX_NUM_PROCESSES": "2", "VLLM_JAX_PROCESS_ID": str(i)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    lines = [[x for x in out.splitlines() if x.startswith("RESULT ")] for out, _ in outs]
    if any(p.returncode for p in procs) and any("UNIMPLEMENTED" in err for _, err in outs):
        pytest.skip("this jaxlib has no multi-process CPU collectives: " + outs[0][1][-300:])
    assert all(p.returncode == 0 and ln for p, ln in zip(procs, lines)), outs[0][1][-3000:]
    for i, ln in enumerate(lines):
        r = json.loads(ln[-1][len("RESULT "):])
        assert r["process"] == i and r["processes"] == 2
        assert r["devices"] == 4 and r["local_devices"] == 2
        assert r["column_sums"] == [24.0, 28.0, 32.0, 36.0]  # rows live on 4 devices, 2 hosts
        assert r["tokens"] == results["llama_2kv_heads_copied"]["tokens_single"]


# ---------------------------------------------------------------------------------------------
# the subprocess side


def _forward_logits(engine, prompt):
    """float32 logits of every prompt position and of one decode step: [len(prompt) + 1, vocab]."""
    import contextlib
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from vllm_jax.models.layers import AttnMetadata

    r = engine.runner
    n = len(prompt)

    @functools.partial(jax.jit, static_argnums=4)
    def step(leaves, kv, tokens, meta, decode):
        model = r.model(leaves)
        hidden, kv = model(tokens, kv, meta, decode)
        return model.logits(hidden), kv

    def meta(pos, lens):
        pos = np.asarray(pos, np.int32)
        return AttnMetadata(pos, pos, np.zeros_like(pos), np.arange(r.max_pages)[None],
                            np.asarray([lens], np.int32))

    with jax.set_mesh(engine.mesh) if engine.mesh else contextlib.nullcontext():
        kv = list(zip(r.kv[0::2], r.kv[1::2]))
        pre, kv = step(r.leaves, kv, np.asarray(prompt, np.int32), meta(range(n), n), False)
        nxt = np.asarray([int(jnp.argmax(pre[-1]))], np.int32)
        dec, _ = step(r.leaves, kv, nxt, meta([n], n + 1), True)
    return np.concatenate([np.asarray(pre), np.asarray(dec)])


def _collectives(engine) -> dict:
    import collections
    import re

    import jax

    from vllm_jax.engine.scheduler import ScheduledBatch
    from vllm_jax.runner.model_runner import StepLayout

    r = engine.runner
    layout = StepLayout(1, 1, r.max_pages, True, greedy_only=True)
    ints, floats = r.prepare(ScheduledBatch(True, [], []), layout)
    with jax.set_mesh(engine.mesh):
        hlo = r._step.__wrapped__.lower(r.leaves, r.kv, ints, floats, layout,
                                        r.no_prev_tokens).compile().as_text()
    pattern = r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    return dict(collections.Counter(re.findall(pattern + r"(?:-start)?\(", hlo)))


def _memory(engine) -> dict:
    import jax
    from flax import nnx

    devices = list(engine.mesh.devices.flat)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(engine.loaded.model))
    uneven, sharded = [], 0
    for path, leaf in leaves:
        if parallel.TP in leaf.sharding.spec:
            sharded += leaf.nbytes
            if any(parallel.device_bytes(leaf, d) * len(devices) != leaf.nbytes
                   for d in devices):
                uneven.append(jax.tree_util.keystr(path))
    return {"weight_bytes": sum(leaf.nbytes for _, leaf in leaves),
            "sharded_weight_bytes": sharded, "uneven_shards": uneven,
            "weight_bytes_per_device": [parallel.device_bytes(engine.runner.state, d)
                                        for d in devices],
            "kv_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.runner.kv)),
            "kv_bytes_per_device": [parallel.device_bytes(engine.runner.kv, d) for d in devices]}


def _relative(got, want) -> float:
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _shard_map_diffs() -> dict:
    """shard_heads / shard_qmatmul around the kernels (XLA; Pallas interpreted) vs no mesh."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from vllm_jax.kernels import paged_attention as pa
    from vllm_jax.kernels import quant

    cfg = ModelConfig("llama", vocab_size=320, hidden_size=64, intermediate_size=128,
                      num_layers=1, num_heads=8, num_kv_heads=4, head_dim=16)
    mesh = parallel.make_mesh(list(range(NUM_DEVICES)))
    rng = np.random.default_rng(0)
    pages, ps, seqs = 16, 16, 3
    k, v = (jnp.asarray(rng.standard_normal((4, pages, ps, 16)), jnp.float32) for _ in range(2))
    q = rng.standard_normal((seqs, 8, 16)).astype(np.float32)
    tables = rng.permutation(pages)[:12].reshape(seqs, 4).astype(np.int32)
    lens = np.array([40, 7, 64], np.int32)
    from vllm_jax.kernels import cpu

    kernels = {"xla": pa.decode_attention}
    if cpu.available():
        kernels["cpu"] = cpu.decode_attention
    if hasattr(pa, "decode_attention_pallas"):
        kernels["pallas_interpret"] = functools.partial(pa.decode_attention_pallas,
                                                        interpret=True)
    out = {}
    for name, fn in kernels.items():
        want = fn(q, k, v, tables, lens, scale=0.25)
        cache = parallel.kv_cache_sharding(cfg, mesh)
        ks, vs = jax.device_put(k, cache), jax.device_put(v, cache)
        with jax.set_mesh(mesh):
            got = jax.jit(lambda *a: parallel.shard_heads(fn, cfg.num_heads, cfg.num_kv_heads)(*a, scale=0.25))(
                q, ks, vs, tables, lens)
        out["attention_" + name] = _relative(got, want)

    w = rng.standard_normal((64, 128)).astype(np.float32)  # q4_0: 4 blocks of 32 per row
    fields = {k: jnp.asarray(v) for k, v in quant.repack(quant.quantize(w, "q4_0")).items()}
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    for backend in ("xla", "pallas_interpret") + (("cpu",) if cpu.available() else ()):
        fn = functools.partial(quant.qmatmul, backend=backend)
        many = functools.partial(quant.qmatmul_many, backend=backend)  # a layer's q, k, v
        want = fn(x, fields, "q4_0", 128)
        for dim in (0, 1):
            spec = P(parallel.TP, None) if dim == 0 else P(None, parallel.TP)
            placed = jax.device_put(fields, NamedSharding(mesh, spec))
            assert parallel.split_dim(placed["qs"]) == dim
            with jax.set_mesh(mesh):
                got = jax.jit(lambda x, f: parallel.shard_qmatmul(fn, dim)(x, f, "q4_0", 128))(
                    x, placed)
                got_many = jax.jit(lambda x, f: parallel.shard_qmatmul(many, dim)(
                    x, [f, f], ["q4_0", "q4_0"], 128))(x, placed)
            out[f"qmatmul_{backend}_dim{dim}"] = _relative(got, want)
            out[f"qmatmul_many_{backend}_dim{dim}"] = max(_relative(y, want) for y in got_many)
    return out


def _compiles_after_warmup(path: str, prompt, params) -> int:
    """Step compilations (jit cache entries, shardings included) after warmup()."""
    from vllm_jax.config import EngineConfig
    from vllm_jax.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model_path=path, dtype="f32", max_model_len=MAX_MODEL_LEN,
                                    kvcache_mem_mb=1, max_num_seqs=1, max_num_batched_tokens=16,
                                    device_ids=list(range(NUM_DEVICES))))
    engine.warmup()
    step = engine.runner._step.__wrapped__  # the jitted step inside parallel.under_mesh
    before = step._cache_size()
    engine.generate([prompt], params)
    return step._cache_size() - before


def _run_cases(jobs: dict) -> dict:
    import numpy as np

    from vllm_jax.config import EngineConfig
    from vllm_jax.engine.llm_engine import LLMEngine
    from vllm_jax.sampling_params import SamplingParams

    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 300, PROMPT_LEN)]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    devices = list(range(NUM_DEVICES))
    out = {}
    for name, (path, qtype) in jobs.items():
        runs = {}
        for ids in (None, devices):
            engine = LLMEngine(EngineConfig(
                model_path=path, dtype="f32", quant=qtype, max_model_len=MAX_MODEL_LEN,
                kvcache_mem_mb=1, max_num_seqs=1, max_num_batched_tokens=64, device_ids=ids))
            tokens = engine.generate([prompt], greedy)[0].outputs[0].token_ids
            runs[ids is not None] = engine, tokens, _forward_logits(engine, prompt)
        (_, tokens, logits), (engine, sharded_tokens, sharded_logits) = runs[False], runs[True]
        out[name] = {"tokens_single": tokens, "tokens_sharded": sharded_tokens,
                     "max_logit_diff": float(np.abs(logits - sharded_logits).max()),
                     "logit_scale": float(np.abs(logits).max()),
                     **_memory(engine)}
        if name in ("llama_2kv_heads_copied", "qwen3_qk_norm_4kv_heads"):
            out[name]["decode_collectives"] = _collectives(engine)
        if qtype:
            model = engine.loaded.model
            out[name]["specs"] = {
                f"layers.0.{m}.weight": list(next(iter(lin.weight.values()))[...].sharding.spec)
                for m, lin in (("mlp.down_proj", model.layers[0].mlp.down_proj),
                               ("self_attn.o_proj", model.layers[0].self_attn.o_proj),
                               ("self_attn.q_proj", model.layers[0].self_attn.q_proj))}
    out["shard_map"] = _shard_map_diffs()
    out["compiles_after_warmup"] = _compiles_after_warmup(
        jobs["llama_2kv_heads_copied"][0], prompt, greedy)
    out["kv_sizing"] = _kv_sizing(jobs["llama_2kv_heads_copied"][0])
    return out


def _kv_sizing(path: str) -> dict:
    """KV bytes per device for 3 sequences of 64 tokens under the default --kvmem (4096 MB)."""
    from vllm_jax.config import EngineConfig
    from vllm_jax.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model_path=path, dtype="f32", max_model_len=MAX_MODEL_LEN,
                                    max_num_seqs=3, device_ids=list(range(NUM_DEVICES))))
    return {"kv_bytes_per_device": [parallel.device_bytes(engine.runner.kv, d)
                                    for d in engine.mesh.devices.flat],
            "num_pages": engine.block_manager.num_blocks}


def _multihost(path: str) -> dict:
    """Started with VLLM_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from vllm_jax.config import EngineConfig
    from vllm_jax.engine.llm_engine import LLMEngine
    from vllm_jax.sampling_params import SamplingParams

    assert parallel.init_distributed()
    mesh = parallel.make_mesh()
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    rows = parallel.put(x, NamedSharding(mesh, P(parallel.TP)))
    sums = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P()))(rows)
    engine = LLMEngine(EngineConfig(model_path=path, dtype="f32", max_model_len=MAX_MODEL_LEN,
                                    kvcache_mem_mb=1, max_num_seqs=1, max_num_batched_tokens=64))
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 300, PROMPT_LEN)]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    result = {"process": jax.process_index(), "processes": jax.process_count(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count(),
              "column_sums": np.asarray(sums.addressable_data(0)).tolist(),
              "tokens": engine.generate([prompt], greedy)[0].outputs[0].token_ids}
    jax.distributed.shutdown()
    return result


if __name__ == "__main__":
    mode = sys.argv[1]
    result = _run_cases(json.loads(sys.argv[2])) if mode == "cases" else _multihost(sys.argv[2])
    print("RESULT " + json.dumps(result), flush=True)
