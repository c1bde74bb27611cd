"""Write a (quantized) model as a GGUF file that llama.cpp and vllm_jax.loader.gguf can load."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np

from vllm_jax.kernels import quant
from vllm_jax.loader.gguf import permute_rows
from vllm_jax.models.base import ConfigError, ModelConfig, Weight
from vllm_jax.tokenizer import PRE_TOKENIZER_SPLITS, Tokenizer

log = logging.getLogger("vllm_jax")

_FILE_TYPES = {
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q8_0": "MOSTLY_Q8_0", "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S",
    "q5_k": "MOSTLY_Q5_K_S", "q6_k": "MOSTLY_Q6_K", None: "ALL_F32",
}
_T = gguf.TokenType


def save_gguf(path_out, cls, cfg: ModelConfig, weights_host: dict, tokenizer_dir) -> None:
    """weights_host: {weight name: quant.QuantTensor or numpy array} of the model class `cls`
    (its declarations name the GGUF tensors), tokenizer_dir: an HF folder."""
    arch, keys, extra = cls.gguf_metadata(cfg)
    w = gguf.GGUFWriter(str(path_out), arch)
    w.add_name(Path(tokenizer_dir).name)
    for key, value in keys.items():
        _add_value(w, f"{arch}.{key}", value)
    w.add_vocab_size(cfg.vocab_size)
    qtypes = [x.qtype for x in weights_host.values() if isinstance(x, quant.QuantTensor)]
    main = max(set(qtypes), key=qtypes.count) if qtypes else None
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[main]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, Path(tokenizer_dir), cfg.vocab_size)
    for name, x in extra.items():
        w.add_tensor(name, x)
    tensors: dict[str, list[Weight]] = {}
    for spec in cls.weights(cfg):
        if spec.name in weights_host:
            tensors.setdefault(spec.gguf, []).append(spec)
    for name, specs in tensors.items():
        _add_tensor(w, name, specs, weights_host)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s (%.1f MiB)", path_out, Path(path_out).stat().st_size / 2**20)


def _add_value(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def _add_tensor(w: gguf.GGUFWriter, name: str, specs: list[Weight], weights_host: dict) -> None:
    """One GGUF tensor from the weights that declare it (several: a fused layout, by rows)."""
    parts = []
    for spec in sorted(specs, key=lambda s: s.rows or (0, 0)):
        x = weights_host[spec.name]
        raw = x.raw if isinstance(x, quant.QuantTensor) else np.asarray(x)
        if spec.gguf_permute:
            raw = permute_rows(raw, spec.gguf_permute)
        parts.append(raw)
    x0 = weights_host[specs[0].name]
    data = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2
                                                                               if parts[0].ndim > 1 else 0))
    if isinstance(x0, quant.QuantTensor):
        if any(not isinstance(weights_host[s.name], quant.QuantTensor)
               or weights_host[s.name].qtype != x0.qtype for s in specs):
            raise ConfigError(f"{name}: the weights fused into it were quantized differently")
        w.add_tensor(name, data, raw_dtype=quant.QTYPES[x0.qtype][2])
    elif data.ndim == 1 or specs[0].dtype == "f32" or data.dtype not in (np.float16,
                                                                         np.dtype("bfloat16")):
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif data.dtype == np.float16:
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)


def add_tokenizer(w: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """GPT-2 style (byte-level BPE) tokenizer metadata from a Hugging Face tokenizer.json."""
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
