"""Tiny, deterministic Qwen3 checkpoints (tokenizer + random weights) built locally for the tests.

`build_tokenizer` trains a small byte-level BPE with Qwen3's pre-tokenizer and added tokens;
`build_checkpoint` saves a random `Qwen3ForCausalLM` with `save_pretrained` next to that tokenizer;
`load_hf_model` loads it back as the PyTorch reference. Nothing is cached: pass a fresh directory.
"""

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2/Qwen3's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer rebuilds the tokenizer with).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3's added tokens in Qwen3's order (ids follow the BPE vocab), with its `special` flags:
# the tool/think/fim tokens are *not* special, so decode(skip_special_tokens=True) keeps them.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
MIN_TOKENIZER_VOCAB = 256 + len(ADDED_TOKENS)  # the byte alphabet plus the added tokens
TOKENIZER_VOCAB_SIZE = 480
VOCAB_SIZE = 512  # model vocab: like Qwen3 (151936 vs 151669), a little larger than the tokenizer's

# A Qwen3-shaped ChatML template: optional tools block in the system turn, <think> reasoning kept only for
# assistant turns after the last user query, tool responses folded into user turns, and the empty think
# block after the generation prompt when enable_thinking is false.
# The demo model ships a chat template shaped like Qwen3's (system/user/assistant, tools, reasoning stripped from
# earlier turns, the enable_thinking switch); the tiny test tokenizers use the same one.
CHAT_TEMPLATE = json.loads((Path(__file__).resolve().parents[1] / "qwen3_jax" / "demo_model" / "tokenizer_config.json")
                           .read_text(encoding="utf-8"))["chat_template"]

_WORDS = (
    "the a an of to and in is it that for on with as was be by at this from or have not are but they one all "
    "we you he she his her their there what which when where who how can will would could should about into "
    "model token text word number small large fast slow cache layer head attention query key value weight norm "
    "user assistant system think answer question reason step tool call result time first last next then "
    "quick brown fox jumps over lazy dog river mountain city light water stone green blue red yellow house "
    "garden morning evening summer winter people world little great every other after before because between"
).split()
_EXTRA_LINES = [
    "Café, naïve façade, résumé, jalapeño, Zürich, crème brûlée.",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 😀 🚀 👍🏽 ❤️ 🇫🇷",
    "Math: 3.14159 + 2.71828 = 5.85987; 100% of 42 is 42! (x^2 - 1) / [y * z] {a: b} <tag> #hash @at $5 & ~ `code`",
    "def f(x):\n    return x * 2  # double\n\nfor i in range(10):\n    print(i, f(i))",
]


def training_corpus(seed: int = 0, n_lines: int = 400) -> list[str]:
    """Deterministic English-ish text plus digits, punctuation, code, accents, CJK and emoji."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        n = rng.randint(6, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words.insert(rng.randint(1, n), str(rng.randint(0, 99999)))
        if rng.random() < 0.2:
            words.insert(rng.randint(1, n), rng.choice(["I'm", "don't", "it's", "we'll", "they've", "you'd"]))
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ",", ";", ":"]))
        lines.append(_EXTRA_LINES[i % len(_EXTRA_LINES)])
    return lines


def _added_token(content: str, special: bool) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)


def build_tokenizer(out_dir, vocab_size: int = TOKENIZER_VOCAB_SIZE, *, model_max_length: int = 131072) -> Path:
    """Write tokenizer.json + tokenizer_config.json (chat_template inside) for a Qwen3-like BPE of `vocab_size`."""
    if vocab_size < MIN_TOKENIZER_VOCAB + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: need > {MIN_TOKENIZER_VOCAB} (256 bytes + added)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    n_bpe = vocab_size - len(ADDED_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    if tok.get_vocab_size() != n_bpe:
        raise ValueError(f"vocab_size={vocab_size} is too large for the built-in corpus "
                         f"(BPE reached {tok.get_vocab_size()} of {n_bpe} tokens)")
    tok.add_tokens([_added_token(content, special) for content, special in ADDED_TOKENS])
    tok.save(str(out / "tokenizer.json"))

    added = {
        str(tok.token_to_id(content)): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": special}
        for content, special in ADDED_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in ADDED_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


def build_checkpoint(
    out_dir,
    *,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 32,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_shard_size=None,
    norm_weight_scale: float | None = None,
    seed: int = 0,
    legacy_config: bool = False,
    **config_overrides,
) -> Path:
    """Save a random Qwen3ForCausalLM (safetensors), its generation_config.json and a tiny tokenizer; return the dir.

    `norm_weight_scale` draws q_norm/k_norm weights from U(0, scale) (real checkpoints reach ~100); otherwise
    they, like every other RMSNorm weight, are drawn from U(0.5, 1.5) so a norm bug cannot hide behind ones.
    `max_shard_size` (e.g. "200KB") writes a sharded checkpoint with model.safetensors.index.json.
    `legacy_config` rewrites config.json the way transformers 4.5x wrote released Qwen3 checkpoints
    (`rope_theta`/`rope_scaling`/`torch_dtype` instead of `rope_parameters`/`dtype`).
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    tok_vocab = vocab_size - min(32, vocab_size - MIN_TOKENIZER_VOCAB - 1)
    if tok_vocab > vocab_size or tok_vocab <= MIN_TOKENIZER_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is too small: need > {MIN_TOKENIZER_VOCAB} (256 bytes + added)")
    build_tokenizer(out, vocab_size=tok_vocab)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")

    config_kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, head_dim=head_dim, tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=2048, max_window_layers=num_hidden_layers, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=endoftext, eos_token_id=im_end,
    )
    config_kwargs.update(config_overrides)
    config = Qwen3Config(**config_kwargs)

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                continue
            if norm_weight_scale is not None and name.endswith(("q_norm.weight", "k_norm.weight")):
                lo, hi = 0.0, float(norm_weight_scale)
            else:
                lo, hi = 0.5, 1.5
            param.copy_(torch.rand(param.shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext,
        do_sample=True, temperature=0.6, top_k=20, top_p=0.95,
    )
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    if legacy_config:
        _write_legacy_config(out / "config.json")
    return out


def _write_legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json in the transformers-4.5x layout of the released Qwen3 checkpoints."""
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters") or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" and not rope else {"rope_type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    cfg.pop("pad_token_id", None)
    cfg["transformers_version"] = "4.51.0"
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def load_hf_model(model_dir, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """The Hugging Face reference model for a checkpoint dir, in eval mode.

    sdpa is HF's default attention and, like our kernels, keeps the scores in float32; "eager" rounds the bf16
    scores before the softmax, which with q/k norm weights near 100 moves bf16 logits by ~2% on its own.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, attn_implementation=attn_implementation)
    return model.eval()
