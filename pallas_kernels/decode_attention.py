"""GQA flash-decoding: one query token per row, the cache split along S (Pallas, Triton lowering).

Grid (B, KV, splits). A program takes the G query heads of one kv head as the rows of its q tile (padded to
16 rows, the Triton dot minimum; padding rows load zeros and are never stored), streams its chunk of the cache
[B, KV, S, D] in place in block_k tiles, stops at lengths[b] (dynamic loop bound, so slots past the valid
length are never loaded), and writes an unnormalised partial (acc, m, l). A small jnp step combines the
splits. Splitting S lets a handful of long rows fill every SM. With a single split (short contexts, or
enough rows to fill the GPU) each program normalises and writes the output itself: one kernel, no combine.

`decode_attention_qkv` is the model's decode step: the same attention fused with the `qkv_rope` epilogue. Each
program builds its q tile from the raw QKV projection (q/k RMSNorm and RoPE in registers), split 0 writes the
step's k/v into the cache, and a layer runs one kernel for all of it instead of two (at batch 1 each small kernel
costs a few microseconds of latency, whatever it moves).
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
from pallas_kernels.qkv_rope import _rope_combine, _rope_tables, check_args, qkv_rope_reference
from pallas_kernels.rms_norm import weight_normalized

_NUM_SMS = 132  # H100 SXM and H200
# Auto splits: enough for ~2 programs per SM, each with >= 4 key tiles; but a short cache still gets up to
# 6 one-tile splits (0.6B batch 1, 384 slots: 6 splits ran 5% faster end to end than 2; at 1280 slots, 20
# one-tile splits ran 3% slower than 5 four-tile ones: the combine grows with the splits). BENCHMARKS.md.
_MIN_TILES_PER_SPLIT = 4
_SHORT_CACHE_SPLITS = 6


@dataclasses.dataclass(frozen=True)
class Block:
    """Tile sizes. num_splits=None picks enough splits for about two programs per SM (see `_num_splits`)."""

    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3


def _attend(q, k_ref, v_ref, carry, start, stop, *, block_k, qk_scale):
    """Fold cache slots [start, stop) of k_ref/v_ref [S, D] into the online-softmax carry, block_k keys a tile;
    q [rows, D]. The loop bound is dynamic: slots past `stop` are never loaded."""
    n_keys = jnp.maximum(stop - start, 0)

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

    n_full = n_keys // block_k
    if block_k <= k_ref.shape[0]:  # (else no tile is ever full, and an unmasked one would not fit the cache)
        carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    n_tiles = (n_keys + block_k - 1) // block_k
    return lax.fori_loop(n_full, n_tiles, functools.partial(body, masked=True), carry)


def _store(out_refs, acc, m, l, *, rows, groups):
    """A program's result: with one split the normalised o [G, D]; else its partial (acc, m, l) for the combine.
    m is -inf for a split with no valid key: it gets zero weight in the combine."""
    outs = ((acc / l[:, None]).astype(out_refs[0].dtype),) if len(out_refs) == 1 else (acc, m, l)
    heads = pl.ds(0, rows)
    for ref, value in zip(out_refs, outs):
        if rows == groups:
            ref[...] = value
        else:  # padding rows are never stored
            row_ok = jnp.arange(rows) < groups
            mask = row_ok[:, None] if value.ndim == 2 else row_ok
            plgpu.store(ref.at[(heads,) + (slice(None),) * (value.ndim - 1)], value, mask=mask)


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, *out_refs, groups, rows, block_k, chunk, scale):
    # q_ref [G, D]; k_ref/v_ref [S, D] (the whole row, read in place); out_refs: acc [G, D], m [G], l [G] per
    # split, or with a single split the normalised output o [G, D] in q's dtype (no combine step needed).
    start = pl.program_id(2) * chunk
    length = jnp.minimum(lengths_ref[()], k_ref.shape[0])
    stop = jnp.minimum(start + chunk, length)  # valid keys of this split: [start, stop)
    heads = pl.ds(0, rows)
    if rows == groups:
        q = q_ref[heads, :]
    else:  # padding rows: zero in, never stored
        q = plgpu.load(q_ref.at[heads, :], mask=(jnp.arange(rows) < groups)[:, None], other=0)
    carry = _attend(q, k_ref, v_ref, _softmax_init(rows, k_ref.shape[1]), start, stop, block_k=block_k,
                    qk_scale=scale * _LOG2E)  # softmax in base 2: exp(x) = exp2(x * log2(e))
    _store(out_refs, *carry, rows=rows, groups=groups)


def _new_token(pos, qkv_ref, inv_freq_ref, q_norm_ref, k_norm_ref, *, groups, rows, eps, num_heads, num_kv_heads,
               rope_scale):
    """The fused decode epilogue for kv head program_id(1): (y [rows, D] f32, rows [0, G) the RoPE'd
    q heads and row G the RoPE'd k head; k_new [D] f32; v_new [1, D]). Values in f32 hold exactly what torch
    holds in the activation dtype."""
    head_dim = qkv_ref.shape[1]
    dtype = qkv_ref.dtype
    g = pl.program_id(1)
    r = jnp.arange(rows)
    is_k = (r == groups)[:, None]  # [rows, 1]
    head = jnp.where(r < groups, g * groups + r, num_heads + g)  # [rows]: qkv_ref row of each tile row
    in_tile = jnp.broadcast_to((r <= groups)[:, None], (rows, head_dim))
    d = jnp.arange(head_dim)
    half = head_dim // 2

    def heads_at(cols):  # the tile's heads at columns `cols` [D], and their norm weights there
        x = plgpu.load(qkv_ref.at[head[:, None], cols[None, :]], mask=in_tile, other=0).astype(jnp.float32)
        w = jnp.where(is_k, k_norm_ref[cols].astype(jnp.float32)[None, :],
                      q_norm_ref[cols].astype(jnp.float32)[None, :])
        return x, w

    # rotate_half(n) from the same RMSNorm of the heads loaded at swapped columns (no shuffle across lanes).
    (x, w), (x_sw, w_sw) = heads_at(d), heads_at((d + half) % head_dim)
    inv_rms = lax.rsqrt(jnp.sum(x * x, axis=1) / head_dim + eps)[:, None]
    n = weight_normalized(x, inv_rms, w, dtype)
    n_sw = weight_normalized(x_sw, inv_rms, w_sw, dtype)
    rotated = jnp.where((d < half)[None, :], -n_sw, n_sw)
    cos, sin = _rope_tables(pos.astype(jnp.float32) * inv_freq_ref[...], dtype, rope_scale)  # [D]
    y = _rope_combine(n, cos[None, :], rotated, sin[None, :], dtype)  # [rows, D]
    k_new = jnp.sum(jnp.where(is_k, y, 0.0), axis=0)  # [D]
    v_new = qkv_ref[pl.ds(num_heads + num_kv_heads + g, 1), :]  # [1, D]
    return y, k_new, v_new


def _decode_qkv_kernel(pos_ref, inv_freq_ref, q_norm_ref, k_norm_ref, qkv_ref, k_ref, v_ref, *out_refs,
                       groups, rows, block_k, chunk, scale, eps, num_heads, num_kv_heads, rope_scale):
    # pos_ref []: this token's position (= its cache slot); inv_freq_ref [D] (the D/2 frequencies twice);
    # qkv_ref [Hq + 2KV, D]: the row's projection, one head per row; k_ref/v_ref [S, D]: this (row, kv head)'s
    # caches, read in place; out_refs: as _decode_kernel's, then the caches again (aliased: written at pos).
    *out_refs, k_out_ref, v_out_ref = out_refs
    kv_len, head_dim = k_ref.shape
    dtype = qkv_ref.dtype
    split = pl.program_id(2)
    pos = pos_ref[()]

    y, k_new, v_new = _new_token(pos, qkv_ref, inv_freq_ref, q_norm_ref, k_norm_ref, groups=groups, rows=rows,
                                 eps=eps, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_scale=rope_scale)

    @pl.when((split == 0) & (pos < kv_len))
    def _():  # split 0 stores the token's k and v; no program reads that slot (the loops stop before pos)
        k_out_ref[pl.ds(pos, 1), :] = k_new[None, :].astype(dtype)
        v_out_ref[pl.ds(pos, 1), :] = v_new

    # Split 0 starts its softmax from the new token itself (held in registers), weight exp2(0) = 1.
    qk_scale = scale * _LOG2E
    first = split == 0
    s_new = jnp.sum(y * k_new[None, :], axis=1) * qk_scale  # [rows]
    carry = (jnp.where(first, jnp.broadcast_to(v_new.astype(jnp.float32), (rows, head_dim)), 0.0),
             jnp.where(first, s_new, -jnp.inf), jnp.zeros((rows,), jnp.float32) + first.astype(jnp.float32))
    start = split * chunk
    stop = jnp.minimum(start + chunk, jnp.minimum(pos, kv_len))  # cached keys of this split: [start, stop)
    carry = _attend(y.astype(dtype), k_ref, v_ref, carry, start, stop, block_k=block_k, qk_scale=qk_scale)
    _store(out_refs, *carry, rows=rows, groups=groups)


def _check(q, k_cache, v_cache, lengths):
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
    batch, num_heads, head_dim = q.shape
    _check_cache(batch, num_heads, head_dim, k_cache, v_cache, lengths, "lengths")


def _check_step(qkv, k_cache):
    """What a fused decode step takes beyond `qkv_rope`'s arguments: one token per row, and the caches."""
    if qkv.ndim != 3 or qkv.shape[1] != 1 or k_cache is None:
        raise ValueError(f"decode_attention_qkv takes one token per row, qkv [B, 1, (Hq + 2KV) * D], and the "
                         f"caches; got qkv {qkv.shape}{'' if k_cache is not None else ' and no caches'}")


def _num_splits(block: Block, batch: int, num_kv: int, kv_len: int, block_k: int) -> int:
    max_splits = pl.cdiv(kv_len, block_k)
    if block.num_splits is not None:
        return max(1, min(block.num_splits, max_splits))
    want = pl.cdiv(2 * _NUM_SMS, batch * num_kv)  # about two programs per SM
    most = max(pl.cdiv(max_splits, _MIN_TILES_PER_SPLIT), min(max_splits, _SHORT_CACHE_SPLITS))
    return max(1, min(want, most))


def _tiling(block: Block, batch: int, num_kv: int, kv_len: int, rows_needed: int):
    """(rows of the q tile, block_k, splits, keys per split) for a launch over (B, KV, splits)."""
    if block.block_k < 16 or block.block_k != _next_pow2(block.block_k):
        raise ValueError(f"block_k must be a power of two >= 16, got {block}")
    rows = max(_MIN_ROWS, _next_pow2(rows_needed))
    block_k = max(16, min(block.block_k, _next_pow2(kv_len)))
    splits = _num_splits(block, batch, num_kv, kv_len, block_k)
    chunk = pl.cdiv(pl.cdiv(kv_len, splits), block_k) * block_k  # keys per split, whole tiles
    return rows, block_k, pl.cdiv(kv_len, chunk), chunk


def _outputs(batch, num_kv, splits, groups, head_dim, dtype):
    """Output specs and shapes: o [B, KV, G, D] with one split (no combine); else per-split partials."""
    if splits == 1:  # one program per (row, kv head) sees every key: it normalises and writes the output itself
        return ([pl.BlockSpec((None, None, groups, head_dim), lambda b, h, s: (b, h, 0, 0))],
                [jax.ShapeDtypeStruct((batch, num_kv, groups, head_dim), dtype)])
    specs = [
        pl.BlockSpec((None, None, None, groups, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
        pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
        pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
    ]
    shapes = [
        jax.ShapeDtypeStruct((batch, num_kv, splits, groups, head_dim), jnp.float32),  # acc
        jax.ShapeDtypeStruct((batch, num_kv, splits, groups), jnp.float32),  # m (log2 domain)
        jax.ShapeDtypeStruct((batch, num_kv, splits, groups), jnp.float32),  # l
    ]
    return specs, shapes


def _combine(outs, dtype):
    """The kernel's outputs -> o [B, Hq, D]: as is with one split, else the splits rescaled to the global max,
    summed and normalised."""
    if len(outs) == 1:
        b, kv, g, d = outs[0].shape
        return outs[0].reshape(b, kv * g, d)
    acc, m, l = outs
    b, kv, _, g, d = acc.shape
    m_all = m.max(axis=2, keepdims=True)  # [B, KV, 1, G], finite: split 0 always has a valid key
    w = jnp.exp2(m - m_all)  # [B, KV, splits, G]
    num = (w[..., None] * acc).sum(axis=2)  # [B, KV, G, D]
    den = (w * l).sum(axis=2)  # [B, KV, G]
    return (num / den[..., None]).astype(dtype).reshape(b, kv * g, d)


def decode_attention(q, k_cache, v_cache, lengths, *, block: Block | None = None, interpret: bool = False):
    """Attention of one query per row, q [B,Hq,D], over the first lengths[b] slots of [B,KV,S,D] -> [B,Hq,D]."""
    _check(q, k_cache, v_cache, lengths)
    _check_kernel_operands(q, k_cache)
    block = block or Block()
    batch, num_heads, head_dim = q.shape
    _, num_kv, kv_len, _ = k_cache.shape
    groups = num_heads // num_kv
    rows, block_k, splits, chunk = _tiling(block, batch, num_kv, kv_len, groups)
    kernel = functools.partial(_decode_kernel, groups=groups, rows=rows, block_k=block_k, chunk=chunk,
                               scale=head_dim**-0.5)
    q4 = q.reshape(batch, num_kv, groups, head_dim)  # [B, KV, G, D] (free view)
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, s: (b, h, 0, 0))
    out_specs, out_shape = _outputs(batch, num_kv, splits, groups, head_dim, q.dtype)
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
    return _combine(outs, q.dtype)


def decode_attention_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, *, num_heads, num_kv_heads,
                         head_dim, eps, rope_scale=1.0, block: Block | None = None, interpret: bool = False):
    """One decode token per row from its projection qkv [B, 1, (Hq + 2KV) * D]: `qkv_rope` (q/k RMSNorm + RoPE,
    k and v into the caches [B, KV, S, D] at slot positions[b, 0], in place) and `decode_attention` over slots
    [0, positions[b, 0]] in ONE kernel -> (o [B, Hq, D], k_cache, v_cache).

    Each program recomputes its group's q heads and k head from the projection (a few KB); split 0 also stores
    the new k/v and takes the new token into its softmax from registers, so no program reads the slot being
    written. The caller must keep positions[b, 0] < S. Donate the caches at the jit boundary."""
    _check_step(qkv, k_cache)
    check_args(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, num_heads, num_kv_heads, head_dim)
    batch = qkv.shape[0]
    heads = num_heads + 2 * num_kv_heads
    qkv3 = qkv.reshape(batch, heads, head_dim)  # [B, Hq + 2KV, D] (free view)
    _check_kernel_operands(qkv3, k_cache)
    block = block or Block()
    kv_len = k_cache.shape[2]
    groups = num_heads // num_kv_heads
    rows, block_k, splits, chunk = _tiling(block, batch, num_kv_heads, kv_len, groups + 1)  # + the k row
    kernel = functools.partial(_decode_qkv_kernel, groups=groups, rows=rows, block_k=block_k, chunk=chunk,
                               scale=head_dim**-0.5, eps=float(eps), num_heads=num_heads, num_kv_heads=num_kv_heads,
                               rope_scale=float(rope_scale))
    vec_spec = pl.BlockSpec((head_dim,), lambda b, h, s: (0,))
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, s: (b, h, 0, 0))
    out_specs, out_shape = _outputs(batch, num_kv_heads, splits, groups, head_dim, qkv.dtype)
    n_out = len(out_shape)
    *outs, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            vec_spec, vec_spec, vec_spec,
            pl.BlockSpec((None, heads, head_dim), lambda b, h, s: (b, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[*out_specs, kv_spec, kv_spec],
        out_shape=[*out_shape, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={5: n_out, 6: n_out + 1},  # the caches, updated in place
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="gqa_flash_decoding_qkv",
    )(positions[:, 0].astype(jnp.int32), jnp.concatenate([inv_freq, inv_freq]), q_norm, k_norm, qkv3, k_cache,
      v_cache)
    return _combine(outs, qkv.dtype), k_cache, v_cache


def decode_attention_reference(q, k_cache, v_cache, lengths):
    """Pure-jnp twin of `decode_attention`: the prefill reference with one query at position lengths[b] - 1."""
    _check(q, k_cache, v_cache, lengths)
    return attention_reference(q[:, None], k_cache, v_cache, lengths.astype(jnp.int32) - 1)[:, 0]


def decode_attention_qkv_reference(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, **dims):
    """Pure-jnp twin of `decode_attention_qkv`: `qkv_rope_reference` with the caches, then the decode reference."""
    _check_step(qkv, k_cache)
    q, k_cache, v_cache = qkv_rope_reference(qkv, q_norm, k_norm, inv_freq, positions, k_cache=k_cache,
                                             v_cache=v_cache, **dims)
    return decode_attention_reference(q[:, 0], k_cache, v_cache, positions[:, 0] + 1), k_cache, v_cache
