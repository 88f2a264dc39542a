"""Test helper: run the flat, paged `forward` on [batch, seq] rows, each row its own sequence with its own blocks
(taken from a shuffled pool, so every test also exercises non-contiguous block tables)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import qwen3_jax as q


@dataclasses.dataclass
class RowCache:
    cache: q.KVCache
    tables: list[list[int]]  # row b's blocks

    @property
    def block_size(self) -> int:
        return self.cache.block_size


def row_cache(config, batch: int, max_len: int, block_size: int = 16, seed: int = 0) -> RowCache:
    """A pool with ceil(max_len / block_size) blocks per row (plus one spare), handed out in shuffled order."""
    per_row = -(-max_len // block_size)
    order = np.random.default_rng(seed).permutation(batch * per_row + 1)
    tables = [order[b * per_row:(b + 1) * per_row].tolist() for b in range(batch)]
    return RowCache(q.KVCache.init(config, batch * per_row + 1, block_size), tables)


def forward_rows(params, ids, pos, rc: RowCache, *, config, kernels=q.Kernels(), return_hidden=False):
    """`forward` for tokens ids [B, T] at contiguous positions pos [B, T] of row caches -> (logits [B, T, V],
    row cache[, hidden states [B, T, H] each]). T == 1 runs a decode step, else a prefill of the rows' chunks."""
    ids, pos = np.asarray(ids), np.asarray(pos)
    b, t = ids.shape
    if t == 1:
        meta = q.AttentionMetadata.for_decode(rc.tables, pos[:, 0].tolist())
    else:
        meta = q.AttentionMetadata.for_prefill(rc.tables, (pos[:, -1] + 1).tolist(), [t] * b,
                                               block_size=rc.block_size, num_tokens=b * t)
    out = q.forward(params, jnp.asarray(ids.reshape(-1)), jnp.asarray(pos.reshape(-1)), rc.cache, meta,
                    config=config, kernels=kernels, return_hidden=return_hidden)
    logits, cache = out[0], out[1]
    rc = RowCache(cache, rc.tables)
    logits = logits.reshape(b, t, -1)
    if return_hidden:
        return logits, rc, [h.reshape(b, t, -1) for h in out[2]]
    return logits, rc
