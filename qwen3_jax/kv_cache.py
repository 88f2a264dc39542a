"""The KV cache: an immutable pytree of per-layer [batch, kv_heads, max_len, head_dim] arrays.

Each step returns a new cache; jit donates the old one (`donate_argnames="cache"`) so XLA writes the new
keys and values into the same buffers instead of copying the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import Qwen3Config


LEN_MULTIPLE = 64  # cache lengths are rounded up to this, so attention kernels' key tiles never straddle the end


class CacheOverflowError(ValueError):
    """A step would write past the cache's max_len."""


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, KV, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, KV, S, D]

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        """An empty cache for `batch` rows of at least `max_len` positions (rounded up to a multiple of 64)."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"cache batch and max_len must be positive, got batch={batch}, max_len={max_len}")
        max_len = -(-max_len // LEN_MULTIPLE) * LEN_MULTIPLE
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        dtype = dtype or config.jnp_dtype
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731  (a fresh buffer per layer, never shared)
        return cls(k=tuple(zeros() for _ in range(config.num_hidden_layers)),
                   v=tuple(zeros() for _ in range(config.num_hidden_layers)))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)

    def check_fits(self, end_position: int) -> None:
        """Raise before a step whose positions would reach `end_position` (exclusive) beyond max_len."""
        if end_position > self.max_len:
            raise CacheOverflowError(
                f"this step needs {end_position} cache positions but the KV cache holds max_len={self.max_len}; "
                "create a larger cache (or shorten the prompt / max_new_tokens)"
            )
