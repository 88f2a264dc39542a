"""Causal GQA flash attention for prefill and chunked prefill (Pallas, Triton lowering).

Each program owns one (kv head, batch row, query block). The G = Hq // KV query heads that share the kv
head are stacked as rows of the q tile (row r = t * G + g), so every K/V tile loaded from the cache serves
all G heads: K/V are never repeated. The key loop stops at the causal limit of the query block, read
in-kernel from `q_start`: first the tiles that lie wholly below the diagonal (no masks), then the few
tiles that cross it (masked scores, masked K/V loads so cache slots past the last query are never read).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: a masked score never turns a row into NaN
_MIN_ROWS = 16  # Triton dots need every dimension >= 16


@dataclasses.dataclass(frozen=True)
class Block:
    """Tile sizes. block_q counts query tokens per tile; the tile has block_q * G rows (G heads stacked).

    block_q=None picks 64 // G tokens, i.e. a fixed 64-row tile whatever the GQA ratio (fastest on an H100 at
    T=4096, 32/8 heads: 381-412 us against 499-508 us for 128 rows and 8 warps).
    """

    block_q: int | None = None
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


_F32_BLOCK = Block(block_k=32, num_stages=2)  # f32 tiles are twice the bytes: halve them to fit shared memory


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _softmax_init(rows: int, head_dim: int):
    """The online-softmax carry (acc [rows, D], running max m, running sum l), all f32."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _softmax_step(carry, s, v):
    """Fold one key tile into the carry: s [rows, block_k] scores in log2 units (f32), v [block_k, D]."""
    acc, m, l = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)  # [rows, D]; p in the value dtype, as HF
    return acc, m_new, l


def _dot(a, b, *, trans_b=False):
    """a @ b (or a @ b.T) with f32 accumulation; HIGHEST keeps f32 inputs off TF32."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _attention_kernel(q_start_ref, q_ref, k_ref, v_ref, o_ref, *, seq_len, groups, groups_pad, block_q,
                      block_k, num_q_blocks, scale):
    # q_ref [block_q, G, D] (rows past T or heads past G are masked), k_ref/v_ref [S, D], o_ref like q_ref.
    kv_len, head_dim = k_ref.shape
    rows = block_q * groups_pad
    qi = num_q_blocks - 1 - pl.program_id(2)  # heaviest query blocks are launched first
    q_start = q_start_ref[()]
    last = jnp.minimum(q_start + seq_len - 1, kv_len - 1)  # last cache slot any query of this row may see
    first_pos = jnp.minimum(q_start + qi * block_q, last)  # position of the block's first query
    block_last = jnp.minimum(q_start + qi * block_q + block_q - 1, last)

    t_ok = qi * block_q + jnp.arange(block_q) < seq_len  # [block_q]
    g_ok = jnp.arange(groups_pad) < groups  # [Gp]
    io_mask = None
    if seq_len % block_q or groups_pad != groups:
        io_mask = t_ok[:, None, None] & g_ok[None, :, None]  # [block_q, Gp, 1]
    heads = pl.ds(0, groups_pad)
    if io_mask is None:
        q = q_ref[:, heads, :]
    else:
        q = plgpu.load(q_ref.at[:, heads, :], mask=io_mask, other=0)
    q = q.reshape(rows, head_dim)  # [rows, D], row r = t * Gp + g
    # Position of each row's query, clamped so padding rows attend like the last real query.
    row_pos = jnp.minimum(q_start + qi * block_q + jnp.arange(rows) // groups_pad, last)  # [rows]
    qk_scale = scale * _LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))

    def body(j, carry, *, masked):
        keys = pl.ds(j * block_k, block_k)
        if masked:
            kpos = j * block_k + jnp.arange(block_k)  # [block_k]
            kv_ok = (kpos <= last)[:, None]
            k = plgpu.load(k_ref.at[keys, :], mask=kv_ok, other=0)
            v = plgpu.load(v_ref.at[keys, :], mask=kv_ok, other=0)
        else:
            k = k_ref[keys, :]
            v = v_ref[keys, :]
        s = _dot(q, k, trans_b=True) * qk_scale  # [rows, block_k] f32
        if masked:
            s = jnp.where(kpos[None, :] <= row_pos[:, None], s, _MASK)
        return _softmax_step(carry, s, v)

    carry = _softmax_init(rows, head_dim)
    n_full = (first_pos + 1) // block_k  # key tiles wholly at or below every row's position
    n_end = (block_last + block_k) // block_k  # ceil((block_last + 1) / block_k)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)

    out = (acc / l[:, None]).astype(o_ref.dtype).reshape(block_q, groups_pad, head_dim)
    if io_mask is None:
        o_ref[:, heads, :] = out
    else:
        plgpu.store(o_ref.at[:, heads, :], out, mask=io_mask)


def _check_cache(batch, num_heads, head_dim, k_cache, v_cache, index, index_name):
    """Checks shared by both attention wrappers: the cache pair against q's sizes, and the per-row index array."""
    if k_cache.ndim != 4:
        raise ValueError(f"k_cache must be [B, KV, S, D], got shape {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} must equal k_cache shape {k_cache.shape}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")
    kb, num_kv, _, kd = k_cache.shape
    if kb != batch:
        raise ValueError(f"k_cache batch {kb} does not match q batch {batch}")
    if kd != head_dim:
        raise ValueError(f"k_cache head_dim {kd} does not match q head_dim {head_dim}")
    if num_heads % num_kv:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of k_cache kv heads ({num_kv})")
    if index.shape != (batch,) or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"{index_name} must be an integer array of shape ({batch},), "
                         f"got {index.shape} {index.dtype}")


def _check_kernel_operands(q, k_cache):
    """What the kernels (not the references) also need: one dtype, and head_dim a power of two >= 16."""
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must equal k_cache dtype {k_cache.dtype}")
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim != _next_pow2(head_dim):
        raise ValueError(f"q head_dim must be a power of two >= 16, got {head_dim}")


def _check(q, k_cache, v_cache, q_start):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
    batch, _, num_heads, head_dim = q.shape
    _check_cache(batch, num_heads, head_dim, k_cache, v_cache, q_start, "q_start")


def attention(q, k_cache, v_cache, q_start, *, block: Block | None = None, interpret: bool = False):
    """Causal GQA attention of q [B,T,Hq,D] at positions q_start[b]+t over the cache [B,KV,S,D] -> [B,T,Hq,D]."""
    _check(q, k_cache, v_cache, q_start)
    _check_kernel_operands(q, k_cache)
    wide = jnp.dtype(q.dtype).itemsize > 2
    block = block or (_F32_BLOCK if wide else Block())
    batch, seq_len, num_heads, head_dim = q.shape
    _, num_kv, kv_len, _ = k_cache.shape
    groups = num_heads // num_kv
    groups_pad = _next_pow2(groups)
    block_q = block.block_q or max(1, 64 // groups_pad)
    block_k = block.block_k
    if block_q != _next_pow2(block_q) or block_k != _next_pow2(block_k) or block_k < 16:
        raise ValueError(f"block sizes must be powers of two (block_k >= 16), got {block}")
    block_q = min(block_q, _next_pow2(seq_len))
    block_q = max(block_q, -(-_MIN_ROWS // groups_pad))  # the stacked tile needs >= 16 rows
    block_k = max(16, min(block_k, _next_pow2(kv_len)))
    num_q_blocks = pl.cdiv(seq_len, block_q)

    kernel = functools.partial(
        _attention_kernel, seq_len=seq_len, groups=groups, groups_pad=groups_pad, block_q=block_q,
        block_k=block_k, num_q_blocks=num_q_blocks, scale=head_dim**-0.5)
    q5 = q.reshape(batch, seq_len, num_kv, groups, head_dim)  # [B, T, KV, G, D] (free view)
    # Query blocks run in reverse (the kernel flips program_id(2) the same way): the longest go first.
    qo_spec = pl.BlockSpec((None, block_q, None, groups, head_dim),
                           lambda h, b, i: (b, num_q_blocks - 1 - i, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda h, b, i: (b, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_kv, batch, num_q_blocks),
        in_specs=[pl.BlockSpec((None,), lambda h, b, i: (b,)), qo_spec, kv_spec, kv_spec],
        out_specs=qo_spec,
        out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="gqa_flash_attention",
    )(q_start.astype(jnp.int32), q5, k_cache, v_cache)
    return out.reshape(q.shape)


def attention_reference(q, k_cache, v_cache, q_start):
    """Pure-jnp twin of `attention`: f32 scores and softmax, p cast to the value dtype, f32-accumulated p @ v."""
    _check(q, k_cache, v_cache, q_start)
    batch, seq_len, num_heads, head_dim = q.shape
    _, num_kv, kv_len, _ = k_cache.shape
    qg = q.reshape(batch, seq_len, num_kv, num_heads // num_kv, head_dim)  # [B, T, KV, G, D]
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32) * head_dim**-0.5  # [B, KV, G, T, S]
    pos = q_start.astype(jnp.int32)[:, None] + jnp.arange(seq_len, dtype=jnp.int32)  # [B, T]
    kpos = jnp.arange(kv_len, dtype=jnp.int32)
    mask = kpos[None, None, :] <= pos[:, :, None]  # [B, T, S]
    s = jnp.where(mask[:, None, None], s, _MASK)
    p = jax.nn.softmax(s, axis=-1).astype(v_cache.dtype)
    # Slots past the row's last query may hold garbage (even inf/NaN): zero them so 0 * garbage cannot leak.
    v_ok = kpos[None, :] <= pos[:, -1:]  # [B, S]
    v = jnp.where(v_ok[:, None, :, None], v_cache, 0)
    # (G, T) merged into one row axis: XLA:CPU has no bf16 x bf16 -> f32 dot with two free lhs dims.
    p = p.reshape(batch, num_kv, -1, kv_len)  # [B, KV, G*T, S]
    o = jnp.einsum("bkrs,bksd->bkrd", p, v, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)  # [B, KV, G*T, D]
    o = o.reshape(batch, num_kv, -1, seq_len, head_dim).transpose(0, 3, 1, 2, 4)  # [B, T, KV, G, D]
    return o.astype(q.dtype).reshape(q.shape)
