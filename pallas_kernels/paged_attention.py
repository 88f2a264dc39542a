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

The kernels are the contiguous-cache ones of attention.py and decode_attention.py (G query heads of a kv head
stacked as the rows of one q tile, base-2 online softmax, masked loads past the last valid key) with one key tile
per pool block: block_k is the pool's block_size, and each tile's block id is a scalar load from the table
in-kernel (one block ahead: `_attend_blocks`), so the pools are read in place (each program sees the whole pool of
its kv head).

Decode splits: the grid's split count is static (`_static_splits`: about two programs per SM, as
`decode_attention`, but at most 16), while the table is as wide as the model's context and most rows are short, so
each program derives its blocks from its row's length at run time (`_split_blocks`: the contiguous kernel's
tuning rule applied to the row's block count). Splits past a row's active count write an empty partial (m = -inf,
l = 0) that the combine ignores. The cap matters at batch 1-2 only: uncapped, a 640-block table at batch 1 and 8
kv heads would launch 33 splits (264 programs) and combine 33 partials although a short row uses 2-6 of them;
16 splits x 8 kv heads is ~one program per SM, and a long row then streams more blocks per split.

Prefill work list: the wrapper lists (sequence, query block) items with a few small jnp ops, at most
cdiv(N, block_q) + S of them (the grid's static size), heaviest first; programs past the list end store nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention import (_LOG2E, _MIN_ROWS, _MASK, _check_kernel_operands, _dot, _next_pow2,
                                      _softmax_init, _softmax_step, attention_reference)
from pallas_kernels.decode_attention import (_MIN_TILES_PER_SPLIT, _SHORT_CACHE_SPLITS, _new_token, _num_splits,
                                             _outputs, _store)
from pallas_kernels.qkv_rope import check_args as check_qkv_args
from pallas_kernels.qkv_rope import qkv_rope_reference


@dataclasses.dataclass(frozen=True)
class Block:
    """Tiling. The key tile is always one pool block. Prefill: block_q query tokens per tile (None: a 64-row tile
    whatever the GQA ratio, 32 rows in f32). Decode: num_splits programs per (row, kv head) at most (None: about
    two programs per SM as `decode_attention`, at most 16); a short row uses fewer at run time."""

    block_q: int | None = None
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3


_Q_ROWS = 64  # default prefill q tile: 64 rows (block_q tokens x G heads), as attention.py's tuned tile
_F32_BLOCK = Block(num_stages=2)  # f32 tiles are twice the bytes: half the q rows (32) and fewer stages


def _cdiv(a, b):
    return (a + b - 1) // b


_MAX_SPLITS = 16  # auto static splits at most: see the module docstring


def _static_splits(block: Block, batch: int, num_kv: int, max_blocks: int, bs: int) -> int:
    """The grid's split count: block.num_splits (at most one per table block), or `decode_attention`'s auto count
    for a cache as wide as the table, capped at _MAX_SPLITS."""
    splits = _num_splits(block, batch, num_kv, max_blocks * bs, bs)
    return splits if block.num_splits is not None else min(splits, _MAX_SPLITS)


def _split_blocks(n, split, splits):
    """Blocks [first, last) of `split` (of `splits` static) for a row of n blocks; first >= last: empty split.

    The contiguous kernel's rule, at run time: up to `splits` splits of >= 4 blocks each, but a short row still
    gets up to 6 one-block splits; whole blocks, the splits in order, every block in exactly one. Works on Python
    ints, numpy and traced int32 alike (the kernels and the tests share it)."""
    most = jnp.maximum(_cdiv(n, _MIN_TILES_PER_SPLIT), jnp.minimum(n, _SHORT_CACHE_SPLITS))
    active = jnp.maximum(jnp.minimum(splits, most), 1)
    per = _cdiv(n, active)  # blocks per split
    first = split * per
    return first, jnp.minimum(first + per, n)


def _attend_blocks(q, block_of, k_ref, v_ref, carry, first, full, end, last_pos, row_pos=None, *, qk_scale):
    """Fold pool blocks j in [first, end) of a sequence into the online-softmax carry; q [rows, D].

    block_of(j) is the sequence's block table entry j (a scalar load); k_ref/v_ref [num_blocks, bs, D]. Blocks
    [first, full) are used whole; blocks [full, end) are masked: keys past `last_pos` are never loaded, and each row
    sees keys at positions <= row_pos [rows] (default: last_pos). Loop bounds are dynamic: blocks past `end` are
    never read.

    Iteration j loads block j + 1's id and carries it, so no tile's address waits on a load of its own iteration:
    Triton's pipeliner then double-buffers the K/V tiles as for a contiguous cache (sm_90 TTGIR: two K and two V
    buffers, tiles loaded two iterations ahead, the shared memory of `decode_attention`'s kernel; in prefill, three
    of each, as attention.py's). With the id read in the iteration that uses it, the pipeliner single-buffered the
    tiles: one tile in flight per program, waited for at the top of every iteration."""
    bs = k_ref.shape[1]
    last_entry = end - 1  # an id read ahead is never past the last block read (so never past the table)

    def body(j, state, *, masked):
        carry, blk = state
        nxt = block_of(jnp.maximum(jnp.minimum(j + 1, last_entry), 0))
        if masked:
            kpos = j * bs + jnp.arange(bs)  # [bs]
            ok = (kpos <= last_pos)[:, None]
            k = plgpu.load(k_ref.at[blk, :, :], mask=ok, other=0)
            v = plgpu.load(v_ref.at[blk, :, :], mask=ok, other=0)
        else:
            k = k_ref[blk, :, :]
            v = v_ref[blk, :, :]
        s = _dot(q, k, trans_b=True) * qk_scale  # [rows, bs] f32
        if masked:
            seen = (kpos <= last_pos)[None, :] if row_pos is None else kpos[None, :] <= row_pos[:, None]
            s = jnp.where(seen, s, _MASK)
        return _softmax_step(carry, s, v), nxt

    state = (carry, block_of(jnp.maximum(jnp.minimum(first, last_entry), 0)))
    state = lax.fori_loop(first, full, functools.partial(body, masked=False), state)
    return lax.fori_loop(full, end, functools.partial(body, masked=True), state)[0]


def _decode_blocks(stop, split, splits, n_keys, bs):
    """(first, full, end) blocks of `split` for a row whose split rule counts n_keys keys, of which the keys at
    positions < stop are read: whole blocks first, then the one crossing stop; never a block wholly past stop."""
    first, last = _split_blocks(_cdiv(n_keys, bs), split, splits)
    end = jnp.minimum(last, _cdiv(stop, bs))
    full = jnp.minimum(jnp.maximum(stop // bs, first), end)
    return first, full, end


def _load_group(q_ref, rows, groups):
    """The q tile [rows, D] of q_ref [G, D]: padding rows load zeros (they are never stored)."""
    heads = pl.ds(0, rows)
    if rows == groups:
        return q_ref[heads, :]
    return plgpu.load(q_ref.at[heads, :], mask=(jnp.arange(rows) < groups)[:, None], other=0)


def _finish(out_refs, acc, m, l, *, rows, groups):
    """`_store`, where a row with no key (padding) normalises to zeros rather than 0/0 with a single split."""
    if len(out_refs) == 1:
        l = jnp.where(l > 0, l, 1.0)
    _store(out_refs, acc, m, l, rows=rows, groups=groups)


def _combine(outs, dtype):
    """The kernel's outputs -> o [B, Hq, D]: as is with one split (the kernel normalised, zeros for a row with no
    key), else `decode_attention`'s combine, where a row whose splits are all empty (padding: m = -inf, l = 0,
    acc = 0 everywhere) gives exact zeros: its max is taken as 0 so every weight is exp2(-inf) = 0, and its
    denominator as 1 (num = 0). The guards sit inside the combine's own expressions, so XLA fuses them into the
    combine's kernels instead of a select over the output."""
    if len(outs) == 1:
        b, kv, g, d = outs[0].shape
        return outs[0].reshape(b, kv * g, d)
    acc, m, l = outs
    b, kv, _, g, d = acc.shape
    m_all = m.max(axis=2, keepdims=True)  # [B, KV, 1, G]
    w = jnp.exp2(m - jnp.where(m_all > -jnp.inf, m_all, 0.0))  # [B, KV, splits, G]; 0 for an empty split
    num = (w[..., None] * acc).sum(axis=2)  # [B, KV, G, D]
    den = (w * l).sum(axis=2)  # [B, KV, G]: >= 1 for a row with a key (its max key's weight), else 0
    return (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(dtype).reshape(b, kv * g, d)


def _decode_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, *out_refs, groups, rows, splits, scale):
    # len_ref []: the row's length; table_ref [M]: its block table; q_ref [G, D]; k_ref/v_ref [num_blocks, bs, D]:
    # this kv head's whole pool, read in place; out_refs as `decode_attention`'s (normalised o with one split).
    bs, head_dim = k_ref.shape[1:]
    length = jnp.clip(len_ref[()], 0, table_ref.shape[0] * bs)
    first, full, end = _decode_blocks(length, pl.program_id(2), splits, length, bs)
    carry = _attend_blocks(_load_group(q_ref, rows, groups), lambda j: table_ref[j], k_ref, v_ref,
                           _softmax_init(rows, head_dim), first, full, end, length - 1,
                           qk_scale=scale * _LOG2E)  # softmax in base 2: exp(x) = exp2(x * log2(e))
    _finish(out_refs, *carry, rows=rows, groups=groups)


def _decode_qkv_kernel(pos_ref, table_ref, inv_freq_ref, q_norm_ref, k_norm_ref, qkv_ref, k_ref, v_ref, *out_refs,
                       groups, rows, splits, scale, eps, num_heads, num_kv_heads, rope_scale):
    # pos_ref []: the token's position (-1: padding row); table_ref [M]; inv_freq_ref [D] (the D/2 frequencies
    # twice); qkv_ref [Hq + 2KV, D]: the row's projection, one head a row; k_ref/v_ref [num_blocks, bs, D]: this kv
    # head's pools, read in place; out_refs: as _decode_kernel's, then the pools again (aliased: written at pos).
    *out_refs, k_out_ref, v_out_ref = out_refs
    bs, head_dim = k_ref.shape[1:]
    capacity = table_ref.shape[0] * bs
    split = pl.program_id(2)
    pos = pos_ref[()]
    live = pos >= 0
    y, k_new, v_new = _new_token(pos, qkv_ref, inv_freq_ref, q_norm_ref, k_norm_ref, groups=groups, rows=rows,
                                 eps=eps, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_scale=rope_scale)

    @pl.when((split == 0) & live & (pos < capacity))
    def _():  # split 0 stores the token's k and v; no program reads that slot (keys stop before pos)
        blk, slot = table_ref[pos // bs], pl.ds(pos % bs, 1)
        k_out_ref[blk, slot, :] = k_new[None, :].astype(k_out_ref.dtype)
        v_out_ref[blk, slot, :] = v_new

    # Split 0 starts its softmax from the new token itself (held in registers), weight exp2(0) = 1.
    qk_scale = scale * _LOG2E
    first = (split == 0) & live
    s_new = jnp.sum(y * k_new[None, :], axis=1) * qk_scale  # [rows]
    carry = (jnp.where(first, jnp.broadcast_to(v_new.astype(jnp.float32), (rows, head_dim)), 0.0),
             jnp.where(first, s_new, -jnp.inf), jnp.zeros((rows,), jnp.float32) + first.astype(jnp.float32))
    stop = jnp.clip(pos, 0, capacity)  # cached keys: positions [0, stop)
    blocks = _decode_blocks(stop, split, splits, jnp.clip(pos + 1, 0, capacity), bs)
    carry = _attend_blocks(y.astype(qkv_ref.dtype), lambda j: table_ref[j], k_ref, v_ref, carry, *blocks,
                           stop - 1, qk_scale=qk_scale)
    _finish(out_refs, *carry, rows=rows, groups=groups)


def _prefill_kernel(seq_ref, row0_ref, count_ref, pos0_ref, table_ref, q_ref, k_ref, v_ref, o_ref, *, groups,
                    groups_pad, block_q, scale):
    # One work item: sequence seq_ref[], its query rows row0 .. row0 + count - 1 of q at positions pos0 + t
    # (count 0: past the list, nothing to do). table_ref [S, M]: every block table; q_ref/o_ref [N, G, D]: this kv
    # head's query heads of every token (rows past count or heads past G masked); k_ref/v_ref [num_blocks, bs, D].
    count = count_ref[()]

    @pl.when(count > 0)
    def _():
        seq, row0, pos0 = seq_ref[()], row0_ref[()], pos0_ref[()]
        bs, head_dim = k_ref.shape[1:]
        rows = block_q * groups_pad
        last = jnp.minimum(pos0 + count - 1, table_ref.shape[1] * bs - 1)  # last key any query here may see
        first_pos = jnp.minimum(pos0, last)
        io_mask = ((jnp.arange(block_q) < count)[:, None, None]
                   & (jnp.arange(groups_pad) < groups)[None, :, None])  # [block_q, Gp, 1]
        tile = (pl.ds(row0, block_q), pl.ds(0, groups_pad), slice(None))
        q = plgpu.load(q_ref.at[tile], mask=io_mask, other=0).reshape(rows, head_dim)  # row r = t * Gp + g
        # Position of each row's query, clamped so padding rows attend like the last real query.
        row_pos = jnp.minimum(pos0 + jnp.arange(rows) // groups_pad, last)  # [rows]
        full = (first_pos + 1) // bs  # blocks wholly at or below every row's position
        end = last // bs + 1
        acc, _, l = _attend_blocks(q, lambda j: table_ref[seq, j], k_ref, v_ref, _softmax_init(rows, head_dim),
                                   0, full, end, last, row_pos, qk_scale=scale * _LOG2E)
        out = (acc / l[:, None]).astype(o_ref.dtype).reshape(block_q, groups_pad, head_dim)
        plgpu.store(o_ref.at[tile], out, mask=io_mask)


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


def check_decode_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables, num_heads,
                     num_kv_heads, head_dim):
    """A fused decode step's arguments: one token per row, `qkv_rope`'s arguments, the pools, the tables."""
    if qkv.ndim != 3 or qkv.shape[1] != 1:
        raise ValueError(f"a decode step takes one token per row, qkv [B, 1, (Hq + 2KV) * D]; got {qkv.shape}")
    check_qkv_args(qkv, q_norm, k_norm, inv_freq, positions, None, None, num_heads, num_kv_heads, head_dim)
    check_pool(k_pool, v_pool, num_heads, head_dim)
    if k_pool.shape[1] != num_kv_heads:
        raise ValueError(f"k_pool has {k_pool.shape[1]} kv heads, num_kv_heads is {num_kv_heads}")
    _check_table(block_tables, qkv.shape[0], positions[:, 0], "positions[:, 0]")


def check_prefill(q, k_pool, v_pool, block_tables, query_start, seq_lens):
    if q.ndim != 3:
        raise ValueError(f"q must be [N, Hq, D], got shape {q.shape}")
    check_pool(k_pool, v_pool, q.shape[1], q.shape[2])
    _check_table(block_tables, seq_lens.shape[0], seq_lens, "seq_lens")
    if query_start.shape != (seq_lens.shape[0] + 1,) or not jnp.issubdtype(query_start.dtype, jnp.integer):
        raise ValueError(f"query_start must be integer [S + 1] = ({seq_lens.shape[0] + 1},), got "
                         f"{query_start.shape} {query_start.dtype}")


def _check_kernel_pool(q, k_pool, block: Block):
    """What the kernels (not the references) also need -> block_size: one dtype, head_dim and block_size powers
    of two >= 16 (a pool block is one key tile), power-of-two warps."""
    _check_kernel_operands(q, k_pool)
    bs = k_pool.shape[2]
    if bs < 16 or bs != _next_pow2(bs):
        raise ValueError(f"the pool's block_size must be a power of two >= 16 (one key tile), got {bs}")
    if block.num_warps < 1 or block.num_warps != _next_pow2(block.num_warps):
        raise ValueError(f"num_warps must be a power of two, got {block}")
    return bs


def _pool_spec(k_pool, head_axis: int):
    """The whole pool of the kv head at grid axis `head_axis`, read (or written) in place by the kernel."""
    num_blocks, _, bs, d = k_pool.shape
    return pl.BlockSpec((num_blocks, None, bs, d), lambda *ids: (0, ids[head_axis], 0, 0))


def paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, *, block: Block | None = None,
                           interpret: bool = False):
    """Attention of one query per row, q [B, Hq, D], over the first seq_lens[b] positions of its blocks -> [B,Hq,D]."""
    check_decode(q, k_pool, v_pool, block_tables, seq_lens)
    block = block or Block()
    bs = _check_kernel_pool(q, k_pool, block)
    batch, num_heads, head_dim = q.shape
    num_kv, max_blocks = k_pool.shape[1], block_tables.shape[1]
    groups = num_heads // num_kv
    rows = max(_MIN_ROWS, _next_pow2(groups))
    splits = _static_splits(block, batch, num_kv, max_blocks, bs)  # a row uses fewer at run time
    kernel = functools.partial(_decode_kernel, groups=groups, rows=rows, splits=splits, scale=head_dim**-0.5)
    pool_spec = _pool_spec(k_pool, 1)
    out_specs, out_shape = _outputs(batch, num_kv, splits, groups, head_dim, q.dtype)
    outs = pl.pallas_call(
        kernel,
        grid=(batch, num_kv, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, max_blocks), lambda b, h, s: (b, 0)),
            pl.BlockSpec((None, None, groups, head_dim), lambda b, h, s: (b, h, 0, 0)),
            pool_spec,
            pool_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="paged_flash_decoding",
    )(seq_lens.astype(jnp.int32), block_tables.astype(jnp.int32), q.reshape(batch, num_kv, groups, head_dim),
      k_pool, v_pool)
    return _combine(outs, q.dtype)


def paged_decode_attention_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables, *, num_heads,
                               num_kv_heads, head_dim, eps, rope_scale=1.0, block: Block | None = None,
                               interpret: bool = False):
    """A decode step from the projection qkv [B, 1, (Hq + 2KV) * D] at positions [B, 1], in ONE kernel: q/k
    RMSNorm + RoPE, k/v written into the pools at the position's slot (in place), and attention over positions
    0..p -> (o [B, Hq, D], k_pool, v_pool). Position -1 marks a padding row: nothing written, zeros out.

    As `decode_attention_qkv`: split 0 of each (row, kv head) stores the new k/v and takes the new token into its
    softmax from registers, so no program reads the slot being written (nor may another row: a row's last block
    is its own). The caller keeps positions < max_blocks * block_size and donates the pools at the jit boundary."""
    check_decode_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables, num_heads,
                     num_kv_heads, head_dim)
    batch = qkv.shape[0]
    heads = num_heads + 2 * num_kv_heads
    qkv3 = qkv.reshape(batch, heads, head_dim)  # [B, Hq + 2KV, D] (free view)
    block = block or Block()
    bs = _check_kernel_pool(qkv3, k_pool, block)
    max_blocks = block_tables.shape[1]
    groups = num_heads // num_kv_heads
    rows = max(_MIN_ROWS, _next_pow2(groups + 1))  # + the k row
    splits = _static_splits(block, batch, num_kv_heads, max_blocks, bs)
    kernel = functools.partial(_decode_qkv_kernel, groups=groups, rows=rows, splits=splits, scale=head_dim**-0.5,
                               eps=float(eps), num_heads=num_heads, num_kv_heads=num_kv_heads,
                               rope_scale=float(rope_scale))
    vec_spec = pl.BlockSpec((head_dim,), lambda b, h, s: (0,))
    pool_spec = _pool_spec(k_pool, 1)
    out_specs, out_shape = _outputs(batch, num_kv_heads, splits, groups, head_dim, qkv.dtype)
    n_out = len(out_shape)
    *outs, k_pool, v_pool = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, max_blocks), lambda b, h, s: (b, 0)),
            vec_spec, vec_spec, vec_spec,
            pl.BlockSpec((None, heads, head_dim), lambda b, h, s: (b, 0, 0)),
            pool_spec,
            pool_spec,
        ],
        out_specs=[*out_specs, pool_spec, pool_spec],
        out_shape=[*out_shape, jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
                   jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype)],
        input_output_aliases={6: n_out, 7: n_out + 1},  # the pools, updated in place
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="paged_flash_decoding_qkv",
    )(positions[:, 0].astype(jnp.int32), block_tables.astype(jnp.int32), jnp.concatenate([inv_freq, inv_freq]),
      q_norm, k_norm, qkv3, k_pool, v_pool)
    return _combine(outs, qkv.dtype), k_pool, v_pool


def _work_list(query_start, seq_lens, block_q: int, num_items: int):
    """Prefill work items, heaviest first, as int32 [num_items] arrays: (sequence, first q row, valid rows,
    position of the first row). Sequence s has cdiv(q_len[s], block_q) items; items past the list have 0 rows."""
    starts = query_start.astype(jnp.int32)
    q_len = jnp.maximum(starts[1:] - starts[:-1], 0)  # [S]
    n_items = _cdiv(q_len, block_q)  # [S]
    ends = jnp.cumsum(n_items)  # [S]: items of sequences 0..s
    i = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right"), q_len.shape[0] - 1).astype(jnp.int32)
    offset = (i - ends[seq] + n_items[seq]) * block_q  # first token of item i within its sequence's chunk
    count = jnp.where(i < ends[-1], jnp.clip(q_len[seq] - offset, 0, block_q), 0)
    row0 = starts[seq] + offset
    pos0 = seq_lens.astype(jnp.int32)[seq] - q_len[seq] + offset
    order = jnp.argsort(jnp.where(count > 0, -(pos0 + count), 1), stable=True)  # most keys first, empty last
    return tuple(x[order].astype(jnp.int32) for x in (seq, row0, count, pos0))


def paged_prefill_attention(q, k_pool, v_pool, block_tables, query_start, seq_lens, *, block: Block | None = None,
                            interpret: bool = False):
    """Causal GQA attention of a ragged flat batch of query chunks q [N, Hq, D] (sequence s at rows
    query_start[s] .. query_start[s+1]-1, positions ending at seq_lens[s] - 1) over its blocks -> [N, Hq, D];
    padding tokens (rows past query_start[-1]) give zeros."""
    check_prefill(q, k_pool, v_pool, block_tables, query_start, seq_lens)
    wide = jnp.dtype(q.dtype).itemsize > 2
    block = block or (_F32_BLOCK if wide else Block())
    _check_kernel_pool(q, k_pool, block)
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k_pool.shape[1]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return jnp.zeros_like(q)
    groups = num_heads // num_kv
    groups_pad = _next_pow2(groups)
    block_q = block.block_q or max(1, (_Q_ROWS // 2 if wide else _Q_ROWS) // groups_pad)
    if block_q != _next_pow2(block_q):
        raise ValueError(f"block_q must be a power of two, got {block}")
    block_q = min(block_q, _next_pow2(num_tokens))
    block_q = max(block_q, -(-_MIN_ROWS // groups_pad))  # the stacked tile needs >= 16 rows
    num_items = pl.cdiv(num_tokens, block_q) + num_seqs  # >= sum over s of cdiv(q_len[s], block_q)
    items = _work_list(query_start, seq_lens, block_q, num_items)

    kernel = functools.partial(_prefill_kernel, groups=groups, groups_pad=groups_pad, block_q=block_q,
                               scale=head_dim**-0.5)
    item_spec = pl.BlockSpec((None,), lambda h, i: (i,))
    qo_spec = pl.BlockSpec((num_tokens, None, groups, head_dim), lambda h, i: (0, h, 0, 0))
    pool_spec = _pool_spec(k_pool, 0)
    out = pl.pallas_call(
        kernel,
        grid=(num_kv, num_items),
        in_specs=[item_spec] * 4 + [pl.BlockSpec(block_tables.shape, lambda h, i: (0, 0)), qo_spec, pool_spec,
                                    pool_spec],
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct((num_tokens, num_kv, groups, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="paged_flash_attention",
    )(*items, block_tables.astype(jnp.int32), q.reshape(num_tokens, num_kv, groups, head_dim), k_pool, v_pool)
    real = jnp.arange(num_tokens) < query_start[-1]  # padding tokens are no work item's: never written
    return jnp.where(real[:, None, None], out.reshape(q.shape), 0).astype(q.dtype)


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


def paged_decode_attention_reference(q, k_pool, v_pool, block_tables, seq_lens):
    """Pure-jnp twin of `paged_decode_attention`: q [B, Hq, D] at position seq_lens[b] - 1 over the row's blocks
    -> [B, Hq, D]. Rows with seq_lens[b] == 0 (padding) give zeros."""
    check_decode(q, k_pool, v_pool, block_tables, seq_lens)
    k = gather_blocks(k_pool, block_tables)
    v = gather_blocks(v_pool, block_tables)
    o = attention_reference(q[:, None], k, v, seq_lens.astype(jnp.int32) - 1)[:, 0]
    return jnp.where((seq_lens > 0)[:, None, None], o, 0).astype(q.dtype)


def paged_decode_attention_qkv_reference(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables,
                                         *, num_heads, num_kv_heads, head_dim, eps, rope_scale=1.0):
    """Pure-jnp twin of `paged_decode_attention_qkv`: qkv [B, 1, (Hq + 2KV) * D] at positions [B, 1] ->
    q/k RMSNorm + RoPE, k/v written to the row's slot of the pools, attention over positions 0..p ->
    (o [B, Hq, D], k_pool, v_pool). A row with position -1 is padding: nothing written, zeros out."""
    check_decode_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables, num_heads,
                     num_kv_heads, head_dim)
    q, k, v = qkv_rope_reference(qkv, q_norm, k_norm, inv_freq, positions, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps,
                                 rope_scale=rope_scale)  # [B, 1, H, D]
    pos = positions[:, 0].astype(jnp.int32)
    slots = slot_of(block_tables, pos, k_pool.shape[2])
    k_pool, v_pool = write_slots(k_pool, v_pool, k[:, 0], v[:, 0], slots)
    o = paged_decode_attention_reference(q[:, 0], k_pool, v_pool, block_tables, jnp.maximum(pos + 1, 0))
    return o, k_pool, v_pool


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
