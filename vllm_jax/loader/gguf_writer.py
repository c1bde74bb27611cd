"""Write a (quantized) model as a GGUF file that llama.cpp and vllm_jax.loader.gguf can load."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np

from vllm_jax.config import ConfigError, ModelConfig
from vllm_jax.kernels import quant
from vllm_jax.loader.gguf import ROPE_FREQS, gguf_name, llama3_factors, permute_rows, qk_heads

log = logging.getLogger("vllm_jax")

_FILE_TYPES = {
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q8_0": "MOSTLY_Q8_0", "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S",
    "q5_k": "MOSTLY_Q5_K_S", "q6_k": "MOSTLY_Q6_K", None: "ALL_F32",
}
_T = gguf.TokenType


def save_gguf(path_out, cfg: ModelConfig, weights_host: dict, tokenizer_dir) -> None:
    """weights_host: {HF name: quant.QuantTensor or numpy array}, tokenizer_dir: an HF folder."""
    arch = "llama" if cfg.arch in ("llama", "mistral") else cfg.arch
    w = gguf.GGUFWriter(str(path_out), arch)
    w.add_name(Path(tokenizer_dir).name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    qtypes = [x.qtype for x in weights_host.values() if isinstance(x, quant.QuantTensor)]
    main = max(set(qtypes), key=qtypes.count) if qtypes else None
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[main]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, Path(tokenizer_dir), cfg.vocab_size)
    if cfg.rope_scaling:  # llama3 scaling, stored the way llama.cpp's converter does
        w.add_tensor(ROPE_FREQS, llama3_factors(cfg))
    for name in sorted(weights_host, key=_order):
        _add_tensor(w, cfg, name, weights_host[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s (%.1f MiB)", path_out, Path(path_out).stat().st_size / 2**20)


def _order(name: str):
    parts = name.split(".")
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return (0 if parts[0] == "embed_tokens" else 2, 0, name)


def _add_tensor(w: gguf.GGUFWriter, cfg: ModelConfig, name: str, x) -> None:
    heads = qk_heads(cfg, name)
    if isinstance(x, quant.QuantTensor):
        raw = permute_rows(x.raw, heads) if heads else x.raw
        w.add_tensor(gguf_name(name), np.ascontiguousarray(raw), raw_dtype=quant.QTYPES[x.qtype][2])
        return
    x = np.asarray(x)
    if heads:
        x = permute_rows(x, heads)
    if x.ndim == 1 or "norm" in name or x.dtype not in (np.float16, np.dtype("bfloat16")):
        w.add_tensor(gguf_name(name), np.ascontiguousarray(x, dtype=np.float32))
    elif x.dtype == np.float16:
        w.add_tensor(gguf_name(name), np.ascontiguousarray(x))
    else:
        raw = np.ascontiguousarray(x).view(np.uint8)
        w.add_tensor(gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.BF16)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """GPT-2 style (byte-level BPE) tokenizer metadata from a Hugging Face tokenizer.json."""
    from vllm_jax.tokenizer import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{folder}: no tokenizer.json to write into the GGUF file")
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model", {})
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ConfigError(f"{file}: --save-gguf supports byte-level BPE tokenizers (GPT-2, "
                          f"Llama 3, Qwen style); this one is {model.get('type')} with "
                          f"pre-tokenizer {(data.get('pre_tokenizer') or {}).get('type')}")
    tokens: list[str | None] = [None] * vocab_size
    types = [_T.NORMAL] * vocab_size
    entries = [(i, t, _T.NORMAL) for t, i in model["vocab"].items()]
    entries += [(a["id"], a["content"], _T.CONTROL if a.get("special") else _T.USER_DEFINED)
                for a in data.get("added_tokens", [])]
    for i, text, kind in entries:
        if i >= vocab_size:
            raise ConfigError(f"{file}: token id {i} is beyond the model's {vocab_size} embeddings")
        tokens[i], types[i] = text, kind
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", _T.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    tok = Tokenizer.from_dir(folder)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_ids:
        w.add_eos_token_id(tok.eos_token_ids[0])
    if len(tok.eos_token_ids) > 1:  # e.g. Llama 3's <|eot_id|>: llama.cpp stops on it too
        w.add_eot_token_id(tok.eos_token_ids[1])
    if len(tok.eos_token_ids) > 2:
        w.add_eom_token_id(tok.eos_token_ids[2])
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    bos = [tok.bos_token_id]
    w.add_add_bos_token(tok.encode("a")[:1] == bos and tok.encode("a", False)[:1] != bos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer (the split regex), None if not byte-level."""
    from vllm_jax.tokenizer import PRE_TOKENIZER_SPLITS

    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if not any(s.get("type") == "ByteLevel" for s in steps):
        return None
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    for name, regex in PRE_TOKENIZER_SPLITS.items():
        if regex in regexes:
            return name
    log.warning("unknown pre-tokenizer split %r: writing tokenizer.ggml.pre=default", regexes)
    return "default"
