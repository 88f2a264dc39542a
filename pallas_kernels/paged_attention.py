"""Attention over a paged KV cache: keys and values live in a pool of fixed-size blocks, reached per sequence
through a block table (vLLM's PagedAttention layout).

Pool layout, per layer: k_pool, v_pool [num_blocks, KV, block_size, D]. Sequence s's position p lives in block
block_tables[s, p // block_size] at offset p % block_size. Table entries past a sequence's last block may hold
any valid block index (they are never read unmasked).

Three ops, each a Pallas kernel (Triton lowering) beside its pure-jnp `*_reference`:
- `paged_prefill_attention`: causal attention of a ragged, flattened batch of query chunks (chunked prefill,
  prefix-cache suffixes): q [N, Hq, D] holds sequence s's chunk at rows query_start[s] .. query_start[s+1]-1,
  at positions seq_lens[s] - q_len[s] .. seq_lens[s] - 1; their keys are already in the pool.
- `paged_decode_attention`: one query per sequence over its first seq_lens[b] positions (flash-decoding).
- `paged_decode_attention_qkv`: a decode step fused with the QKV epilogue (q/k RMSNorm + RoPE), writing the
  token's k/v into its slot of the pool before attending.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import attention_reference
from pallas_kernels.qkv_rope import check_args as check_qkv_args
from pallas_kernels.qkv_rope import qkv_rope_reference


def check_pool(k_pool, v_pool, num_heads: int, head_dim: int):
    """The pool pair against q's head count and head_dim -> (num_blocks, KV, block_size)."""
    if k_pool.ndim != 4:
        raise ValueError(f"k_pool must be [num_blocks, KV, block_size, D], got shape {k_pool.shape}")
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"v_pool {v_pool.shape} {v_pool.dtype} must match k_pool {k_pool.shape} {k_pool.dtype}")
    num_blocks, num_kv, block_size, d = k_pool.shape
    if d != head_dim:
        raise ValueError(f"k_pool head_dim {d} does not match q head_dim {head_dim}")
    if num_heads % num_kv:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of the pool's kv heads ({num_kv})")
    return num_blocks, num_kv, block_size


def _check_table(block_tables, rows: int, lens, lens_name: str):
    if block_tables.ndim != 2 or block_tables.shape[0] != rows or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be integer [{rows}, max_blocks], got {block_tables.shape} "
                         f"{block_tables.dtype}")
    if lens.shape != (rows,) or not jnp.issubdtype(lens.dtype, jnp.integer):
        raise ValueError(f"{lens_name} must be an integer array of shape ({rows},), got {lens.shape} {lens.dtype}")


def check_decode(q, k_pool, v_pool, block_tables, seq_lens):
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
    check_pool(k_pool, v_pool, q.shape[1], q.shape[2])
    _check_table(block_tables, q.shape[0], seq_lens, "seq_lens")


def check_prefill(q, k_pool, v_pool, block_tables, query_start, seq_lens):
    if q.ndim != 3:
        raise ValueError(f"q must be [N, Hq, D], got shape {q.shape}")
    check_pool(k_pool, v_pool, q.shape[1], q.shape[2])
    _check_table(block_tables, seq_lens.shape[0], seq_lens, "seq_lens")
    if query_start.shape != (seq_lens.shape[0] + 1,) or not jnp.issubdtype(query_start.dtype, jnp.integer):
        raise ValueError(f"query_start must be integer [S + 1] = ({seq_lens.shape[0] + 1},), got "
                         f"{query_start.shape} {query_start.dtype}")


def gather_blocks(pool, block_tables):
    """The pool's blocks of each table row, contiguous: [NB, KV, bs, D] -> [R, KV, max_blocks * bs, D]."""
    rows, max_blocks = block_tables.shape
    _, kv, bs, d = pool.shape
    x = pool[block_tables.astype(jnp.int32)]  # [R, M, KV, bs, D]
    return x.transpose(0, 2, 1, 3, 4).reshape(rows, kv, max_blocks * bs, d)


def slot_of(block_tables, positions, block_size: int):
    """Flat pool slots (block * block_size + offset) of positions [R] in rows [R] of block_tables; -1 where the
    position is negative (a padding row)."""
    pos = jnp.maximum(positions, 0).astype(jnp.int32)
    block = jnp.take_along_axis(block_tables.astype(jnp.int32), (pos // block_size)[:, None], axis=1)[:, 0]
    return jnp.where(positions >= 0, block * block_size + pos % block_size, -1)


def write_slots(k_pool, v_pool, k, v, slots):
    """k, v [N, KV, D] into the pools at flat slots [N] (block * block_size + offset); slots < 0 are skipped.
    An XLA scatter: in place when the pools are donated."""
    num_blocks, _, bs, _ = k_pool.shape
    ok = slots >= 0
    block = jnp.where(ok, slots // bs, num_blocks)  # out of range: dropped by mode="drop"
    off = jnp.where(ok, slots % bs, 0)
    k_pool = k_pool.at[block, :, off, :].set(k.astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[block, :, off, :].set(v.astype(v_pool.dtype), mode="drop")
    return k_pool, v_pool


def paged_decode_attention_reference(q, k_pool, v_pool, block_tables, seq_lens):
    """Pure-jnp twin of `paged_decode_attention`: q [B, Hq, D] at position seq_lens[b] - 1 over the row's blocks
    -> [B, Hq, D]. Rows with seq_lens[b] == 0 (padding) give zeros."""
    check_decode(q, k_pool, v_pool, block_tables, seq_lens)
    k = gather_blocks(k_pool, block_tables)
    v = gather_blocks(v_pool, block_tables)
    o = attention_reference(q[:, None], k, v, seq_lens.astype(jnp.int32) - 1)[:, 0]
    return jnp.where((seq_lens > 0)[:, None, None], o, 0).astype(q.dtype)


def paged_decode_attention_qkv_reference(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables,
                                         *, num_heads, num_kv_heads, head_dim, eps):
    """Pure-jnp twin of `paged_decode_attention_qkv`: qkv [B, 1, (Hq + 2KV) * D] at positions [B, 1] ->
    q/k RMSNorm + RoPE, k/v written to the row's slot of the pools, attention over positions 0..p ->
    (o [B, Hq, D], k_pool, v_pool). A row with position -1 is padding: nothing written, zeros out."""
    if qkv.ndim != 3 or qkv.shape[1] != 1:
        raise ValueError(f"a decode step takes one token per row, qkv [B, 1, (Hq + 2KV) * D]; got {qkv.shape}")
    check_qkv_args(qkv, q_norm, k_norm, inv_freq, positions, None, None, num_heads, num_kv_heads, head_dim)
    check_pool(k_pool, v_pool, num_heads, head_dim)
    q, k, v = qkv_rope_reference(qkv, q_norm, k_norm, inv_freq, positions, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps)  # [B, 1, H, D]
    pos = positions[:, 0].astype(jnp.int32)
    slots = slot_of(block_tables, pos, k_pool.shape[2])
    k_pool, v_pool = write_slots(k_pool, v_pool, k[:, 0], v[:, 0], slots)
    o = paged_decode_attention_reference(q[:, 0], k_pool, v_pool, block_tables, jnp.maximum(pos + 1, 0))
    return o, k_pool, v_pool


def token_rows(query_start, seq_lens, num_tokens: int):
    """Per flattened query token n: (its sequence s, its position), with s = -1 and position -1 for padding
    tokens past query_start[-1]."""
    n = jnp.arange(num_tokens, dtype=jnp.int32)
    starts = query_start.astype(jnp.int32)
    s = jnp.searchsorted(starts[1:], n, side="right").astype(jnp.int32)  # first seq whose end is past n
    valid = n < starts[-1]
    s_safe = jnp.minimum(s, seq_lens.shape[0] - 1)
    q_len = starts[s_safe + 1] - starts[s_safe]
    pos = seq_lens.astype(jnp.int32)[s_safe] - q_len + (n - starts[s_safe])
    return jnp.where(valid, s_safe, -1), jnp.where(valid, pos, -1)


def paged_prefill_attention_reference(q, k_pool, v_pool, block_tables, query_start, seq_lens):
    """Pure-jnp twin of `paged_prefill_attention`: each query token of q [N, Hq, D] attends causally to its own
    sequence's positions 0..p through the block table -> [N, Hq, D]; padding tokens give zeros."""
    check_prefill(q, k_pool, v_pool, block_tables, query_start, seq_lens)
    seq, pos = token_rows(query_start, seq_lens, q.shape[0])
    tables = block_tables[jnp.maximum(seq, 0)]  # [N, M]: each token's own table
    k = gather_blocks(k_pool, tables)  # [N, KV, L, D]
    v = gather_blocks(v_pool, tables)
    o = attention_reference(q[:, None], k, v, pos)[:, 0]  # one query per "row": position pos[n]
    return jnp.where((seq >= 0)[:, None, None], o, 0).astype(q.dtype)
