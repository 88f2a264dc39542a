"""GQA flash-decoding: one query token per row, the cache split along S (Pallas, Triton lowering).

Grid (B, KV, splits). A program takes the G query heads of one kv head as the rows of its q tile (padded to
16 rows, the Triton dot minimum; padding rows load zeros and are never stored), streams its chunk of the cache
[B, KV, S, D] in place in block_k tiles, stops at lengths[b] (dynamic loop bound, so slots past the valid
length are never loaded), and writes an unnormalised partial (acc, m, l). A small jnp step combines the
splits. Splitting S lets a handful of long rows fill every SM. With a single split (short contexts, or
enough rows to fill the GPU) each program normalises and writes the output itself: one kernel, no combine.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention import (_LOG2E, _MASK, _MIN_ROWS, _check_cache, _check_kernel_operands, _dot,
                                      _next_pow2, _softmax_init, _softmax_step, attention_reference)

_NUM_SMS = 132  # H100 SXM and H200


@dataclasses.dataclass(frozen=True)
class Block:
    """Tile sizes. num_splits=None picks enough splits for about two programs per SM."""

    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, *out_refs, groups, rows, block_k, chunk, scale):
    # q_ref [G, D]; k_ref/v_ref [S, D] (the whole row, read in place); out_refs: acc [G, D], m [G], l [G] per
    # split, or with a single split the normalised output o [G, D] in q's dtype (no combine step needed).
    head_dim = k_ref.shape[1]
    start = pl.program_id(2) * chunk
    length = jnp.minimum(lengths_ref[()], k_ref.shape[0])
    stop = jnp.minimum(start + chunk, length)  # valid keys of this split: [start, stop)
    n_keys = jnp.maximum(stop - start, 0)

    heads = pl.ds(0, rows)
    row_ok = jnp.arange(rows) < groups if rows != groups else None  # padding rows: zero in, never stored
    if row_ok is None:
        q = q_ref[heads, :]
    else:
        q = plgpu.load(q_ref.at[heads, :], mask=row_ok[:, None], other=0)
    qk_scale = scale * _LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))

    def body(j, carry, *, masked):
        first = start + j * block_k
        keys = pl.ds(first, block_k)
        if masked:
            kpos = first + jnp.arange(block_k)  # [block_k]
            ok = kpos < stop
            k = plgpu.load(k_ref.at[keys, :], mask=ok[:, None], other=0)
            v = plgpu.load(v_ref.at[keys, :], mask=ok[:, None], other=0)
        else:
            k = k_ref[keys, :]
            v = v_ref[keys, :]
        s = _dot(q, k, trans_b=True) * qk_scale  # [rows, block_k] f32
        if masked:
            s = jnp.where(ok[None, :], s, _MASK)
        return _softmax_step(carry, s, v)

    carry = _softmax_init(rows, head_dim)
    n_full = n_keys // block_k
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    n_tiles = (n_keys + block_k - 1) // block_k
    acc, m, l = lax.fori_loop(n_full, n_tiles, functools.partial(body, masked=True), carry)
    # m is -inf for a split with no valid key: it gets zero weight in the combine.
    outs = ((acc / l[:, None]).astype(out_refs[0].dtype),) if len(out_refs) == 1 else (acc, m, l)
    for ref, value in zip(out_refs, outs):
        if row_ok is None:
            ref[...] = value
        else:
            mask = row_ok[:, None] if value.ndim == 2 else row_ok
            plgpu.store(ref.at[(heads,) + (slice(None),) * (value.ndim - 1)], value, mask=mask)


def _check(q, k_cache, v_cache, lengths):
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
    batch, num_heads, head_dim = q.shape
    _check_cache(batch, num_heads, head_dim, k_cache, v_cache, lengths, "lengths")


def _num_splits(block: Block, batch: int, num_kv: int, kv_len: int, block_k: int) -> int:
    max_splits = pl.cdiv(kv_len, block_k)
    if block.num_splits is not None:
        return max(1, min(block.num_splits, max_splits))
    want = pl.cdiv(2 * _NUM_SMS, batch * num_kv)  # about two programs per SM
    return max(1, min(want, pl.cdiv(kv_len, 4 * block_k)))  # but at least 4 tiles per split


def decode_attention(q, k_cache, v_cache, lengths, *, block: Block | None = None, interpret: bool = False):
    """Attention of one query per row, q [B,Hq,D], over the first lengths[b] slots of [B,KV,S,D] -> [B,Hq,D]."""
    _check(q, k_cache, v_cache, lengths)
    _check_kernel_operands(q, k_cache)
    block = block or Block()
    batch, num_heads, head_dim = q.shape
    _, num_kv, kv_len, _ = k_cache.shape
    groups = num_heads // num_kv
    if block.block_k < 16 or block.block_k != _next_pow2(block.block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block}")
    rows = max(_MIN_ROWS, _next_pow2(groups))
    block_k = max(16, min(block.block_k, _next_pow2(kv_len)))
    splits = _num_splits(block, batch, num_kv, kv_len, block_k)
    chunk = pl.cdiv(pl.cdiv(kv_len, splits), block_k) * block_k  # keys per split, whole tiles
    splits = pl.cdiv(kv_len, chunk)

    kernel = functools.partial(_decode_kernel, groups=groups, rows=rows, block_k=block_k, chunk=chunk,
                               scale=head_dim**-0.5)
    q4 = q.reshape(batch, num_kv, groups, head_dim)  # [B, KV, G, D] (free view)
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, s: (b, h, 0, 0))
    if splits == 1:  # one program per (row, kv head) sees every key: it normalises and writes the output itself
        out_specs = [pl.BlockSpec((None, None, groups, head_dim), lambda b, h, s: (b, h, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((batch, num_kv, groups, head_dim), q.dtype)]
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, groups, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((batch, num_kv, splits, groups, head_dim), jnp.float32),  # acc
            jax.ShapeDtypeStruct((batch, num_kv, splits, groups), jnp.float32),  # m (log2 domain)
            jax.ShapeDtypeStruct((batch, num_kv, splits, groups), jnp.float32),  # l
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, groups, head_dim), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="gqa_flash_decoding",
    )(lengths.astype(jnp.int32), q4, k_cache, v_cache)
    if splits == 1:
        return outs[0].reshape(batch, num_heads, head_dim)
    acc, m, l = outs

    # Combine the splits: rescale each to the global max, sum, normalise.
    m_all = m.max(axis=2, keepdims=True)  # [B, KV, 1, G], finite: split 0 always has a valid key
    w = jnp.exp2(m - m_all)  # [B, KV, splits, G]
    num = (w[..., None] * acc).sum(axis=2)  # [B, KV, G, D]
    den = (w * l).sum(axis=2)  # [B, KV, G]
    return (num / den[..., None]).astype(q.dtype).reshape(batch, num_heads, head_dim)


def decode_attention_reference(q, k_cache, v_cache, lengths):
    """Pure-jnp twin of `decode_attention`: the prefill reference with one query at position lengths[b] - 1."""
    _check(q, k_cache, v_cache, lengths)
    return attention_reference(q[:, None], k_cache, v_cache, lengths.astype(jnp.int32) - 1)[:, 0]
