"""Text <-> token ids for a model folder or a GGUF file: encode, decode, chat templates, streaming.

The `tokenizers` library does the work. This module assembles its tokenizer the way transformers
does, so ids, decoded text and rendered chat prompts match `AutoTokenizer` exactly.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend


class TooManyTokens(ValueError):
    def __init__(self, num_tokens: int, max_tokens: int):
        super().__init__(f"{num_tokens} tokens, more than {max_tokens}")
        self.num_tokens, self.max_tokens = num_tokens, max_tokens


class Tokenizer:
    """A `tokenizers.Tokenizer` (`backend`) plus what a model folder or GGUF says around it.

    `eos_token_ids`: every id that ends generation (eos, then generation_config's / llama.cpp's extra stops).
    `vocab_size` counts added tokens, like `len(AutoTokenizer)`; the model's embedding may be larger.
    Encode a rendered chat prompt with `add_special_tokens=False`: the template already wrote the BOS.
    """

    def __init__(self, backend: Backend, special_tokens: dict[str, str], chat_templates: dict[str, str] | None = None,
                 extra_eos_token_ids=(), clean_up_spaces: bool = False):
        self.backend = backend
        self.special_tokens = special_tokens  # name -> text: what a chat template sees as `bos_token`, ...
        self.chat_templates = chat_templates or {}
        # transformers skips its clean-up for BPE: it would eat real spaces before punctuation.
        self.clean_up_spaces = clean_up_spaces and not isinstance(backend.model, models.BPE)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.special_token_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        # SentencePiece `<0xNN>` tokens: a run of them decodes as one, or all to U+FFFD if it is not UTF-8.
        self.byte_token_ids = set()
        if getattr(backend.model, "byte_fallback", False):
            self.byte_token_ids = {self.token_to_id(f"<0x{b:02X}>") for b in range(256)} - {None}
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.pad_token_id = self.token_to_id(special_tokens.get("pad_token"))
        eos_ids = [self.token_to_id(self.eos_token), *extra_eos_token_ids]
        self.eos_token_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """A Hugging Face model folder: tokenizer.json, tokenizer_config.json and friends."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # the legacy file only counts for configs without it
            config.update(_read_json(path / "special_tokens_map.json"))
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (a SentencePiece-only folder is not supported)")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        for token in config.get("added_tokens_decoder", {}).values():
            if token["content"] not in _added_tokens(backend):
                backend.add_tokens([AddedToken(**token)])

        # Every `*_token` entry is a special token, also model-specific ones like `image_token`.
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        named = {**config, **extra} if isinstance(extra, dict) else config
        special_tokens = {k: _content(v) for k, v in named.items() if k.endswith("_token") and _content(v)}
        extra_tokens = [_content(t) for t in extra] if isinstance(extra, list) else []
        _add_special_tokens(backend, [*special_tokens.values(), *extra_tokens])
        # With a tokenizer.json, transformers ignores `add_bos_token`: the file's post-processor decides.

        eos = _read_json(path / "generation_config.json").get("eos_token_id")
        return cls(backend, special_tokens, _chat_templates_in_dir(path, config),
                   extra_eos_token_ids=eos if isinstance(eos, list) else [eos],
                   clean_up_spaces=config.get("clean_up_tokenization_spaces", False))

    @classmethod
    def from_gguf(cls, reader, path=None) -> Tokenizer:
        """The tokenizer a GGUF file describes in its `tokenizer.*` metadata (`reader`: a gguf.GGUFReader)."""
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.arch"))}
        kind = meta.get("tokenizer.ggml.model")
        # `defaults`: the special tokens transformers' tokenizer class for this vocabulary adds on its own.
        if kind == "gpt2":
            backend, defaults = _byte_level_backend(meta), ("<|endoftext|>",)
        elif kind == "llama" and meta.get("general.architecture", "").startswith("gemma"):
            backend, defaults = _gemma_backend(meta), ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")
        elif kind == "llama":
            backend, defaults = _sentencepiece_backend(meta), ("<unk>", "<s>", "</s>")
        else:
            raise ValueError(f"{path or 'GGUF file'}: no tokenizer for tokenizer.ggml.model={kind!r}")

        tokens = meta["tokenizer.ggml.tokens"]
        ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in GGUF_SPECIAL_TOKEN_IDS.items()}
        special_tokens = {name: tokens[i] for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        _add_gguf_added_tokens(backend, meta, byte_level=kind == "gpt2")
        in_vocab = [t for t in defaults if backend.token_to_id(t) is not None]
        _add_special_tokens(backend, [*in_vocab, *special_tokens.values()])

        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SentencePiece
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        bos, eos = [(special_tokens[name], ids[name]) if add and name in special_tokens else None
                    for name, add in [("bos_token", add_bos), ("eos_token", add_eos)]]
        backend.post_processor = _bos_eos_processor(bos, eos)

        template = meta.get("tokenizer.chat_template")
        # llama.cpp stops on every end-of-generation token, not only on eos.
        stop_ids = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, special_tokens, {"default": template} if template else None, extra_eos_token_ids=stop_ids)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """The text's ids; with `max_tokens`, TooManyTokens for a longer text, before its id list is built."""
        # The batch call releases the GIL while it works (a single one holds it), and its fast
        # variant keeps no offsets, whose freeing would hold the GIL again (~1 s for 8M tokens):
        # a server thread encoding a huge prompt leaves the event loop running.
        encoding = self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        if max_tokens is not None and len(encoding) > max_tokens:
            raise TooManyTokens(len(encoding), max_tokens)
        return encoding.ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: with the BOS the model expects, but not a second one when the text
        already starts with it (a rendered chat template)."""
        bos = self.bos_token
        return self.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self.backend.decode_batch([[int(i) for i in ids]], skip_special_tokens=skip_special_tokens)[0]
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
                            chat_template: str | None = None, **kwargs) -> str:
        """The prompt transformers' `apply_chat_template(..., tokenize=False)` renders.

        `chat_template` overrides the model's: a template name (e.g. "tool_use") or jinja source.
        """
        if chat_template is None:
            chat_template = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        source = self.chat_templates.get(chat_template, chat_template if chat_template != "default" else None)
        if source is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=")
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise ValueError("tools must be JSON schemas (dicts)")
        # Templates often test `"key" in message`, so an explicit None (OpenAI style) must not count as present.
        messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in _plain(messages)]
        variables = {**self.special_tokens, **_plain(kwargs)}
        return _compile_template(source).render(messages=messages, tools=_plain(tools), documents=None,
                                                add_generation_prompt=add_generation_prompt, **variables)


class IncrementalDetokenizer:
    """Streams the text of generated ids: the deltas add up to `tokenizer.decode(ids)` exactly.

    Each step decodes only a short window: the tokens not yet emitted plus the ones that produced the
    previous delta, so leading-space stripping and bytes of a split character see the same context as
    a full decode. A delta is held back while the window ends in U+FFFD (an unfinished character) or
    in a byte-fallback token, whose run of bytes a later byte token could still turn into U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start: the tokens of the previous delta
        self._read_offset = 0  # first token whose text has not been emitted
        self._prefix_text = ""  # decode(token_ids[_prefix_offset:_read_offset])

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD, as in `decode`)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if not final and self._ends_in_byte_token():
            return ""
        window = self.tokenizer.decode(self.token_ids[self._prefix_offset:], self.skip_special_tokens)
        if len(window) <= len(self._prefix_text) or (window.endswith("\ufffd") and not final):
            return ""
        delta = window[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._prefix_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset],
                                                  self.skip_special_tokens)
        self.text += delta
        return delta

    def _ends_in_byte_token(self) -> bool:
        skipped = self.tokenizer.special_token_ids if self.skip_special_tokens else ()
        last = next((i for i in reversed(self.token_ids) if i not in skipped), None)
        return last in self.tokenizer.byte_token_ids


# ---- model folders

def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    """A token as tokenizer_config writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _added_tokens(backend: Backend) -> set[str]:
    return {token.content for token in backend.get_added_tokens_decoder().values()}


def _add_special_tokens(backend: Backend, tokens: list[str]) -> None:
    added = _added_tokens(backend)
    new = [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t not in added]
    if new:
        backend.add_special_tokens(new)


def _chat_templates_in_dir(path: Path, config: dict) -> dict[str, str]:
    """Template files (what transformers 5 writes) win over the `chat_template` of tokenizer_config."""
    templates = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((path / "additional_chat_templates").glob("*.jinja")):
        templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return {"default": template} if template else {}


def _clean_up_spaces(text: str) -> str:
    for before, after in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]:
        text = text.replace(before, after)
    return text


# ---- GGUF metadata

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
GGUF_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                          "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the split regex its merges were learned with; others (e.g. "smollm") use GPT-2's.
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: bytes that print stay, the rest move past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    alphabet.update((b, chr(256 + n)) for n, b in enumerate(b for b in range(256) if b not in alphabet))
    return alphabet


def _byte_level_backend(meta: dict) -> Backend:
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())

    def spell(token: str) -> str:  # files may store a token as its plain text rather than in the byte alphabet
        return token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {spell(t): i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab, merges, fuse_unk=False, continuing_subword_prefix="", end_of_word_suffix=""))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict) -> Backend:
    """SentencePiece BPE as llama/mistral use it: `▁` for spaces, `<0xNN>` tokens for unknown bytes."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    backend = Backend(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    return backend


def _gemma_backend(meta: dict) -> Backend:
    """Gemma's SentencePiece: no prefix space, runs of spaces stored as real spaces, merge order = file order."""
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta, vocab, {t: -i for i, t in enumerate(tokens)})
    backend = Backend(models.BPE(vocab, merges, fuse_unk=True, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _merges(meta: dict, vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The file's merges, or every split of a token into two tokens, best-scored token first."""
    if "tokenizer.ggml.merges" in meta:
        return [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    candidates = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(left, right, score) for left, right in splits]
    candidates.sort(key=lambda c: (-c[2], -len(c[0]), -len(c[1])))
    return [(left, right) for left, right, _ in candidates]


def _add_gguf_added_tokens(backend: Backend, meta: dict, byte_level: bool) -> None:
    """Control tokens become special tokens, user-defined ones (like `<think>`) plain added tokens."""
    letters = set(_byte_alphabet().values())
    pairs = list(zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])))
    # In a byte-level vocabulary a control token outside the byte alphabet is a mislabel: skip it.
    control = [t for t, kind in pairs if kind == CONTROL and (not byte_level or set(t) <= letters)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, kind in pairs if kind == USER_DEFINED and backend.token_to_id(t) is not None]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _bos_eos_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """`[bos] $A [eos]`, as transformers builds it from `add_bos_token` / `add_eos_token`."""

    specials = [token for token in (bos, eos) if token is not None]

    def sequence(name: str, type_id: int) -> str:
        parts = ([bos[0]] if bos else []) + [f"${name}"] + ([eos[0]] if eos else [])
        return " ".join(f"{part}:{type_id}" for part in parts)

    return processors.TemplateProcessing(single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
                                         special_tokens=specials)


# ---- chat templates

class ChatTemplateError(ValueError, jinja2.TemplateError):
    """A template called `raise_exception`, e.g. because the roles do not alternate."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _plain(value):
    """A fresh copy of JSON-like data, so a template never sees (or touches) the caller's objects."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _alias_reasoning(message: dict) -> dict:
    """Templates read a message's reasoning as `reasoning_content` (most) or `thinking` (gpt-oss)."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}
