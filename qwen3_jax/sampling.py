"""Per-request sampling parameters (vLLM's names), and token selection inside jit: greedy, or temperature /
top-k / top-p / min-p sampling in Hugging Face's order, row by row; plus the log-probabilities of chosen tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20  # the most top log-probabilities a request may ask for (vLLM's default max_logprobs)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request's tokens are chosen and when it stops.

    temperature=0 means greedy; top_k=0, top_p=1, min_p=0 switch a filter off. seed=None draws a fresh seed per
    request. The request stops after `max_tokens` new tokens, at an EOS token (unless `ignore_eos`), at any of
    `stop_token_ids` (the stop token is kept in the output, as vLLM does) or when the text contains any of the
    `stop` strings (the text ends before the match unless `include_stop_str_in_output`; checked on the host as the
    text is detokenized, so a string spanning several tokens is found). `logprobs=k` returns, for each
    generated token, its log-probability and the k most likely tokens'; `prompt_logprobs=k` the same for every
    prompt token after the first. Log-probabilities are the model's (log_softmax of the logits, before
    temperature and filters), as vLLM returns them.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"invalid sampling value {name}={getattr(self, name)!r}: {why}")

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

        def is_num(x):
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))

        if not is_num(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 disables top-p)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 disables min-p)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**32):
            bad("seed", "must be None or an integer in [0, 2**32)")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be True or False")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence) or not all(is_int(t) and t >= 0 for t in stop):
            bad("stop_token_ids", "must be a list of non-negative token ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stop))
        strings = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(strings, Sequence) or not all(isinstance(t, str) and t for t in strings):
            bad("stop", "must be a string or a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(strings))
        if not isinstance(self.include_stop_str_in_output, bool):
            bad("include_stop_str_in_output", "must be True or False")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("top_k", "max_tokens"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def greedy_decoding(cls, **kwargs) -> "SamplingParams":
        return cls(temperature=0.0, **kwargs)

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """Defaults as HF's `generate` takes them from generation_config.json; `overrides` (None = keep) win."""
        if gen.get("do_sample", False):
            values = {"temperature": gen.get("temperature", 1.0), "top_k": gen.get("top_k", 50) or 0,
                      "top_p": gen.get("top_p", 1.0), "min_p": gen.get("min_p") or 0.0}
        else:
            values = {"temperature": 0.0}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_arrays(self) -> dict:
        """This request's filter values as the traced [1] arrays `filter_logits` takes."""
        return batch_arrays([self], 1)


def batch_arrays(params: Sequence[SamplingParams], rows: int) -> dict:
    """Per-row filter values [rows] for a step (padding rows greedy): changing them does not recompile."""
    def col(name, pad, dtype, fn=lambda x: x):
        values = [fn(getattr(p, name)) for p in params] + [pad] * (rows - len(params))
        return np.asarray(values, dtype)

    return {"temperature": col("temperature", 0.0, np.float32), "top_k": col("top_k", 0, np.int32),
            "top_p": col("top_p", 1.0, np.float32), "min_p": col("min_p", 0.0, np.float32)}


def filter_logits(logits: jax.Array, s: dict) -> jax.Array:
    """Temperature, then top-k, top-p and min-p as HF's warpers do, each row with its own values [B] (a greedy
    row, temperature 0, is scaled by 1); removed entries become -inf. [B, V] f32."""
    neg = jnp.float32(-jnp.inf)
    col = lambda name: jnp.asarray(s[name]).reshape(-1, 1)  # noqa: E731  [B or 1, 1]
    temperature = col("temperature")
    x = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)  # [B, V] descending
    # top-k: keep values >= the k-th largest (ties kept, as HF's `scores < topk[..., -1]`).
    top_k = col("top_k")
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (x.shape[0], 1)), axis=-1)
    x = jnp.where(x < kth, neg, x)
    desc = jnp.where(desc < kth, neg, desc)
    # top-p: drop a token when the mass of strictly more likely tokens already reaches top_p.
    top_p = col("top_p")
    p = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p
    n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    n_keep = jnp.where(top_p >= 1, vocab, n_keep)  # f32 cumsum can exceed 1 - eps: 1 must mean "off"
    thr = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    x = jnp.where(x < thr, neg, x)
    # min-p: drop tokens whose probability is below min_p times the top token's.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs < col("min_p") * jnp.max(probs, axis=-1, keepdims=True), neg, x)
    return x


def request_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """One PRNG key per row: the request's seed folded with the index of the token being drawn, so a request
    draws the same tokens whatever batch it runs in, and again after a preemption."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


def sample(logits: jax.Array, keys: jax.Array | None, s: dict | None) -> jax.Array:
    """Next token ids [B] from logits [B, V]: argmax when `s` is None (an all-greedy step); else each row drawn
    with its own key [B] and filter values, rows with temperature 0 taking the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if s is None:
        return greedy
    filtered = filter_logits(logits, s)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, filtered).astype(jnp.int32)
    return jnp.where(jnp.asarray(s["temperature"]) > 0, drawn, greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int):
    """The model's log-probabilities (log_softmax of f32 logits [B, V]) of `tokens` [B], and the k most likely
    (ids [B, k], values [B, k])."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
    values, ids = jax.lax.top_k(lp, k)
    return chosen, ids.astype(jnp.int32), values
