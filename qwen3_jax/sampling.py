"""Per-request sampling parameters (vLLM's names), and token selection inside jit: repetition / presence /
frequency penalties on the raw logits, then greedy, or temperature / top-k / top-p / min-p sampling in Hugging
Face's order, row by row; plus the log-probabilities of chosen tokens."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20  # the most top log-probabilities a request may ask for (vLLM's default max_logprobs)
PENALTY_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty")
log = logging.getLogger("qwen3_jax")


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
    penalties, temperature and filters), as vLLM returns them.

    Penalties change the logits before temperature and the filters (greedy rows too), as HF and vLLM apply them:
    `repetition_penalty` (HF's; 1 = off) divides the positive and multiplies the negative logits of every token in
    the prompt or the output; `presence_penalty` and `frequency_penalty` (OpenAI's, in [-2, 2]; 0 = off) subtract
    presence_penalty once and frequency_penalty per occurrence for each token in the output.
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
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"invalid sampling value {name}={getattr(self, name)!r}: {why}")

        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

        def is_num(x):
            return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))

        if not is_num(self.temperature) or not self.temperature >= 0 or self.temperature == float("inf"):
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            bad("top_k", "must be an integer in [0, 2**31) (0 disables top-k)")
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
        rp = self.repetition_penalty
        if not is_num(rp) or not 0 < rp < float("inf"):
            bad("repetition_penalty", "must be a finite number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                bad(name, "must be in [-2, 2] (0 disables it)")
        for name in ("temperature", "top_p", "min_p") + PENALTY_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("top_k", "max_tokens"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (such a request runs the steps' penalty variant)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def greedy_decoding(cls, **kwargs) -> "SamplingParams":
        return cls(temperature=0.0, **kwargs)

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """Defaults as HF's `generate` takes them from generation_config.json; `overrides` (None = keep) win. A
        field that would change HF's tokens and that we do not implement is logged once as a warning."""
        if gen.get("do_sample", False):
            values = {"temperature": gen.get("temperature", 1.0), "top_k": gen.get("top_k", 50) or 0,
                      "top_p": gen.get("top_p", 1.0), "min_p": gen.get("min_p") or 0.0}
        else:
            values = {"temperature": 0.0}
        if gen.get("repetition_penalty") is not None:  # HF applies it with and without do_sample
            values["repetition_penalty"] = gen["repetition_penalty"]
        for name, why in unsupported_generation_fields(gen):
            _warn_once(name, repr(gen[name]), why)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_arrays(self) -> dict:
        """This request's filter values as the traced [1] arrays `filter_logits` takes."""
        return batch_arrays([self], 1)


# generation_config.json fields that change HF's tokens and that we do not implement: (field, when it is active,
# why). Sampling warpers count only with do_sample; beam-search settings only with num_beams > 1; fields that
# change neither the chosen tokens nor their count (max_length, renormalize_logits, assistant settings, ...) are
# not listed.
def _set(v) -> bool:
    return v is not None and v is not False and v != [] and v != {}


_UNSUPPORTED = (
    ("no_repeat_ngram_size", lambda v, g: (v or 0) > 0, "no-repeat n-gram blocking is not implemented"),
    ("encoder_no_repeat_ngram_size", lambda v, g: (v or 0) > 0, "not implemented (an encoder-decoder setting)"),
    ("encoder_repetition_penalty", lambda v, g: v not in (None, 1, 1.0), "not implemented"),
    ("bad_words_ids", lambda v, g: _set(v), "banned word lists are not implemented"),
    ("force_words_ids", lambda v, g: _set(v), "constrained beam search is not implemented"),
    ("sequence_bias", lambda v, g: _set(v), "sequence biases are not implemented"),
    ("suppress_tokens", lambda v, g: _set(v), "token suppression is not implemented"),
    ("begin_suppress_tokens", lambda v, g: _set(v), "token suppression is not implemented"),
    ("forced_bos_token_id", lambda v, g: v is not None, "forced tokens are not implemented"),
    ("forced_eos_token_id", lambda v, g: _set(v), "forced tokens are not implemented"),
    ("min_length", lambda v, g: (v or 0) > 0, "a minimum length is not implemented"),
    ("min_new_tokens", lambda v, g: (v or 0) > 0, "a minimum length is not implemented"),
    ("exponential_decay_length_penalty", lambda v, g: _set(v), "not implemented"),
    ("guidance_scale", lambda v, g: v not in (None, 1, 1.0), "classifier-free guidance is not implemented"),
    ("watermarking_config", lambda v, g: _set(v), "watermarking is not implemented"),
    ("stop_strings", lambda v, g: _set(v), "not taken from generation_config.json (pass stop strings per request)"),
    ("num_return_sequences", lambda v, g: (v or 1) > 1, "one sequence per request is returned"),
    ("typical_p", lambda v, g: g.get("do_sample") and v is not None and v < 1, "typical sampling is not implemented"),
    ("epsilon_cutoff", lambda v, g: g.get("do_sample") and v is not None and 0 < v < 1, "not implemented"),
    ("eta_cutoff", lambda v, g: g.get("do_sample") and v is not None and 0 < v < 1, "not implemented"),
    ("top_h", lambda v, g: g.get("do_sample") and v is not None, "top-h sampling is not implemented"),
    ("num_beams", lambda v, g: (v or 1) > 1, "beam search is not implemented (sampling or greedy instead)"),
    ("num_beam_groups", lambda v, g: (v or 1) > 1, "group beam search is not implemented"),
    ("length_penalty", lambda v, g: (g.get("num_beams") or 1) > 1 and v not in (None, 1, 1.0),
     "beam search is not implemented"),
    ("diversity_penalty", lambda v, g: (g.get("num_beam_groups") or 1) > 1 and v not in (None, 0, 0.0),
     "group beam search is not implemented"),
    ("penalty_alpha", lambda v, g: v is not None and v > 0 and (g.get("top_k") or 0) > 1,
     "contrastive search is not implemented"),
    ("dola_layers", lambda v, g: v is not None, "DoLa decoding is not implemented"),
)


def unsupported_generation_fields(gen: dict) -> list[tuple[str, str]]:
    """(field, why) for each generation_config.json field that would change HF's tokens and that we ignore."""
    out = []
    for name, active, why in _UNSUPPORTED:
        try:
            on = name in gen and bool(active(gen[name], gen))
        except TypeError:  # a value of the wrong type: HF would refuse it; we ignore it all the same
            on = True
        if on:
            out.append((name, why))
    return out


@functools.lru_cache(maxsize=None)
def _warn_once(name: str, value: str, why: str) -> None:
    log.warning("generation_config.json: %s=%s is ignored: %s", name, value, why)


def batch_arrays(params: Sequence[SamplingParams], rows: int, *, penalties: bool = False) -> dict:
    """Per-row filter values [rows] for a step (padding rows greedy): changing them does not recompile. With
    `penalties`, the penalty values too (padding rows: off)."""
    def col(name, pad, dtype, fn=lambda x: x):
        values = [fn(getattr(p, name)) for p in params] + [pad] * (rows - len(params))
        return np.asarray(values, dtype)

    out = {"temperature": col("temperature", 0.0, np.float32), "top_k": col("top_k", 0, np.int32),
           "top_p": col("top_p", 1.0, np.float32), "min_p": col("min_p", 0.0, np.float32)}
    if penalties:
        out.update(repetition_penalty=col("repetition_penalty", 1.0, np.float32),
                   presence_penalty=col("presence_penalty", 0.0, np.float32),
                   frequency_penalty=col("frequency_penalty", 0.0, np.float32))
    return out


def history_arrays(token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int], rows: int, width: int) -> dict:
    """Each row's tokens so far (prompt, then output) padded with -1 to [rows, width], and its prompt length
    [rows]: what the penalties count, from `token_counts` inside the step."""
    history = np.full((rows, width), -1, np.int32)
    for i, ids in enumerate(token_ids):
        history[i, :len(ids)] = ids
    lens = np.zeros(rows, np.int32)
    lens[:len(prompt_lens)] = prompt_lens
    return {"history": history, "prompt_lens": lens}


def token_counts(history: jax.Array, prompt_lens: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """From token ids [B, L] (-1: none), the first prompt_lens[b] of each row its prompt -> (seen [B, V] bool:
    in the prompt or the output, counts [B, V] int32: occurrences in the output)."""
    batch, width = history.shape
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    valid = history >= 0
    ids = jnp.where(valid, history, vocab)  # out of range: dropped
    seen = jnp.zeros((batch, vocab), bool).at[rows, ids].set(True, mode="drop")
    output = valid & (jnp.arange(width)[None, :] >= prompt_lens[:, None])  # [B, L]
    counts = jnp.zeros((batch, vocab), jnp.int32).at[rows, ids].add(output.astype(jnp.int32), mode="drop")
    return seen, counts


def record_tokens(seen: jax.Array, counts: jax.Array, tokens: jax.Array, live: jax.Array):
    """`seen` and `counts` [B, V] after each live row (live [B] bool) output tokens [B]."""
    rows = jnp.arange(tokens.shape[0])
    ids = jnp.where(live, tokens, seen.shape[1])  # out of range: dropped
    return seen.at[rows, ids].set(True, mode="drop"), counts.at[rows, ids].add(1, mode="drop")


def apply_penalties(logits: jax.Array, seen: jax.Array, counts: jax.Array, s: dict) -> jax.Array:
    """Repetition penalty (HF's) over `seen` tokens, then frequency and presence penalties (OpenAI's) over the
    output `counts`, each row with its own values [B]; logits [B, V] -> f32 [B, V]."""
    col = lambda name: jnp.asarray(s[name]).reshape(-1, 1)  # noqa: E731  [B, 1]
    x = logits.astype(jnp.float32)
    # [B, V], not a broadcast: XLA turns `x / broadcast(rp)` into `x * (1 / rp)`, a rounding away from HF's
    rp = jnp.where(seen, col("repetition_penalty"), 1.0)
    x = jnp.where(x < 0, x * rp, x / rp)
    return x - col("frequency_penalty") * counts - col("presence_penalty") * (counts > 0)


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
