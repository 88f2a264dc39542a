"""Token selection inside jit: greedy, or temperature / top-k / top-p / min-p sampling in Hugging Face's order."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature=0 means greedy; top_k=0, top_p=1, min_p=0 switch a filter off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"invalid sampling value {name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            bad("temperature", "must be a number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 disables top-p)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 disables min-p)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def greedy_decoding(cls) -> "SamplingParams":
        return cls(temperature=0.0)

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """Defaults as HF's `generate` takes them from generation_config.json; `overrides` (None = keep) win."""
        values = {}
        if gen.get("do_sample", False):
            values = {"temperature": gen.get("temperature", 1.0), "top_k": gen.get("top_k", 50) or 0,
                      "top_p": gen.get("top_p", 1.0), "min_p": gen.get("min_p") or 0.0}
        else:
            values = {"temperature": 0.0}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def as_arrays(self) -> dict:
        """The traced part: changing these values does not recompile the step."""
        return {"temperature": jnp.float32(max(self.temperature, 1e-6)), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p), "min_p": jnp.float32(self.min_p)}


def filter_logits(logits: jax.Array, s: dict) -> jax.Array:
    """Temperature, then top-k, top-p and min-p as HF's warpers do; removed entries become -inf. [B, V] f32."""
    neg = jnp.float32(-jnp.inf)
    x = logits.astype(jnp.float32) / s["temperature"]
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)  # [B, V] descending
    # top-k: keep values >= the k-th largest (ties kept, as HF's `scores < topk[..., -1]`).
    k = jnp.where(s["top_k"] > 0, jnp.minimum(s["top_k"], vocab), vocab)
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, (x.shape[0], 1)), axis=-1)
    x = jnp.where(x < kth, neg, x)
    desc = jnp.where(desc < kth, neg, desc)
    # top-p: drop a token when the mass of strictly more likely tokens already reaches top_p.
    p = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p
    n_keep = jnp.maximum(jnp.sum(before < s["top_p"], axis=-1, keepdims=True), 1)
    n_keep = jnp.where(s["top_p"] >= 1, vocab, n_keep)  # f32 cumsum can exceed 1 - eps: 1 must mean "off"
    thr = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
    x = jnp.where(x < thr, neg, x)
    # min-p: drop tokens whose probability is below min_p times the top token's.
    probs = jax.nn.softmax(x, axis=-1)
    x = jnp.where(probs < s["min_p"] * jnp.max(probs, axis=-1, keepdims=True), neg, x)
    return x


def sample(logits: jax.Array, key: jax.Array, s: dict | None) -> jax.Array:
    """Next token ids [B] from logits [B, V]; `s=None` selects greedy argmax."""
    if s is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, s), axis=-1).astype(jnp.int32)
