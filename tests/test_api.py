"""The Python API: LLM.generate/chat, Engine.generate_sync/generate_stream, the JAX-library use."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_jax import LLM, Engine, Message, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return model_dir("llama")


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(model=str(tiny[0]), dtype="f32", max_model_len=256, kvcache_mem_mb=16,
               max_num_seqs=8)


def test_generate_accepts_strings_and_token_ids_alike(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("Hello world")
    outs = llm.generate(["Hello world", {"prompt_token_ids": ids}, {"prompt": "Hello world"}],
                        GREEDY)
    assert [o.prompt_token_ids for o in outs] == [ids] * 3
    assert outs[0].prompt == "Hello world" and outs[1].prompt is None
    first = outs[0].outputs[0]
    assert len(first.token_ids) == 8 and first.finish_reason == "length"
    assert first.text == tok.decode(first.token_ids)
    assert all(o.outputs[0].token_ids == first.token_ids for o in outs)
    assert llm.generate("Hello world", GREEDY)[0].outputs[0].token_ids == first.token_ids
    assert llm.generate(ids, GREEDY)[0].outputs[0].token_ids == first.token_ids


def test_generate_returns_logprobs_and_prompt_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    out = llm.generate("The quick brown fox", params)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 4
    for token, entry in zip(c.token_ids, c.logprobs):
        assert entry[token].rank == 1  # greedy: the chosen token is the most likely
        assert 2 <= len(entry) <= 3 and entry[token].decoded_token is not None
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                     zip(c.token_ids, c.logprobs)), rel=1e-5)
    assert out.prompt_logprobs[0] is None
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in entry and entry[token].logprob <= 0


def test_chat_renders_the_template(llm):
    tok = llm.get_tokenizer()
    conversation = [Message("system", "Be brief."), {"role": "user", "content": "Hi there"}]
    out = llm.chat(conversation, GREEDY)[0]
    text = llm.engine.apply_chat_template(conversation)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)
    both = llm.chat([conversation, [Message("user", "Hello")]], GREEDY)
    assert len(both) == 2 and both[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_generate_sync_keeps_input_order(llm):
    prompts = ["Hello world", "Once upon a time", [5, 6, 7]]
    outs = llm.engine.generate_sync(GREEDY, prompts)
    alone = [llm.engine.generate_sync(GREEDY, [p])[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]


def test_generate_stream_pieces_add_up_to_the_text(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    pieces = list(llm.engine.generate_stream(params, "Hello world"))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.engine.generate_sync(params, ["Hello world"])[0].outputs[0].text


def test_closing_a_stream_aborts_it_and_frees_its_pages(llm):
    engine = llm.llm_engine
    free = engine.block_manager.num_free
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    stream = llm.engine.stream(params, "Once upon a time")
    for _ in range(3):
        next(stream)
    assert engine.block_manager.num_free < free and engine.has_unfinished_requests()
    stream.close()
    assert engine.block_manager.num_free == free and not engine.has_unfinished_requests()
    texts = llm.engine.generate_stream(params, "Hello world")
    next(texts)
    texts.close()
    assert engine.block_manager.num_free == free and not engine.has_unfinished_requests()


def test_interleaved_streams_each_get_their_own_tokens(llm):
    a = llm.engine.stream(GREEDY, "Hello world")
    b = llm.engine.stream(GREEDY, [5, 6, 7])
    pairs = list(itertools.zip_longest(a, b))  # next(a), next(b), next(a), ...
    last_a = [x for x, _ in pairs if x is not None][-1]
    last_b = [y for _, y in pairs if y is not None][-1]
    assert last_a.finished and last_b.finished
    ref = llm.engine.generate_sync(GREEDY, ["Hello world", [5, 6, 7]])
    assert last_a.outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert last_b.outputs[0].token_ids == ref[1].outputs[0].token_ids


def test_bad_arguments_are_refused(llm, tiny):
    with pytest.raises(TypeError, match="gpu_memory_utilization"):
        LLM(model=str(tiny[0]), gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate({"prompt_token_ids": [5] * 300}, GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not llm.llm_engine.has_unfinished_requests()


def test_engine_takes_an_engine_config(tiny):
    from vllm_jax import EngineConfig

    engine = Engine(EngineConfig(model_path=str(tiny[0]), dtype="f32", max_model_len=64,
                                 kvcache_mem_mb=1, max_num_seqs=2))
    assert engine.max_model_len == 64
    assert engine.apply_chat_template([Message("user", "x")], add_generation_prompt=False) == \
        "<|im_start|>user\nx<|im_end|>\n"


def test_vllm_rs_python_example(tiny, capsys):
    """vLLM.rs's Python example as its README writes it (dtype f32: the CPU's)."""
    from vllm_jax import EngineConfig

    # --- vLLM.rs's README, except for the model path, the limits and the dtype ------------------
    cfg = EngineConfig(model_path=str(tiny[0]), max_model_len=256, kvcache_mem_mb=16)
    engine = Engine(cfg, "f32")
    params = SamplingParams(temperature=0.6, max_tokens=16)
    prompt = engine.apply_chat_template([Message("user", "How are you?")], True)

    # Synchronous generation for batched input
    outputs = engine.generate_sync(params, [prompt, prompt])
    print(outputs)

    # Streaming generation for single request
    stream = engine.generate_stream(params, prompt)
    for token in stream:
        print(token)
    # ---------------------------------------------------------------------------------------------
    assert prompt == "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    assert len(outputs) == 2 and all(o.finished and o.prompt == prompt for o in outputs)
    printed = capsys.readouterr().out
    assert printed.startswith("[RequestOutput(") and len(printed.splitlines()) > 1
    assert engine.llm_engine.config.dtype == "f32" and cfg.dtype == "auto"


def test_a_positional_dtype_overrides_the_configs(tiny):
    import jax
    from flax import nnx

    from vllm_jax import EngineConfig

    cfg = EngineConfig(model_path=str(tiny[0]), dtype="f32", max_model_len=64, kvcache_mem_mb=1,
                       max_num_seqs=2)
    engine = Engine(cfg, "f16", max_num_seqs=1)
    assert engine.llm_engine.config.dtype == "f16" and cfg.dtype == "f32"
    assert engine.llm_engine.config.max_num_seqs == 1 and cfg.max_num_seqs == 2
    weights = jax.tree_util.tree_leaves(nnx.state(engine.llm_engine.loaded.model))
    assert np.dtype("float16") in {w.dtype for w in weights}
    with pytest.raises(TypeError, match="multiple values"):
        Engine(cfg, "f16", dtype="f32")


def test_jax_library_example(tiny):
    path, hf_model = tiny
    # --- the README's "JAX library" example, verbatim except for the model path ----------------
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vllm_jax import forward_logits, load_model

    # dequantize=True unpacks a GGUF file's quantized blocks to float32 at load: jax.grad
    # differentiates float arrays only (a safetensors folder's weights are float already)
    model, config, tokenizer = load_model(str(path), dtype="f32", dequantize=True)
    batch = jnp.array([tokenizer.encode("The quick brown fox jumps over the lazy dog")[:8],
                       tokenizer.encode("Hello world! How are you today?")[:8]])
    logits = forward_logits(model, batch)  # [2, 8, vocab], float32

    graphdef, params = nnx.split(model)

    def loss_fn(params, tokens):
        logits = forward_logits(nnx.merge(graphdef, params), tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    # ---------------------------------------------------------------------------------------------
    import torch

    with torch.no_grad():
        ref = hf_model(torch.tensor(np.asarray(batch))).logits.float().numpy()
    assert logits.shape == (2, 8, config.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)
    targets = torch.tensor(np.asarray(batch)[:, 1:]).long().reshape(-1)
    ref_loss = torch.nn.functional.cross_entropy(
        torch.tensor(ref[:, :-1]).reshape(-1, ref.shape[-1]), targets)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-4)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_forward_logits_matches_the_engine(llm, tiny):
    """The dense path and the paged engine agree on prompt logprobs."""
    import jax

    from vllm_jax import forward_logits

    ids = [int(t) for t in np.random.default_rng(0).integers(3, 300, 40)]
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    engine_lp = [e[t].logprob for t, e in zip(ids[1:], out.prompt_logprobs[1:])]
    logp = jax.nn.log_softmax(forward_logits(llm.llm_engine.loaded.model, np.array([ids])))
    dense_lp = [float(logp[0, i, t]) for i, t in enumerate(ids[1:])]
    np.testing.assert_allclose(engine_lp, dense_lp, atol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_forward_logits_matches_transformers(model_dir, arch):
    """Sliding window (mistral, prompt longer than the window) and q/k norms (qwen3)."""
    import torch

    from vllm_jax import forward_logits, load_model

    path, hf_model = model_dir(arch)
    model, _, _ = load_model(str(path), dtype="f32")
    ids = np.random.default_rng(1).integers(3, 300, (2, 40))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(np.asarray(forward_logits(model, ids)), ref, atol=1e-4, rtol=1e-4)


def test_gradients_through_the_cpu_kernels_equal_xlas(tiny):
    """forward_logits runs dense matmuls through the C++ kernel on the CPU; its gradients
    (XLA dots in the backward pass) equal those of the all-XLA model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vllm_jax import forward_logits, load_model

    batch = jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 12)), jnp.int32)
    grads = {}
    for backend in ("cpu", "xla"):
        model, _, _ = load_model(str(tiny[0]), "f32", kernel_backend=backend)
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = forward_logits(nnx.merge(graphdef, params), batch[:, :-1])
            lp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(lp, batch[:, 1:, None], axis=-1).mean()

        grads[backend] = jax.grad(loss)(params)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads["cpu"]), nnx.to_flat_state(grads["xla"])):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=str(path))
