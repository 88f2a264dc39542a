"""Loading a checkpoint (`load` -> `Qwen3`) and the one-call `generate`, which runs on the engine.

`generate` keeps one engine per loaded model (sized for the largest batch asked so far, compiling each step shape
on first use), so repeated calls reuse its compiled steps and its prefix cache.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import Qwen3Config
from .engine import EngineOptions, LLMEngine
from .ops import Kernels
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
    _engine: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        eos = [eos] if isinstance(eos, int) else list(eos or ())
        return tuple(eos)

    def default_sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, with `overrides` applied (None keeps the default)."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

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
        return (f"time to first token {self.time_to_first_token_s * 1e3:.1f} ms | prefill {self.prompt_tokens} tok "
                f"at {self.prefill_tokens_per_s:,.0f} tok/s | decode {self.decode_tokens} tok at "
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
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if isinstance(prompts[0], str):
        texts = [model.chat_prompt(p, enable_thinking=enable_thinking) if chat else p for p in prompts]
        ids = [model._require_tokenizer().encode(t) for t in texts]
    else:
        if chat:
            raise ValueError("chat=True needs text prompts")
        ids = [list(p) for p in prompts]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    sampling = dataclasses.replace(sampling or model.default_sampling(), max_tokens=max_new_tokens)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    for row, p in enumerate(ids):
        if len(p) + max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(
                f"prompt {row} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens} positions, beyond the model's context of "
                f"{model.config.max_position_embeddings} (max_position_embeddings)")

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
    stats.compile_s = t_compile + engine.steps.compile_seconds - compile0
    first_token, compiled_by_then = min(t for t in first if t is not None)
    stats.time_to_first_token_s = stats.prefill_s = first_token - t0 - (compiled_by_then - compile0)
    stats.decode_s = t1 - first_token - (engine.steps.compile_seconds - compiled_by_then)
    stats.new_tokens = sum(len(o.token_ids) for o in outs)
    stats.decode_tokens = stats.new_tokens - len(outs)  # tokens after each request's first
    stats.cached_tokens = sum(o.metrics.num_cached_tokens for o in outs)
    texts = [o.text for o in outs] if model.tokenizer is not None else None
    return GenerationOutput([o.token_ids for o in outs], texts, stats, [o.finish_reason for o in outs])
