"""The paged KV cache: per layer a pool of fixed-size blocks, and the per-step metadata that addresses it.

`KVCache` is an immutable pytree of per-layer k/v pools [num_blocks, kv_heads, block_size, head_dim]; jit donates
it (`donate_argnames="cache"`) so each step writes its keys and values into the same buffers. Which blocks hold a
sequence is host state (the engine's block manager); a step sees it as `AttentionMetadata`: block tables, lengths,
and for prefill the flat slot of every token. Position p of a sequence lives in block table[p // block_size] at
offset p % block_size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import Qwen3Config


class CacheOverflowError(ValueError):
    """A request needs more KV-cache blocks than the pool has."""


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [num_blocks, KV, block_size, D]
    v: tuple[jax.Array, ...]  # per layer [num_blocks, KV, block_size, D]

    @classmethod
    def init(cls, config: Qwen3Config, num_blocks: int, block_size: int, dtype=None, *, kv_heads: int | None = None,
             sharding=None) -> "KVCache":
        """An empty pool of `num_blocks` blocks of `block_size` positions per layer; `kv_heads` (default the
        config's) and `sharding` for a pool split over devices (`parallel.TensorParallel.init_cache`)."""
        check_block_size(block_size)
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        shape = (num_blocks, kv_heads or config.num_key_value_heads, block_size, config.head_dim)
        dtype = dtype or config.jnp_dtype
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731  (a fresh buffer per layer, never shared)
        if sharding is not None:  # made where `sharding` puts it (also across processes)
            zeros = jax.jit(zeros, out_shardings=sharding)
        return cls(k=tuple(zeros() for _ in range(config.num_hidden_layers)),
                   v=tuple(zeros() for _ in range(config.num_hidden_layers)))

    @staticmethod
    def bytes_per_block(config: Qwen3Config, block_size: int, dtype=None) -> int:
        """Device bytes of one block across all layers, keys and values."""
        itemsize = jnp.dtype(dtype or config.jnp_dtype).itemsize
        return 2 * config.num_hidden_layers * config.num_key_value_heads * block_size * config.head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.k + self.v)


def blocks_for_memory(config: Qwen3Config, *, block_size: int, utilization: float, max_num_batched_tokens: int,
                      max_rows: int, fallback_tokens: int, device=None) -> int:
    """KV blocks that fit in `utilization` of the device's memory after what is in use (the weights) and a
    reserve for one step's temporaries; without memory statistics (CPU), enough for `fallback_tokens`. With
    tensor parallelism `config` is one device's part (`parallel.local_config`) and `device` one of the mesh's."""
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return -(-fallback_tokens // block_size)
    used = stats.get("bytes_in_use", 0)
    # A generous bound on one step's temporaries: the largest prefill's hidden states, projections and MLP in
    # f32, the sampled rows' logits and sort buffers, and 512 MiB of slack.
    width = 4 * config.hidden_size + 2 * config.intermediate_size + config.q_size + 2 * config.kv_size
    reserve = 8 * max_num_batched_tokens * width + 24 * max_rows * config.vocab_size + 512 * 2**20
    blocks = int((limit * utilization - used - reserve) // KVCache.bytes_per_block(config, block_size))
    if blocks < 2:
        raise CacheOverflowError(
            f"no device memory left for the KV cache: {limit / 2**30:.1f} GiB usable x gpu_memory_utilization="
            f"{utilization} - {used / 2**30:.1f} GiB in use (weights) - {reserve / 2**30:.1f} GiB for "
            "activations; raise gpu_memory_utilization, lower max_num_batched_tokens, or pass num_blocks")
    return blocks


def check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (one attention key tile), got {block_size!r}")


@struct.dataclass
class AttentionMetadata:
    """Where a step's tokens read and write the pool. Decode: one token per row (N = S); the model takes the
    rows' positions from its `positions` argument (position -1: a padding row), so one metadata serves every step
    of an on-device decode loop. Prefill: sequence s's chunk is tokens query_start[s] .. query_start[s+1] - 1 at positions
    seq_lens[s] - chunk .. seq_lens[s] - 1; tokens past query_start[-1] are padding (slot -1: nothing written)."""

    block_tables: jax.Array  # [S, max_blocks] int32
    seq_lens: jax.Array  # [S] int32: positions in the cache after this step
    query_start: jax.Array  # [S + 1] int32 (prefill; decode: arange)
    slot_mapping: jax.Array  # [N] int32: flat slot (block * block_size + offset) of each token, -1 for padding
    decode: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def for_prefill(cls, block_tables: Sequence[Sequence[int]], seq_lens: Sequence[int], query_lens: Sequence[int],
                    *, block_size: int, num_tokens: int, num_seqs: int | None = None,
                    max_blocks: int | None = None, put=jax.device_put) -> "AttentionMetadata":
        """Host-built metadata for chunks of query_lens[s] tokens ending at seq_lens[s], padded to `num_tokens`
        tokens and `num_seqs` rows (tables padded to `max_blocks` with block 0, never read); `put` moves the
        arrays to the device(s)."""
        num_seqs = num_seqs or len(seq_lens)
        tables = _table_array(block_tables, num_seqs, max_blocks)
        lens = np.zeros(num_seqs, np.int32)
        lens[: len(seq_lens)] = seq_lens
        qlens = np.zeros(num_seqs, np.int32)
        qlens[: len(query_lens)] = query_lens
        start = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
        if start[-1] > num_tokens:
            raise ValueError(f"{start[-1]} query tokens do not fit a step of {num_tokens} tokens")
        slots = np.full(num_tokens, -1, np.int32)
        for s, (n, q) in enumerate(zip(lens, qlens)):
            pos = np.arange(n - q, n)
            slots[start[s]:start[s + 1]] = tables[s, pos // block_size] * block_size + pos % block_size
        return cls(*put((tables, lens, start, slots)), decode=False)

    @classmethod
    def for_decode(cls, block_tables: Sequence[Sequence[int]], positions: Sequence[int], *, num_seqs: int | None = None,
                   max_blocks: int | None = None) -> "AttentionMetadata":
        """Host-built metadata for one token per row at `positions` (rows past len(positions) are padding)."""
        num_seqs = num_seqs or len(positions)
        tables = _table_array(block_tables, num_seqs, max_blocks)
        pos = np.full(num_seqs, -1, np.int32)
        pos[: len(positions)] = positions
        # The decode kernels find each token's slot from its table row and position themselves.
        return cls(jnp.asarray(tables), jnp.asarray(pos + 1), jnp.arange(num_seqs + 1, dtype=jnp.int32),
                   jnp.full((num_seqs,), -1, jnp.int32), decode=True)


def _table_array(block_tables, num_seqs: int, max_blocks: int | None) -> np.ndarray:
    width = max_blocks or max((len(t) for t in block_tables), default=1) or 1
    out = np.zeros((num_seqs, width), np.int32)
    for s, t in enumerate(block_tables):
        if len(t) > width:
            raise ValueError(f"sequence {s} has {len(t)} blocks, more than the table width {width}")
        out[s, : len(t)] = t
    return out
