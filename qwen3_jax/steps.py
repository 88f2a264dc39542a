"""The engine's device steps: `prefill_step` and `decode_step`, jitted with the config static and the KV cache
donated, and compiled once per shape bucket (`StepCompiler`).

A prefill step runs a flat batch of prompt chunks and samples one token for each sequence (used where the chunk
completes the prompt). A decode step runs `num_steps` tokens for every row in one device loop (no host round trip
between tokens), each row stopping at its own `stops` position. Both can also return the log-probabilities of the
chosen tokens and the top `MAX_LOGPROBS`, and a prefill step those of the prompt's tokens. The penalty variant
takes each row's token history (`samp["history"]`) and counts its tokens on the device; a decode step adds each
token it samples, so step i sees the tokens of steps < i, and returns the history for a following call.

With a `TensorParallel` (`tp`), the forward pass runs split over its devices (`parallel.py`) and everything else
(sampling, the outputs) on the full logits, replicated on every device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen3Config
from .kv_cache import AttentionMetadata, KVCache
from .model import forward
from .ops import Kernels
from .parallel import TensorParallel
from .sampling import (MAX_LOGPROBS, apply_penalties, batch_arrays, history_arrays, record_tokens, request_keys,
                       sample, token_counts, token_logprobs)

log = logging.getLogger("qwen3_jax")
# XLA may otherwise skip a bf16 rounding between fused ops ("excess precision"); torch rounds after every op, and
# so must we to produce HF's exact tokens.
EXACT_ROUNDING = {"xla_allow_excess_precision": False}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What changes a step's program (each combination is its own executable)."""

    greedy: bool = True  # every row greedy: argmax only, no sort over the vocabulary
    logprobs: bool = False  # log-probabilities of the sampled tokens (and the top MAX_LOGPROBS)
    prompt_logprobs: bool = False  # prefill: log-probabilities of every prompt token (logits for all tokens)
    penalties: bool = False  # repetition / presence / frequency penalties over each row's token history


def _sample_rows(logits, samp, seeds, counts, opts: StepOptions, seen=None, occurrences=None) -> dict:
    """Tokens (and log-probabilities) for logits [B, V]; with penalties, `seen` / `occurrences` [B, V] are the
    rows' tokens so far (`token_counts`). Log-probabilities are of the raw logits."""
    scores = apply_penalties(logits, seen, occurrences, samp) if opts.penalties else logits
    tokens = sample(scores, None if opts.greedy else request_keys(seeds, counts), None if opts.greedy else samp)
    out = {"tokens": tokens, "finite": jnp.isfinite(logits).all(axis=-1)}  # NaN / Inf logits: the host stops the row
    if opts.logprobs:
        out["logprob"], out["top_ids"], out["top_logprobs"] = token_logprobs(logits, tokens, MAX_LOGPROBS)
    return out


def _forward(tp: TensorParallel | None, params, tokens, positions, cache, meta, **kwargs):
    """The model on one device, or split over `tp`'s."""
    if tp is None:
        return forward(params, tokens, positions, cache, meta, **kwargs)
    return tp.forward(params, tokens, positions, cache, meta, **kwargs)


def _replicated(tp: TensorParallel | None, outputs: dict) -> dict:
    """Step outputs the same on every device (the host reads them from any)."""
    return outputs if tp is None else jax.lax.with_sharding_constraint(outputs, tp.replicated)


def prefill_step(params, cache: KVCache, tokens, positions, meta: AttentionMetadata, logits_indices, targets, samp,
                 seeds, counts, *, config: Qwen3Config, kernels: Kernels, opts: StepOptions,
                 tp: TensorParallel | None = None):
    """Prompt chunks, tokens [N] at positions [N] as `meta` lays them out -> (outputs, cache). outputs["tokens"]
    [S] is sampled from the logits at each sequence's last token (`logits_indices` [S]); with prompt logprobs,
    outputs["prompt_*"] [N] score `targets` [N] (each token's successor) at every token."""
    pen = token_counts(samp["history"], samp["prompt_lens"], config.vocab_size) if opts.penalties else ()
    if opts.prompt_logprobs:
        logits, cache = _forward(tp, params, tokens, positions, cache, meta, config=config, kernels=kernels)  # [N, V]
        out = _sample_rows(logits[logits_indices], samp, seeds, counts, opts, *pen)
        chosen, ids, values = token_logprobs(logits, targets, MAX_LOGPROBS)
        out.update(prompt_logprob=chosen, prompt_top_ids=ids, prompt_top_logprobs=values)
        return _replicated(tp, out), cache
    logits, cache = _forward(tp, params, tokens, positions, cache, meta, config=config, kernels=kernels,
                             logits_indices=logits_indices)  # [S, V]
    return _replicated(tp, _sample_rows(logits, samp, seeds, counts, opts, *pen)), cache


def decode_step(params, cache: KVCache, tokens, positions, stops, block_tables, samp, seeds, counts, *,
                config: Qwen3Config, kernels: Kernels, opts: StepOptions, num_steps: int,
                tp: TensorParallel | None = None):
    """`num_steps` decode steps for rows fed tokens [B] at positions [B] -> (outputs [B, num_steps] per key,
    cache). Row b computes positions up to stops[b] - 1 (stops 0: a padding row); later steps of a row that has
    stopped write nothing and their tokens are junk the host drops. Step i draws token counts[b] + i. With
    penalties, outputs["history"] is samp["history"] with the sampled tokens written at their positions."""
    batch = tokens.shape[0]
    meta = AttentionMetadata(block_tables, jnp.zeros((batch,), jnp.int32), jnp.arange(batch + 1, dtype=jnp.int32),
                             jnp.full((batch,), -1, jnp.int32), decode=True)
    pen = token_counts(samp["history"], samp["prompt_lens"], config.vocab_size) if opts.penalties else ()
    history = samp["history"] if opts.penalties else None
    shapes = jax.eval_shape(lambda lg: _sample_rows(lg, samp, seeds, counts, opts, *pen),
                            jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32))
    outs = {k: jnp.zeros((batch, num_steps) + v.shape[1:], v.dtype) for k, v in shapes.items()}

    def body(i, carry):
        tok, cache, outs, pen, history = carry
        pos = jnp.where(positions + i < stops, positions + i, -1)  # -1: this row computes nothing
        logits, cache = _forward(tp, params, tok, pos, cache, meta, config=config, kernels=kernels)  # [B, V]
        new = _sample_rows(logits, samp, seeds, counts + i, opts, *pen)
        outs = {k: outs[k].at[:, i].set(new[k]) for k in outs}
        if opts.penalties:  # the sampled token (at position pos + 1) counts from the next step on
            live = pos >= 0
            pen = record_tokens(*pen, new["tokens"], live)
            at = jnp.where(live, pos + 1, history.shape[1])  # out of range: dropped
            history = history.at[jnp.arange(batch), at].set(new["tokens"], mode="drop")
        return new["tokens"], cache, outs, pen, history

    last, cache, outs, _, history = jax.lax.fori_loop(0, num_steps, body, (tokens, cache, outs, pen, history))
    outs["last"] = last  # the tokens a following call feeds (read on the device only)
    if opts.penalties:
        outs["history"] = history  # the history a following call takes (read on the device only)
    return _replicated(tp, outs), cache


def _sampling_shapes(spec, rows: int, history: int | None) -> tuple:
    samp = batch_arrays([], rows, penalties=history is not None)
    if history is not None:
        samp |= history_arrays([], [], rows, history)
    samp = {k: spec(v.shape, v.dtype) for k, v in samp.items()}
    return samp, spec((rows,), np.uint32), spec((rows,), np.int32)


def _spec_maker(tp: TensorParallel | None):
    """Abstract host-fed arrays: on the default device, or replicated over `tp`'s mesh."""
    sharding = None if tp is None else tp.replicated
    return lambda shape, dtype: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def prefill_arg_shapes(params, cache: KVCache, num_tokens: int, rows: int, max_blocks: int,
                       history: int | None = None, tp: TensorParallel | None = None) -> tuple:
    """`prefill_step`'s arguments for a bucket of `num_tokens` tokens from at most `rows` sequences (abstract,
    for compiling ahead); `history`: the token history's width, for the penalty variant."""
    i32, spec = np.int32, _spec_maker(tp)
    meta = AttentionMetadata(spec((rows, max_blocks), i32), spec((rows,), i32), spec((rows + 1,), i32),
                             spec((num_tokens,), i32), decode=False)
    return (params, cache, spec((num_tokens,), i32), spec((num_tokens,), i32), meta, spec((rows,), i32),
            spec((num_tokens,), i32), *_sampling_shapes(spec, rows, history))


def decode_arg_shapes(params, cache: KVCache, rows: int, max_blocks: int, history: int | None = None,
                      tp: TensorParallel | None = None) -> tuple:
    """`decode_step`'s arguments for a bucket of `rows` rows (abstract, for compiling ahead); `history`: the token
    history's width, for the penalty variant."""
    i32, spec = np.int32, _spec_maker(tp)
    return (params, cache, spec((rows,), i32), spec((rows,), i32), spec((rows,), i32),
            spec((rows, max_blocks), i32), *_sampling_shapes(spec, rows, history))


class StepCompiler:
    """Compiled prefill and decode executables, one per (shape bucket, StepOptions); `compile_all` builds a set
    of them concurrently (XLA compiles in parallel threads) before serving."""

    def __init__(self, config: Qwen3Config, kernels: Kernels, num_steps: int, tp: TensorParallel | None = None):
        self.config, self.kernels, self.num_steps, self.tp = config, kernels, num_steps, tp
        self._compiled: dict = {}
        self._sizes: dict[tuple[str, StepOptions], set[int]] = {}  # step sizes compiled per (kind, options)
        self.compile_seconds = 0.0  # spent compiling so far, at start-up and on first use

    def _jit(self, kind: str, opts: StepOptions):
        fn = prefill_step if kind == "prefill" else functools.partial(decode_step, num_steps=self.num_steps)
        return jax.jit(functools.partial(fn, config=self.config, kernels=self.kernels, opts=opts, tp=self.tp),
                       donate_argnames="cache")

    def get(self, kind: str, opts: StepOptions, args: tuple):
        """The executable for these arguments' shapes (compiled now, with a log line, if it is not yet)."""
        key = (kind, opts, _size(args))
        if key not in self._compiled:
            log.info("compiling %s step %s for %s (not compiled at start-up) ...", kind, _describe(opts),
                     _bucket(kind, args))
            self._compiled[key] = self._compile(kind, opts, args)
        return self._compiled[key]

    def compiled_sizes(self, kind: str, opts: StepOptions) -> set[int]:
        """Step sizes (prefill tokens, decode rows) compiled so far for this kind and options."""
        return self._sizes.get((kind, opts), set())

    def compile_all(self, jobs: list[tuple[str, StepOptions, tuple]], *, progress: bool = True) -> float:
        """Compile every (kind, options, abstract args) job not compiled yet; returns the seconds it took."""
        todo = [(k, o, a) for k, o, a in jobs if (k, o, _size(a)) not in self._compiled]
        if not todo:
            return 0.0
        t0 = time.perf_counter()
        log.info("compiling %d step executables (prefill and decode buckets) ...", len(todo))
        bar = _progress_bar(len(todo)) if progress else None
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            futures = {pool.submit(self._compile, k, o, a): (k, o, _size(a)) for k, o, a in todo}
            for fut in concurrent.futures.as_completed(futures):
                self._compiled[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        log.info("compiled %d step executables in %.1f s", len(todo), seconds)
        return seconds

    def _compile(self, kind: str, opts: StepOptions, args: tuple):
        self._sizes.setdefault((kind, opts), set()).add(_size(args))
        t0 = time.perf_counter()
        compiled = self._jit(kind, opts).lower(*args).compile(compiler_options=EXACT_ROUNDING)
        self.compile_seconds += time.perf_counter() - t0  # (summed over threads: CPU-seconds at start-up)
        return compiled


def _size(args) -> int:
    """A step's bucket: its token count (prefill) or rows (decode). Every other argument's shape is fixed for the
    engine (params, pool, table width, prefill rows), so this names the executable, cheaply on every call."""
    return args[2].shape[0]


def _bucket(kind: str, args) -> str:
    tokens = args[2]
    return f"{tokens.shape[0]} tokens" if kind == "prefill" else f"batch {tokens.shape[0]}"


def _describe(opts: StepOptions) -> str:
    names = ("logprobs", "prompt_logprobs", "penalties")
    parts = ["greedy" if opts.greedy else "sampled"] + [n for n in names if getattr(opts, n)]
    return "(" + ", ".join(parts) + ")"


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compiling steps", unit="step", leave=False)
