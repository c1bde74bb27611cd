"""The tokenizer against transformers: ids, decoded text, chat prompts, streamed text.

Tokenizers are trained here on a small corpus (no hub access), saved as model folders and as GGUF
metadata, and loaded both by `vllm_jax.tokenizer` and by `transformers.AutoTokenizer`.
"""

import json
import random
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from vllm_jax.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer  # noqa: E402

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "café naïve résumé façade Ünïcödé straße",
    "你好 中文 文本 😀 emoji 🎉",
    "a   b\n\n\tc    indented\n    code block\r\n",
    "numbers 12345 and 2024-06-01, punctuation: (a) [b] {c}?!",
    "I'm sure they're here, it's fine, we've done it.",
] * 30

STRINGS = [
    "Hello world!",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "café naïve résumé",
    "你好世界",
    "thumbs 👍🏽 party 🎉🚀 family 👨‍👩‍👧",
    "a   b\n\n\tc",
    "\n\n",
    " ",
    "",
    "numbers 1234567 3.14159",
    "I'm here; they'll go.",
    "<|im_start|>user\nhi<|im_end|>",
    "<s> [INST] hi [/INST] x</s>",
    "think: <think>hmm</think>",
    "unk <unk> and <|begin_of_text|>",
]

CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
TOOL_USE_TEMPLATE = ("{{ bos_token }}[TOOLS]{{ tools | tojson(indent=2) }}[/TOOLS]"
                     "{{ messages[-1]['content'] }}{{ unk_token }}")

CHAT_SYSTEM = [
    {"role": "system", "content": "Be terse. Réponds en français."},
    {"role": "user", "content": "What is 2+2? 🤔"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "  And 你好?  "},
]
CHAT_PLAIN = [
    {"role": "user", "content": "Hi there 👋"},
    {"role": "assistant", "content": "Hello! How can I help?", "tool_calls": None},
    {"role": "user", "content": "Tell me a joke."},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo <now>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _train_byte_level(special_tokens, pre_tokenizer) -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def _train_sentencepiece() -> Backend:
    """SentencePiece-style BPE like Llama 2 / Mistral: Metaspace, `<0xNN>` byte fallback tokens."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = Backend(models.BPE())
    trained.pre_tokenizer = metaspace
    corpus = [line for line in CORPUS if "😀" not in line]  # leave emoji and most CJK to byte fallback
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, limit_alphabet=60))
    learned = json.loads(trained.to_str())["model"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += sorted(learned["vocab"], key=learned["vocab"].get)
    backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m) for m in learned["merges"]],
                                 unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return backend


def _save(backend, folder: Path, template_in_config=None, generation_eos=None, **special_tokens) -> Path:
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    fast.save_pretrained(folder)
    if template_in_config is not None:  # the older layout: the template inside tokenizer_config.json
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template_in_config
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder


def _train_chatml() -> Backend:
    """Qwen / SmolLM style: byte-level BPE with GPT-2's split, ChatML control tokens, `<think>` added."""
    backend = _train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                pre_tokenizers.ByteLevel(add_prefix_space=False))
    backend.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    return backend


def _train_llama3() -> Backend:
    """Llama 3 style: its split regex, then byte level; BOS added by the post-processor."""
    split = pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = _train_byte_level(specials, pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)])
    return backend


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """No BOS, the ChatML template inside tokenizer_config.json."""
    return _save(_train_chatml(), tmp_path_factory.mktemp("chatml"), template_in_config=CHATML_TEMPLATE,
                 generation_eos=[2, 0], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """The template in chat_template.jinja (as transformers 5 saves it), an extra eos in generation_config."""
    folder = _save(_train_llama3(), tmp_path_factory.mktemp("llama3"), bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>", generation_eos=1, chat_template=LLAMA3_TEMPLATE)
    assert (folder / "chat_template.jinja").is_file()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # transformers ignores this flag when there is a tokenizer.json: its post-processor decides.
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    return folder


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """Llama 2 / Mistral style: `<s>` added by the post-processor, named templates as a list in the config."""
    templates = [{"name": "default", "template": MISTRAL_TEMPLATE}, {"name": "tool_use", "template": TOOL_USE_TEMPLATE}]
    return _save(_train_sentencepiece(), tmp_path_factory.mktemp("spm"), template_in_config=templates,
                 bos_token="<s>", eos_token="</s>", unk_token="<unk>")


FOLDERS = ["chatml_dir", "llama3_dir", "sentencepiece_dir"]


@pytest.fixture(scope="module", params=FOLDERS)
def pair(request):
    folder = request.getfixturevalue(request.param)
    return Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)


def _assert_same_ids_and_text(ours: Tokenizer, reference):
    for text in STRINGS:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == reference.encode(text, add_special_tokens=add_special_tokens), (text, add_special_tokens)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def _assert_streams_like_decode(tokenizer: Tokenizer, ids: list[int], skip_special_tokens=True):
    stream = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [stream.add(token_id) for token_id in ids]
    assert "".join(deltas) == stream.text
    assert stream.text + stream.flush() == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return deltas


def test_folder_ids_and_decode_match_transformers(pair):
    ours, reference = pair
    assert json.loads(ours.backend.to_str()) == json.loads(reference.backend_tokenizer.to_str())
    _assert_same_ids_and_text(ours, reference)
    assert ours.vocab_size == len(reference)
    assert ours.bos_token == reference.bos_token and ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token == reference.eos_token and ours.eos_token_ids[0] == reference.eos_token_id
    assert ours.pad_token_id == reference.pad_token_id


def test_special_token_ids(chatml_dir, llama3_dir, sentencepiece_dir):
    chatml, llama3, spm = (Tokenizer.from_dir(d) for d in (chatml_dir, llama3_dir, sentencepiece_dir))
    assert chatml.bos_token_id is None and chatml.eos_token_ids == [2, 0]  # generation_config adds <|endoftext|>
    assert llama3.encode("hi")[0] == llama3.bos_token_id == 0 and llama3.eos_token_ids == [4, 1]
    assert spm.encode("hi")[0] == spm.bos_token_id == 1 and spm.eos_token_ids == [2]
    assert spm.encode("hi", add_special_tokens=False)[0] != 1
    assert chatml.token_to_id("<think>") is not None and chatml.id_to_token(2) == "<|im_end|>"


@pytest.mark.parametrize("messages", [CHAT_SYSTEM, CHAT_PLAIN], ids=["system", "plain"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(pair, messages, add_generation_prompt):
    ours, reference = pair
    if ours.bos_token == "<s>" and messages is CHAT_SYSTEM:
        messages = messages[1:]  # the Mistral template has no system role
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_tools_and_kwargs(chatml_dir, sentencepiece_dir):
    for folder in (chatml_dir, sentencepiece_dir):  # the second picks its "tool_use" template
        ours, reference = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
        expected = reference.apply_chat_template(CHAT_PLAIN, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(CHAT_PLAIN, tools=TOOLS) == expected
    ours, reference = Tokenizer.from_dir(chatml_dir), AutoTokenizer.from_pretrained(chatml_dir)
    expected = reference.apply_chat_template(CHAT_PLAIN, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    assert ours.apply_chat_template(CHAT_PLAIN, enable_thinking=False) == expected
    assert expected.endswith("<think>\n\n</think>\n\n")


def test_chat_template_raise_exception(sentencepiece_dir, llama3_dir):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError):
        AutoTokenizer.from_pretrained(sentencepiece_dir).apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match="roles must alternate"):
        Tokenizer.from_dir(sentencepiece_dir).apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="Unknown role: tool"):
        Tokenizer.from_dir(llama3_dir).apply_chat_template([{"role": "tool", "content": "x"}])


def test_stream_matches_decode_token_by_token(pair):
    ours, _ = pair
    split_chars = 0
    for text in STRINGS + ["".join(STRINGS)]:
        ids = ours.encode(text)
        for skip in (True, False):
            deltas = _assert_streams_like_decode(ours, ids, skip)
            assert not any("\ufffd" in delta for delta in deltas), text
        split_chars += sum("\ufffd" in ours.decode([i]) for i in ids)
    assert split_chars > 0  # some characters do span several tokens, so holding back was exercised


def test_stream_of_random_ids_matches_decode(pair):
    ours, _ = pair
    rng = random.Random(0)
    for _ in range(30):
        _assert_streams_like_decode(ours, [rng.randrange(ours.vocab_size) for _ in range(40)], rng.random() < 0.5)


# ---- GGUF

@pytest.fixture(scope="module")
def smollm2(real_model):
    path = real_model("smollm2-135m")
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path), path)
    return ours, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # llama.cpp token types


def _sentencepiece_vocab():
    """The SentencePiece vocabulary as a GGUF lists it, plus a user-defined and a control token."""
    vocab = _train_sentencepiece().get_vocab(with_added_tokens=False)
    tokens = sorted(vocab, key=vocab.get) + ["<think>", "<|im_start|>"]
    types = [UNKNOWN, CONTROL, CONTROL, *[BYTE] * 256] + [NORMAL] * (len(tokens) - 261) + [USER_DEFINED, CONTROL]
    return {"model": "llama", "tokens": tokens, "types": types, "ids": {"bos": 1, "eos": 2, "unk": 0}}


def _gemma_vocab():
    """Gemma's layout: pad/eos/bos/unk/mask first, and runs of whitespace stored as real spaces."""
    vocab = _train_sentencepiece().get_vocab(with_added_tokens=False)
    learned = sorted(vocab, key=vocab.get)[259:]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{b:02X}>" for b in range(256)), *learned,
              "   ", "     ", "<start_of_turn>", "<end_of_turn>"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, USER_DEFINED, *[BYTE] * 256, *[NORMAL] * (len(learned) + 2),
             CONTROL, CONTROL]
    assert "▁▁▁" not in learned and "▁▁▁▁▁" not in learned  # what the two runs of spaces are renamed to
    return {"model": "llama", "tokens": tokens, "types": types, "ids": {"bos": 2, "eos": 1, "unk": 3, "pad": 0}}


def _byte_level_vocab(backend: Backend, pre: str, ids: dict):
    """A byte-level BPE as a GGUF lists it: tokens in the byte alphabet, merges, control tokens typed."""
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    types = [NORMAL if t not in added else CONTROL if added[t] else USER_DEFINED for t in tokens]
    merges = [" ".join(merge) for merge in json.loads(backend.to_str())["model"]["merges"]]
    return {"model": "gpt2", "tokens": tokens, "types": types, "ids": ids, "merges": merges, "pre": pre}


def _write_gguf(path: Path, architecture, vocab: dict, add_bos=None, chat_template=None):
    """A tiny GGUF: tokenizer metadata, enough model config for transformers to load it, one small tensor."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_key_length(4)
    writer.add_value_length(4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "llama":  # SentencePiece scores: the merge order transformers rebuilds
        writer.add_token_scores([-float(i) if kind == NORMAL else 0.0 for i, kind in enumerate(vocab["types"])])
    else:
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_merges(vocab["merges"])
    for name, token_id in vocab["ids"].items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(vocab["tokens"]), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_CASES = {  # name: (architecture, vocabulary, add_bos_token, chat template)
    "llama": ("llama", _sentencepiece_vocab, None, MISTRAL_TEMPLATE),
    "llama-no-bos": ("llama", _sentencepiece_vocab, False, MISTRAL_TEMPLATE),
    "gemma3": ("gemma3", _gemma_vocab, None, MISTRAL_TEMPLATE),
    "gpt2-llama-bpe": ("llama", lambda: _byte_level_vocab(_train_llama3(), "llama-bpe", {"bos": 0, "eos": 4}),
                       True, LLAMA3_TEMPLATE),
    "gpt2-qwen2": ("qwen2", lambda: _byte_level_vocab(_train_chatml(), "qwen2", {"eos": 2, "pad": 0}),
                   None, CHATML_TEMPLATE),
}


@pytest.fixture(scope="module", params=["smollm2", *GGUF_CASES])
def gguf_pair(request, tmp_path_factory):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")
    architecture, vocab, add_bos, template = GGUF_CASES[request.param]
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_gguf(path, architecture, vocab(), add_bos, template)
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf(gguf.GGUFReader(path), path), reference


def test_gguf_matches_transformers(gguf_pair):
    ours, reference = gguf_pair
    expected = json.loads(reference.backend_tokenizer.to_str())
    # transformers appends GPT-2's default `<|endoftext|>` when the file lacks it (Llama 3 does), an id past
    # the model's embedding table; we leave it out.
    appended = [t["content"] for t in expected["added_tokens"] if t["id"] >= ours.vocab_size]
    assert appended in ([], ["<|endoftext|>"])
    expected["added_tokens"] = [t for t in expected["added_tokens"] if t["id"] < ours.vocab_size]
    assert json.loads(ours.backend.to_str()) == expected
    _assert_same_ids_and_text(ours, reference)
    assert ours.vocab_size == len(reference) - len(appended)
    assert (ours.bos_token_id, ours.eos_token_ids[0], ours.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    for messages in (CHAT_PLAIN, CHAT_SYSTEM[1:]):
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    for text in STRINGS:
        deltas = _assert_streams_like_decode(ours, ours.encode(text))
        assert not any("\ufffd" in delta for delta in deltas)


def test_smollm2_gguf_known_ids(smollm2):
    ours, _ = smollm2
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (1, [2], 49152)
    assert ours.encode("<|im_start|>user\nHi<|im_end|>")[0] == 1  # no BOS added, control tokens kept whole
