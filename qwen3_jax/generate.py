"""Loading a checkpoint (`load` -> `Qwen3`) and the one-call `generate`, which runs on the engine.

`generate` keeps one engine per loaded model (sized for the largest batch asked so far, compiling each step shape
on first use), so repeated calls reuse its compiled steps and its prefix cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from .config import Qwen3Config
from .engine import EngineOptions, LLMEngine
from .ops import Kernels
from .parallel import TensorParallel
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import load_params


@dataclasses.dataclass
class Qwen3:
    """A loaded model: config, params on the device, tokenizer, generation defaults and the kernel choice."""

    config: Qwen3Config
    params: dict
    tokenizer: Tokenizer | None
    generation_config: dict
    kernels: Kernels
    model_dir: Path | None = None
    parallel: TensorParallel | None = None  # the devices the params are split over (None: one device)
    _engine: object = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        source = self._generation_config_name
        if not isinstance(self.generation_config, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(self.generation_config).__name__}")
        eos = self.generation_config.get("eos_token_id")
        if eos is not None:
            ids = [eos] if not isinstance(eos, list) else eos
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{source}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"{source}: eos_token_id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")

    @property
    def _generation_config_name(self) -> str:
        return str(self.model_dir / "generation_config.json") if self.model_dir is not None else "generation_config"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or ())
        return tuple(eos)

    def default_sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` applied (None keeps the default)."""
        SamplingParams(**{k: v for k, v in overrides.items() if v is not None})  # the caller's values, named as such
        try:
            return SamplingParams.from_generation_config(self.generation_config, **overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self._generation_config_name}: {e}") from None

    def chat_prompt(self, messages: str | list[dict], *, enable_thinking: bool | None = None,
                    tools: list[dict] | None = None) -> str:
        """Render a user message (or a list of chat messages) with the checkpoint's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._require_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                             enable_thinking=enable_thinking, tools=tools)

    def engine(self, *, min_seqs: int = 1, decode_steps: int | None = None, min_blocks: int = 0):
        """This model's shared engine for `generate`: a KV pool of the blocks its calls have needed (not the
        device's memory, as `LLM` takes), steps compiled on first use; rebuilt larger when a call needs more
        sequences or blocks, or other decode steps."""
        current = self._engine
        want_steps = decode_steps or EngineOptions.decode_steps
        if (current is None or current.options.max_num_seqs < min_seqs or current.options.decode_steps != want_steps
                or current.blocks.num_blocks < min_blocks):
            seqs = max(min_seqs, current.options.max_num_seqs if current is not None else 1)
            blocks = max(min_blocks, current.blocks.num_blocks if current is not None else 0)
            self._engine = None  # release the old pool first
            self._engine = LLMEngine(self, EngineOptions(max_num_seqs=1 << (seqs - 1).bit_length(),
                                                         decode_steps=want_steps, num_blocks=blocks or None,
                                                         precompile=False))
        return self._engine

    def with_tensor_parallel(self, tensor_parallel: int, devices=None) -> "Qwen3":
        """This model (loaded on one device) split over `tensor_parallel` devices, as `load(tensor_parallel=...)`
        would load it; each device's part is cut from the loaded arrays."""
        if self.parallel is not None:
            raise ValueError(f"this model is already split over {self.parallel.size} devices")
        parallel = TensorParallel.create(self.config, tensor_parallel, devices)
        return dataclasses.replace(self, params=parallel.shard_params(self.params, self.config), parallel=parallel,
                                   _engine=None)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            where = f"{self.model_dir / 'tokenizer.json'} is missing" if self.model_dir is not None else \
                "this model has no tokenizer"
            raise ValueError(f"{where}: text prompts need the checkpoint's tokenizer; add tokenizer.json (and "
                             "tokenizer_config.json) to the checkpoint directory, or pass token ids instead of text")
        return self.tokenizer


def load(model_dir: str | Path, *, dtype: str | None = None, kernels: str | Kernels = "auto",
         quantize: str | None = None, modules_to_not_convert: tuple[str, ...] = (),
         tensor_parallel: int | None = None, devices=None) -> Qwen3:
    """Load a Hugging Face Qwen3 checkpoint directory (config, safetensors weights, tokenizer, generation config).

    `quantize` ('int8' or 'int4') quantizes the linear layers' weights at load, except the modules named in
    `modules_to_not_convert` (e.g. ('lm_head',)); FP8 and AWQ checkpoints load quantized as they are.
    `tensor_parallel=N` splits the model over N devices (`devices`: which ones, as jax devices or ids; default
    the first N), each reading only its own part of the weights (`parallel.py`)."""
    model_dir = Path(model_dir).expanduser()
    config = Qwen3Config.from_pretrained(model_dir, dtype=dtype)
    kernels = Kernels.resolve(kernels)
    parallel = None
    if tensor_parallel is not None or devices is not None:
        size = tensor_parallel if tensor_parallel is not None else len(devices)
        parallel = TensorParallel.create(config, size, devices)
    # the small files first, so a broken tokenizer or generation config fails before gigabytes are read
    tokenizer = Tokenizer.from_pretrained(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    gen_path = model_dir / "generation_config.json"
    generation_config = {}
    if gen_path.is_file():
        try:
            generation_config = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen_path}: not valid JSON ({e})") from None
    params = load_params(model_dir, config, quantize=quantize, modules_to_not_convert=modules_to_not_convert,
                         parallel=parallel)
    return Qwen3(config, params, tokenizer, generation_config, kernels, model_dir, parallel)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _prompt_list(prompts) -> list:
    """`generate`'s prompts -> a list of texts or a list of token-id lists, with a clear error for anything else."""
    what = "prompts must be a string, a list of strings, or a list of token-id lists"
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = np.asarray(prompts).tolist()
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Sequence):
        raise TypeError(f"{what}; got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(t, (int, float, np.number)) for t in prompts):  # one prompt of token ids
        bad = next((t for t in prompts if not _is_int(t)), None)
        if bad is not None:
            raise TypeError(f"prompt 0: token ids must be integers, got {bad!r} ({type(bad).__name__})")
        return [[int(t) for t in prompts]]
    if all(isinstance(p, str) for p in prompts):
        return prompts
    out = []
    for row, p in enumerate(prompts):
        if isinstance(p, str):
            raise TypeError(f"{what}, not a mix of text and token ids (prompt {row} is text)")
        if isinstance(p, (np.ndarray, jax.Array)):
            p = np.asarray(p).tolist()
        if isinstance(p, (bytes, dict)) or not isinstance(p, Sequence):
            raise TypeError(f"{what}; prompt {row} is of type {type(p).__name__}")
        bad = next((t for t in p if not _is_int(t)), None)
        if bad is not None:
            raise TypeError(f"prompt {row}: token ids must be integers, got {bad!r} ({type(bad).__name__})")
        out.append([int(t) for t in p])
    return out


def default_compilation_cache_dir() -> Path:
    """$QWEN3_JAX_CACHE_DIR, else $XDG_CACHE_HOME/qwen3-jax/jax-cache (~/.cache/qwen3-jax/jax-cache)."""
    if os.environ.get("QWEN3_JAX_CACHE_DIR"):
        return Path(os.environ["QWEN3_JAX_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qwen3-jax" / "jax-cache"


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Keep compiled executables in JAX's persistent cache at `path` (default: `default_compilation_cache_dir()`),
    every one however small or quick to compile, so a later process running the same model and shapes loads them
    instead of compiling. Returns the directory; raises OSError if it cannot be created."""
    path = Path(path).expanduser() if path is not None else default_compilation_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"compilation cache directory {path} is not writable")
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()  # JAX decides on its cache at the first compilation: take effect even after one
    return path


@dataclasses.dataclass
class GenerationStats:
    """Timing of one `generate` call. Token counts are the tokens delivered (up to each request's stop)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    compile_s: float = 0.0
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"time to first token {self.time_to_first_token_s * 1e3:.1f} ms | prefill {self.prompt_tokens} tok"
                f"{cached} at {self.prefill_tokens_per_s:,.0f} tok/s | decode {self.decode_tokens} tok at "
                f"{self.decode_tokens_per_s:,.1f} tok/s | compile {self.compile_s:.1f} s")


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the EOS token if one was produced
    texts: list[str] | None
    stats: GenerationStats
    finish_reasons: list[str] = dataclasses.field(default_factory=list)


def generate(model: Qwen3, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 256, sampling: SamplingParams | None = None, chat: bool = False,
             enable_thinking: bool | None = None, on_text: Callable[[int, str], None] | None = None,
             chunk: int | None = None) -> GenerationOutput:
    """Generate from text prompts (or token-id lists) on the model's engine. `chat=True` wraps each prompt in the
    chat template.

    Sampling defaults to the checkpoint's generation_config.json, as HF's `generate` does; `max_new_tokens`
    overrides the sampling params' max_tokens. `on_text(row, text)` streams decoded text as it is produced;
    `chunk` sets the decode tokens per device call (how often text arrives).
    """
    if not isinstance(model, Qwen3):
        raise TypeError(f"generate's first argument must be a model from qwen3_jax.load(...), got "
                        f"{type(model).__name__}")
    prompts = _prompt_list(prompts)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    if chunk is not None:
        chunk = _positive_int("chunk", chunk)
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a qwen3_jax.SamplingParams (e.g. SamplingParams(temperature=0.7)) or "
                        f"None, got {type(sampling).__name__}")
    if not isinstance(chat, bool):
        raise TypeError(f"chat must be True or False, got {chat!r}")
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise TypeError(f"enable_thinking must be True, False or None, got {enable_thinking!r}")
    if enable_thinking is not None and not chat:
        raise ValueError("enable_thinking applies to chat prompts: pass chat=True as well")
    if on_text is not None and not callable(on_text):
        raise TypeError(f"on_text must be a function (row, text) or None, got {type(on_text).__name__}")
    if isinstance(prompts[0], str):
        texts = [model.chat_prompt(p, enable_thinking=enable_thinking) if chat else p for p in prompts]
        ids = [model._require_tokenizer().encode(t) for t in texts]
    else:
        if chat:
            raise ValueError("chat=True needs text prompts, not token ids")
        ids = prompts
    for row, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {row} is empty: a prompt needs at least one token")
    sampling = dataclasses.replace(sampling or model.default_sampling(), max_tokens=max_new_tokens)
    for row, p in enumerate(ids):
        if len(p) + max_new_tokens > model.config.max_context_len:
            raise ValueError(
                f"prompt {row} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} positions, beyond the model's context of "
                f"{model.config.max_context_len} (max_position_embeddings, or YaRN's factor x "
                "original_max_position_embeddings)")

    block_size = EngineOptions.block_size
    blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in ids)  # every request's whole length at once
    engine = model.engine(min_seqs=len(ids), decode_steps=chunk, min_blocks=blocks)
    t_compile = time.perf_counter()
    engine.compile_for(len(ids), sum(len(p) for p in ids), [sampling])  # before any text streams
    t_compile = time.perf_counter() - t_compile
    compile0 = engine.steps.compile_seconds  # later compilations (a step shape met mid-run) are timed apart
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in ids))
    sent = [0] * len(ids)
    first: list[tuple[float, float] | None] = [None] * len(ids)  # (time, compile seconds so far) of a first token

    def on_output(row, out):
        if first[row] is None and out.token_ids:
            first[row] = (time.perf_counter(), engine.steps.compile_seconds)
        if on_text is not None and out.text is not None and len(out.text) > sent[row]:
            on_text(row, out.text[sent[row]:])
            sent[row] = len(out.text)

    t0 = time.perf_counter()
    outs = engine.generate(ids, [sampling] * len(ids), on_output=on_output)
    t1 = time.perf_counter()
    failed = [i for i, o in enumerate(outs) if o.finish_reason == "error"]
    if failed:
        raise FloatingPointError(f"the model produced NaN or Inf logits for prompt {failed[0]} after "
                                 f"{len(outs[failed[0]].token_ids)} tokens (non-finite weights or activations; "
                                 "try --dtype float32 or check the checkpoint)")
    stats.compile_s = t_compile + engine.steps.compile_seconds - compile0
    first_token, compiled_by_then = min(t for t in first if t is not None)
    stats.time_to_first_token_s = stats.prefill_s = first_token - t0 - (compiled_by_then - compile0)
    stats.decode_s = t1 - first_token - (engine.steps.compile_seconds - compiled_by_then)
    stats.new_tokens = sum(len(o.token_ids) for o in outs)
    stats.decode_tokens = stats.new_tokens - len(outs)  # tokens after each request's first
    stats.cached_tokens = sum(o.metrics.num_cached_tokens for o in outs)
    texts = [o.text for o in outs] if model.tokenizer is not None else None
    return GenerationOutput([o.token_ids for o in outs], texts, stats, [o.finish_reason for o in outs])
