"""Prefill then decode: batched, ragged prompts, sampling inside jit, EOS stopping and streaming.

Prompts are right-padded: row b's tokens sit at positions 0..len_b-1 and its first generated token at len_b, so
every row computes exactly what it would compute alone. Pad tokens write junk keys past a row's length; decode
overwrites each such slot before any query can see it (a query at position p attends keys j <= p only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen3Config
from .kv_cache import KVCache
from .model import forward
from .ops import Kernels
from .sampling import SamplingParams, sample
from .tokenizer import StreamDecoder, Tokenizer
from .weights import load_params

log = logging.getLogger("qwen3_jax")
PAD_MULTIPLE = 64  # prompt lengths and cache sizes are rounded up to this, so similar requests share compilations
# XLA may otherwise skip a bf16 rounding between fused ops ("excess precision"); torch rounds after every op, and
# so must we to produce HF's exact tokens.
EXACT_ROUNDING = {"xla_allow_excess_precision": False}
DECODE_CHUNK = 8  # decode steps per device call: tokens reach the host (stream, EOS check) this often


@dataclasses.dataclass
class Qwen3:
    """A loaded model: config, params on the device, tokenizer, generation defaults and the kernel choice."""

    config: Qwen3Config
    params: dict
    tokenizer: Tokenizer | None
    generation_config: dict
    kernels: Kernels
    model_dir: Path | None = None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or ())
        return tuple(eos)

    def default_sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` applied (None keeps the default)."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def chat_prompt(self, messages: str | list[dict], *, enable_thinking: bool | None = None) -> str:
        """Render a user message (or a list of chat messages) with the checkpoint's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                             enable_thinking=enable_thinking)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass token ids instead of text")
        return self.tokenizer


def load(model_dir: str | Path, *, dtype: str | None = None, kernels: str | Kernels = "auto") -> Qwen3:
    """Load a Hugging Face Qwen3 checkpoint directory (config, safetensors weights, tokenizer, generation config)."""
    model_dir = Path(model_dir)
    config = Qwen3Config.from_pretrained(model_dir, dtype=dtype)
    kernels = Kernels.resolve(kernels)
    # the small files first, so a broken tokenizer or generation config fails before gigabytes are read
    tokenizer = Tokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    gen_path = model_dir / "generation_config.json"
    generation_config = {}
    if gen_path.is_file():
        try:
            generation_config = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen_path}: not valid JSON ({e})") from None
    params = load_params(model_dir, config)
    return Qwen3(config, params, tokenizer, generation_config, kernels, model_dir)


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    compile_s: float = 0.0
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"time to first token {self.time_to_first_token_s * 1e3:.1f} ms | prefill {self.prompt_tokens} tok "
                f"at {self.prefill_tokens_per_s:,.0f} tok/s | decode {self.decode_tokens} tok at "
                f"{self.decode_tokens_per_s:,.1f} tok/s | compile {self.compile_s:.1f} s")


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the EOS token if one was produced
    texts: list[str] | None
    stats: GenerationStats


class _Steps:
    """The jitted prefill and decode-chunk steps for one configuration, compiled once per argument shape."""

    _cache: dict = {}

    def __new__(cls, config: Qwen3Config, kernels: Kernels, greedy: bool, chunk: int):
        key = (config, kernels, greedy, chunk)
        if key not in cls._cache:
            self = super().__new__(cls)
            self._init(config, kernels, greedy, chunk)
            cls._cache[key] = self
        return cls._cache[key]

    def _init(self, config, kernels, greedy, chunk):
        def prefill(params, tokens, positions, cache, last_index, key, s):
            logits, cache = forward(params, tokens, positions, cache, config=config, kernels=kernels,
                                    logits_index=last_index)
            return sample(logits, key, None if greedy else s), cache

        def decode(params, token, lengths, cache, key, step0, s):
            """`chunk` decode steps in one device loop: no host round trip between tokens."""

            def body(i, carry):
                token, cache, out = carry
                step = step0 + i  # step k feeds the token generated k steps after the prefill's
                logits, cache = forward(params, token[:, None], (lengths + step)[:, None], cache, config=config,
                                        kernels=kernels)
                token = sample(logits[:, 0], jax.random.fold_in(key, step), None if greedy else s)
                return token, cache, out.at[:, i].set(token)

            out = jnp.zeros((token.shape[0], chunk), jnp.int32)
            token, cache, out = jax.lax.fori_loop(0, chunk, body, (token, cache, out))
            return out, token, cache

        self._jit = {"prefill": jax.jit(prefill, donate_argnames="cache"),
                     "decode": jax.jit(decode, donate_argnames="cache")}
        self._compiled = {}

    def compiled(self, name: str, *args):
        """The compiled executable for these argument shapes (lowered and compiled on first use)."""
        sig = (name, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
        if sig not in self._compiled:
            shapes = {"prefill": lambda: f"tokens {args[1].shape}", "decode": lambda: f"batch {args[1].shape[0]}"}
            log.info("compiling %s for %s (once per shape) ...", name, shapes[name]())
            t0 = time.perf_counter()
            self._compiled[sig] = self._jit[name].lower(*args).compile(compiler_options=EXACT_ROUNDING)
            log.info("compiled %s in %.1f s", name, time.perf_counter() - t0)
        return self._compiled[sig]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def generate_tokens(config: Qwen3Config, params: dict, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, sampling: SamplingParams | None = None,
                    eos_token_ids: Sequence[int] = (), kernels: Kernels = Kernels(),
                    on_tokens: Callable[[int, list[int]], None] | None = None, chunk: int = DECODE_CHUNK,
                    max_len: int | None = None) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to `max_new_tokens` for each token-id prompt; stops a row at its first EOS token.

    `on_tokens(row, ids)` receives new tokens as they are fetched from the device (every `chunk` steps).
    """
    sampling = sampling or SamplingParams.greedy_decoding()
    prompts = [list(map(int, p)) for p in prompts]
    _check_request(config, prompts, max_new_tokens, chunk)
    lengths = np.array([len(p) for p in prompts], np.int32)
    batch, longest = len(prompts), int(lengths.max())
    padded = _round_up(longest, PAD_MULTIPLE)
    n_chunks = -(-(max_new_tokens - 1) // chunk)  # decode runs whole chunks; extra tokens are dropped
    needed = longest + n_chunks * chunk
    max_len = max_len or _round_up(max(needed, padded), PAD_MULTIPLE)
    cache = KVCache.init(config, batch, max_len)
    cache.check_fits(max(needed, padded))

    tokens = np.full((batch, padded), config.pad_token_id or 0, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, : len(p)] = p
    positions = np.broadcast_to(np.arange(padded, dtype=np.int32), (batch, padded))
    steps = _Steps(config, kernels, sampling.greedy, chunk)
    s = sampling.as_arrays()
    key = jax.random.key(sampling.seed)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()))

    t_compile = time.perf_counter()
    pre_args = (params, jnp.asarray(tokens), jnp.asarray(positions), cache, jnp.asarray(lengths - 1), key, s)
    prefill = steps.compiled("prefill", *pre_args)
    pos = jnp.asarray(lengths)
    dec_args = (params, pos, pos, cache, key, jnp.int32(0), s)
    decode = steps.compiled("decode", *dec_args) if n_chunks else None
    stats.compile_s = time.perf_counter() - t_compile

    t0 = time.perf_counter()
    token, cache = prefill(*pre_args)
    first = np.asarray(token)  # waits for the prefill
    stats.time_to_first_token_s = stats.prefill_s = time.perf_counter() - t0

    eos = np.array(sorted(set(eos_token_ids)), np.int32)
    out = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)

    def deliver(block: np.ndarray) -> None:  # block [B, n] of new tokens
        for row in range(batch):
            if done[row]:
                continue
            ids = block[row].tolist()
            hits = np.nonzero(np.isin(block[row], eos))[0]
            if hits.size:
                ids = ids[: hits[0] + 1]
                done[row] = True
            ids = ids[: max_new_tokens - len(out[row])]
            out[row].extend(ids)
            if len(out[row]) >= max_new_tokens:
                done[row] = True
            if ids and on_tokens is not None:
                on_tokens(row, ids)

    deliver(first[:, None])
    t1 = time.perf_counter()
    in_flight, n_run = None, 0
    while n_run < n_chunks and not done.all():
        # queue chunk i+1 before reading chunk i, so the device never waits for the host
        block, token, cache = decode(params, token, pos, cache, key, jnp.int32(n_run * chunk), s)
        n_run += 1
        if in_flight is not None:
            deliver(np.asarray(in_flight))
        in_flight = block
    if in_flight is not None:
        deliver(np.asarray(in_flight))
    stats.decode_s = time.perf_counter() - t1
    stats.decode_tokens = n_run * chunk * batch
    stats.new_tokens = sum(len(o) for o in out)
    del cache
    return out, stats


def _check_request(config: Qwen3Config, prompts: list[list[int]], max_new_tokens: int, chunk: int) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for row, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {row} is empty: a prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {row} has token id(s) outside the vocabulary [0, {config.vocab_size}): {bad[:5]}")
        if len(p) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(
                f"prompt {row} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} positions, beyond the model's context of "
                f"{config.max_position_embeddings} (max_position_embeddings)"
            )


def generate(model: Qwen3, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 256, sampling: SamplingParams | None = None, chat: bool = False,
             enable_thinking: bool | None = None, on_text: Callable[[int, str], None] | None = None,
             chunk: int = DECODE_CHUNK) -> GenerationOutput:
    """Generate from text prompts (or token-id lists). `chat=True` wraps each prompt in the chat template.

    Sampling defaults to the checkpoint's generation_config.json, as HF's `generate` does. `on_text(row, text)`
    streams decoded text as it is produced.
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if prompts and isinstance(prompts[0], str):
        tok = model._require_tokenizer()
        texts = [model.chat_prompt(p, enable_thinking=enable_thinking) if chat else p for p in prompts]
        ids = [tok.encode(t) for t in texts]
    else:
        if chat:
            raise ValueError("chat=True needs text prompts")
        tok, ids = model.tokenizer, prompts
    sampling = sampling or model.default_sampling()

    on_tokens, decoders = None, []
    if on_text is not None:
        tok = model._require_tokenizer()
        decoders = [StreamDecoder(tok, skip_special_tokens=True) for _ in ids]

        def on_tokens(row: int, new: list[int]) -> None:
            text = decoders[row].add(new)
            if text:
                on_text(row, text)

    tokens, stats = generate_tokens(model.config, model.params, ids, max_new_tokens=max_new_tokens,
                                    sampling=sampling, eos_token_ids=model.eos_token_ids, kernels=model.kernels,
                                    on_tokens=on_tokens, chunk=chunk)
    for row, decoder in enumerate(decoders):
        rest = decoder.flush()
        if rest:
            on_text(row, rest)
    texts = [tok.decode(t, skip_special_tokens=True) for t in tokens] if tok is not None else None
    return GenerationOutput(tokens, texts, stats)
