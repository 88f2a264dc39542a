"""qwen3_jax.tokenizer against transformers' AutoTokenizer on the tiny Qwen3-like tokenizer."""

import json
import random
import shutil

import pytest
import transformers
from tiny_checkpoint import ADDED_TOKENS, build_tokenizer

from qwen3_jax.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  \n\n\tand tabs\r\n",
    "Numbers 1234567890, 3.14159 and 100%; I'm sure they'll work.",
    "Café naïve résumé Zürich crème brûlée",
    "e\u0301 (decomposed) vs \u00e9 (composed)",  # NFC normalization
    "Emoji 😀🚀👍🏽 ❤️ 🇫🇷 and a family 👨‍👩‍👧",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|im_end|><|endoftext|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|fim_prefix|>x<|vision_pad|>",
    "",
    " ",
    "\ufffd literal replacement char",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Résumé en 日本語? 😀"}],
    [  # multi-turn: earlier reasoning is stripped, reasoning after the last query is kept
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nAgain add.\n</think>\n\n6"},
    ],
    [
        {"role": "user", "content": "Question one"},
        {"role": "assistant", "content": "Plain answer", "reasoning_content": "explicit reasoning"},
        {"role": "user", "content": "Question two"},
        {"role": "assistant", "content": "Answer two", "reasoning": "aliased reasoning field", "tool_calls": None},
    ],
    [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"wind\": 3}"},
    ],
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_build_tokenizer_is_deterministic(tok_dir, tmp_path):
    again = build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes()


def test_vocab_and_special_tokens(tok, hf):
    assert type(hf).__name__ == "Qwen2Tokenizer"
    assert tok.vocab_size == hf.vocab_size
    assert len(tok) == len(hf)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == hf.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == hf.pad_token_id
    assert tok.bos_token is None and tok.bos_token_id is None and hf.bos_token_id is None
    assert tok.eos_token_ids == (tok.eos_token_id,)
    for content, _ in ADDED_TOKENS:
        assert tok.token_to_id(content) == hf.convert_tokens_to_ids(content)
        assert tok.id_to_token(tok.token_to_id(content)) == content
    assert tok.all_special_ids == sorted(hf.all_special_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_matches_hf(tok, hf, text):
    for add_special_tokens in (True, False):
        ids = tok.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf.encode(text, add_special_tokens=add_special_tokens)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if "\u0301" not in text:  # NFC changes the decomposed string, the rest round-trips
        assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<think>")
    # <think> is not special in Qwen3: skip_special_tokens keeps it and drops <|im_start|>
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>"


def test_decode_arbitrary_ids_matches_hf(tok, hf):
    rng = random.Random(0)
    for _ in range(50):  # random ids make broken UTF-8 too; ids past the vocabulary decode to nothing
        ids = [rng.randrange(len(tok) + 8) for _ in range(rng.randint(1, 20))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(tok.eos_token_id) == "<|im_end|>"


def hf_normalises_messages(hf) -> bool:
    """Whether this transformers drops None fields and aliases `reasoning` before rendering, as ours does.

    Recent transformers (5.23, the version CI installs) do; older ones (5.17, on the GPU image) render the
    messages as given, so conversations that rely on it cannot be compared with them."""
    saved, hf.chat_template = hf.chat_template, "{{ messages[0] | tojson }}"
    try:
        return "name" not in hf.apply_chat_template([{"role": "user", "content": "a", "name": None}], tokenize=False)
    finally:
        hf.chat_template = saved


def _needs_normalisation(messages) -> bool:
    return any(v is None or k == "reasoning" for m in messages for k, v in m.items())


@pytest.mark.parametrize("conv_index", range(len(CONVERSATIONS)))
def test_chat_template_matches_hf(tok, hf, conv_index):
    messages = CONVERSATIONS[conv_index]
    if _needs_normalisation(messages) and not hf_normalises_messages(hf):
        pytest.skip(f"transformers {transformers.__version__} renders raw messages (None fields, no reasoning alias)")
    for add_generation_prompt in (True, False):
        for enable_thinking in (None, True, False):
            for tools in (None, TOOLS):
                kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
                expected = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)
                got = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              enable_thinking=enable_thinking, tools=tools)
                assert got == expected
                assert tok.encode(got) == hf.encode(expected)


def test_chat_template_shape(tok):
    messages = CONVERSATIONS[2]
    assert tok.apply_chat_template(messages[:2], enable_thinking=False) == (
        "<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(messages[:2]).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages[:2], enable_thinking=True).endswith("<|im_start|>assistant\n")
    full = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert "Add them." not in full  # reasoning of the earlier turn is stripped
    assert full.endswith("<|im_start|>assistant\n<think>\nAgain add.\n</think>\n\n6<|im_end|>\n")
    assert "<|im_start|>assistant\n4<|im_end|>\n" in full


def test_chat_template_kwargs_reach_template(tmp_path, tok_dir, hf):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ eos_token }}|{{ pad_token }}|{{ bos_token is defined }}|{{ custom }}|"
                               "{{ tools is none }}|{{ messages[0] | tojson(indent=1) }}|{{ strftime_now('%Y') }}"
                               "{% if messages | length > 5 %}{{ raise_exception('too long') }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "é", "name": None}]
    got = ours.apply_chat_template(messages, custom="X")
    assert got.startswith('<|im_end|>|<|endoftext|>|False|X|True|{\n "role": "user",\n "content": "é"\n}|')
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="too long"):
        ours.apply_chat_template(messages * 6)
    if not hf_normalises_messages(hf):  # the None field
        pytest.skip(f"transformers {transformers.__version__} renders raw messages (None fields kept)")
    hf.chat_template, saved = config["chat_template"], hf.chat_template
    try:
        assert got == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, custom="X")
    finally:
        hf.chat_template = saved


def test_loads_transformers5_saved_dir(tok, hf, tmp_path):
    """transformers 5 save_pretrained writes the template to chat_template.jinja, not tokenizer_config.json."""
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    saved = Tokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        assert saved.apply_chat_template(messages, enable_thinking=False) == tok.apply_chat_template(
            messages, enable_thinking=False)
    for text in TEXTS:
        assert saved.encode(text) == tok.encode(text)
    assert saved.eos_token_id == tok.eos_token_id and saved.pad_token_id == tok.pad_token_id


def test_named_chat_templates(tok, hf, tmp_path):
    """Several templates: transformers 5 saves chat_template.jinja plus additional_chat_templates/<name>.jinja."""
    saved = hf.chat_template
    hf.chat_template = {"default": saved, "tool_use": "TOOLS {{ tools | length }}"}
    try:
        hf.save_pretrained(tmp_path)
    finally:
        hf.chat_template = saved
    assert (tmp_path / "additional_chat_templates" / "tool_use.jinja").is_file()
    ours = Tokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[0]
    assert ours.apply_chat_template(messages, tools=TOOLS) == "TOOLS 1"
    assert ours.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_special_tokens_as_dicts_and_generation_config(tmp_path, tok_dir, tok):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    config["pad_token"] = {"content": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    endoftext = tok.token_to_id("<|endoftext|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, endoftext]}))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.eos_token == "<|im_end|>" and ours.pad_token_id == endoftext
    assert ours.eos_token_ids == (tok.eos_token_id, endoftext)


STREAM_TEXTS = [t for t in TEXTS if t] + [
    "中文混合English和😀emoji，还有ñ与ü。" * 3,
    "👨‍👩‍👧‍👦🏳️‍🌈🇯🇵 " * 4,
]


def _stream(tok, ids, chunk_sizes, skip=False):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces, i = [], 0
    for n in chunk_sizes:
        if i >= len(ids):
            break
        pieces.append(dec.add(ids[i] if n == 0 else ids[i:i + n]))  # n == 0: a single int id
        i += max(n, 1)
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_equals_decode(tok, text):
    ids = tok.encode(text)
    rng = random.Random(len(text))
    for skip in (False, True):
        full = tok.decode(ids, skip_special_tokens=skip)
        one_by_one = _stream(tok, ids, [0] * len(ids), skip)
        assert "".join(one_by_one) == full
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in one_by_one)
        chunks = _stream(tok, ids, [rng.randint(1, 4) for _ in ids], skip)
        assert "".join(chunks) == full


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode("日本語😀")
    assert len(ids) > 2  # multi-byte characters span several byte-level tokens here
    assert any(tok.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    dec = StreamDecoder(tok)
    outputs = [dec.add(i) for i in ids]
    assert "".join(outputs) == "日本語😀" and "" in outputs and dec.flush() == ""


def test_stream_decoder_arbitrary_ids(tok):
    import numpy as np

    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(len(tok) + 4) for _ in range(rng.randint(1, 30))]
        dec = tok.stream_decoder()
        out = "".join(dec.add(np.int32(i)) for i in ids) + dec.flush()
        assert out == tok.decode(ids)


def test_missing_files(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_files(tmp_path, tok_dir):
    (tmp_path / "tokenizer.json").write_text("{not json")
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",')
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 7}')
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_pretrained(tmp_path)


def test_no_chat_template(tmp_path, tok_dir):
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.encode("hello") == Tokenizer.from_pretrained(tok_dir).encode("hello")
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
