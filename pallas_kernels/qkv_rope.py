"""Qwen3 attention epilogue: per-head q/k RMSNorm + RoPE on the QKV projection, k/v optionally into the cache.

Design: the projection itself happens upstream (an XLA matmul, which beat a fused Pallas RMSNorm + matmul
kernel at decode: f32 accumulation and the output in the activation dtype, as a torch Linear). This op is ONE
Pallas kernel that reads the projection qkv [B, T, (Hq + 2KV) * D] once. Program (b, i, g) of the grid
(B, cdiv(T, bt), KV) owns tokens [i * bt, (i + 1) * bt) of batch row b and kv group g: it RMS-normalises each of
the group's Hq/KV q heads and its k head over head_dim (HF cast order), applies RoPE with cos/sin computed in f32
from positions * inv_freq and cast to the activation dtype (once per program, shared by the group's rotated
heads), and copies the v head through. Without caches it writes q, k, v arrays. With caches k_cache/v_cache
[B, KV, S, D] it writes q and stores k and v straight into the caches, aliased in place: under jit with the
caches donated nothing is copied and no separate cache-write kernel runs. A program's tokens are contiguous
positions of one row, so its k/v rows land in cache slots positions[b, i * bt] + [0, bt), masked past T and S.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.rms_norm import _FLOAT_DTYPES, rms_norm_reference, round_f32, weight_normalized


@dataclasses.dataclass(frozen=True)
class QkvRopeBlock:
    """Tiling: up to `block_tokens` tokens (a power of two; capped at T's next power of two, so 1 at decode) per
    program, Triton warps and stages."""

    block_tokens: int = 32
    num_warps: int = 4
    num_stages: int = 1


def _rope_tables(freqs, dtype, scale=1.0):
    """cos and sin of the f32 angles, times `scale` (YaRN's attention factor) in f32, rounded to the activation
    dtype (HF computes them in f32, scales, then casts)."""
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return round_f32(cos, dtype), round_f32(sin, dtype)


def _rope_combine(a, cos, b, sin, dtype):
    """a * cos + b * sin as torch computes it in `dtype`: each product and the sum rounded (all f32 values
    holding `dtype` values; a 16-bit product is exact in f32, and rounding the f32 sum of two 16-bit values
    equals the 16-bit sum since f32 has more than 2p + 2 bits)."""
    return round_f32(round_f32(a * cos, dtype) + round_f32(b * sin, dtype), dtype)


def _qkv_rope_kernel(
    pos_ref, inv_freq_ref, q_norm_ref, k_norm_ref, qkv_ref, *refs,
    seq, num_heads, num_kv_heads, head_dim, eps, block_tokens, cache, rope_scale,
):
    # Whole-array refs: pos [B, T]; inv_freq [D/2]; q_norm, k_norm [D]; qkv [B, T, (Hq + 2KV) * D];
    # q [B, T, Hq * D]; then either k, v [B, T, KV * D], or the caches [B, KV, S, D] (their input refs alias
    # the outputs: unused here). Program (b, i, g) owns tokens [i * bt, (i + 1) * bt) of row b, kv group g.
    q_ref, k_ref, v_ref = refs[-3:]
    bt, half = block_tokens, head_dim // 2
    group = num_heads // num_kv_heads
    dtype = qkv_ref.dtype
    b, g = pl.program_id(0), pl.program_id(2)
    t0 = pl.program_id(1) * bt
    rows = pl.ds(t0, bt)
    row_ok = t0 + jnp.arange(bt) < seq  # [bt]

    # Values stay in f32, holding exactly what torch holds in the activation dtype (see `round_f32`).
    # RoPE tables: emb = concat(freqs, freqs), so both halves of a head share one [bt, D/2] cos / sin.
    pos = plgpu.load(pos_ref.at[b, rows], mask=row_ok, other=0).astype(jnp.float32)  # [bt]
    freqs = pos[:, None] * inv_freq_ref[...][None, :]  # [bt, D/2] f32
    cos, sin = _rope_tables(freqs, dtype, rope_scale)

    # Where this program's rows go, as the leading indices of one indexer (Triton takes a single indexer).
    q_lead = (b, rows)  # [bt, Hq * D] of q [B, T, Hq * D]
    if cache:  # k/v rows go to cache slots start .. start + bt - 1 (positions are contiguous per row)
        start = pos_ref[b, t0]
        slot_ok = row_ok & (start + jnp.arange(bt) < k_ref.shape[2])  # never past the cache, whatever the caller
        kv_lead, kv_col = (b, g, pl.ds(start, bt)), 0  # [bt, D] of the caches [B, KV, S, D]
    else:
        slot_ok = row_ok
        kv_lead, kv_col = (b, rows), g * head_dim  # [bt, KV * D] of k, v [B, T, KV * D]
    mask = jnp.broadcast_to(row_ok[:, None], (bt, half))  # [bt, D/2]
    slot_mask = jnp.broadcast_to(slot_ok[:, None], (bt, half))

    def norm_rope(src_col, w_ref, dst_ref, dst_lead, dst_col, dst_mask):
        # One head as its two halves x1 = x[:D/2], x2 = x[D/2:], so rotate_half(x) = concat(-x2, x1).
        x1 = plgpu.load(qkv_ref.at[b, rows, pl.ds(src_col, half)], mask=mask, other=0.0).astype(jnp.float32)
        x2 = plgpu.load(qkv_ref.at[b, rows, pl.ds(src_col + half, half)], mask=mask, other=0.0).astype(jnp.float32)
        var = (jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / head_dim  # [bt]
        inv_rms = lax.rsqrt(var + eps)[:, None]
        w1 = w_ref[pl.ds(0, half)].astype(jnp.float32)[None, :]
        w2 = w_ref[pl.ds(half, half)].astype(jnp.float32)[None, :]
        n1 = weight_normalized(x1, inv_rms, w1, dtype)
        n2 = weight_normalized(x2, inv_rms, w2, dtype)
        o1 = _rope_combine(n1, cos, -n2, sin, dtype)  # x * cos + rotate_half(x) * sin
        o2 = _rope_combine(n2, cos, n1, sin, dtype)
        plgpu.store(dst_ref.at[(*dst_lead, pl.ds(dst_col, half))], o1.astype(dtype), mask=dst_mask)
        plgpu.store(dst_ref.at[(*dst_lead, pl.ds(dst_col + half, half))], o2.astype(dtype), mask=dst_mask)

    @pl.loop(0, group)
    def _(j):  # the group's q heads
        head = g * group + j
        norm_rope(head * head_dim, q_norm_ref, q_ref, q_lead, head * head_dim, mask)

    norm_rope((num_heads + g) * head_dim, k_norm_ref, k_ref, kv_lead, kv_col, slot_mask)
    # v passes through untouched.
    v_src = qkv_ref.at[b, rows, pl.ds((num_heads + num_kv_heads + g) * head_dim, head_dim)]
    v = plgpu.load(v_src, mask=jnp.broadcast_to(row_ok[:, None], (bt, head_dim)))
    plgpu.store(v_ref.at[(*kv_lead, pl.ds(kv_col, head_dim))], v, mask=jnp.broadcast_to(slot_ok[:, None], v.shape))


def check_args(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, num_heads, num_kv_heads, head_dim):
    """Shape and dtype checks shared by `qkv_rope` and its reference."""
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [B, T, (Hq + 2KV) * D], got shape {qkv.shape}")
    dtype = qkv.dtype
    if jnp.dtype(dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"qkv must be bfloat16, float16 or float32, got {dtype}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    b, t, width = qkv.shape
    if width != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv last dim must be (num_heads + 2 * num_kv_heads) * head_dim = "
                         f"{(num_heads + 2 * num_kv_heads) * head_dim} (q, k, v columns), got {width}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w.shape != (head_dim,) or w.dtype != dtype:
            raise ValueError(f"{name} must be ({head_dim},) {dtype}, got {w.shape} {w.dtype}")
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != jnp.float32:
        raise ValueError(f"inv_freq must be ({head_dim // 2},) float32, got {inv_freq.shape} {inv_freq.dtype}")
    if positions.shape != (b, t) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integer [B, T] = {(b, t)}, got {positions.shape} {positions.dtype}")
    if (k_cache is None) != (v_cache is None):
        raise ValueError("k_cache and v_cache must be given together (or neither)")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c is not None and (c.ndim != 4 or c.shape[:2] != (b, num_kv_heads) or c.shape[2] < t
                              or c.shape[3] != head_dim or c.dtype != dtype):
            raise ValueError(f"{name} must be [B, KV, S, D] = ({b}, {num_kv_heads}, S >= T = {t}, {head_dim}) "
                             f"{dtype}, got {c.shape} {c.dtype}")
    if k_cache is not None and v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} must equal k_cache shape {k_cache.shape}")


def _check_kernel_args(head_dim, block):
    """What the kernel (not the reference) also needs: power-of-two tiles."""
    half = head_dim // 2
    if half & (half - 1):
        raise ValueError(f"head_dim must be 2 * a power of two (Triton tiles), got {head_dim}")
    for name in ("block_tokens", "num_warps"):
        v = getattr(block, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"block.{name} must be a power of two, got {v}")


def qkv_rope(qkv, q_norm, k_norm, inv_freq, positions, *, num_heads, num_kv_heads, head_dim, eps,
             rope_scale=1.0, k_cache=None, v_cache=None, block=None, interpret=False):
    """qkv [B, T, (Hq + 2KV) * D] (the projection, q rows then k then v, in the activation dtype) ->
    without caches: (q [B,T,Hq,D], k [B,T,KV,D], v [B,T,KV,D]);
    with caches k_cache/v_cache [B, KV, S, D]: (q, k_cache, v_cache), k and v written in place at
    cache[b, g, positions[b, t], :] (positions are contiguous per row: positions[b, t] = positions[b, 0] + t).

    q and k get per-head RMSNorm (q_norm / k_norm [D]) then RoPE at `positions` [B, T], its cos and sin scaled by
    the static `rope_scale` (HF's `attention_scaling`: YaRN's attention factor, else 1); v is copied. The caller
    must keep positions[b, 0] + T <= S (jit cannot check traced positions): slots past S are not written.
    Donate the caches at the jit boundary so they are updated without a copy."""
    check_args(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, num_heads, num_kv_heads, head_dim)
    block = block or QkvRopeBlock()
    _check_kernel_args(head_dim, block)
    b, t, _ = qkv.shape
    cache = k_cache is not None
    if b * t == 0:
        return qkv_rope_reference(qkv, q_norm, k_norm, inv_freq, positions, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps, rope_scale=rope_scale,
                                  k_cache=k_cache, v_cache=v_cache)
    bt = min(block.block_tokens, pl.next_power_of_2(t))
    kernel = functools.partial(
        _qkv_rope_kernel, seq=t, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        eps=float(eps), block_tokens=bt, cache=cache, rope_scale=float(rope_scale),
    )
    dtype = qkv.dtype
    q_shape = jax.ShapeDtypeStruct((b, t, num_heads * head_dim), dtype)
    if cache:  # inputs 5, 6 (the caches) are outputs 1, 2, updated in place
        out_shape = (q_shape, jax.ShapeDtypeStruct(k_cache.shape, dtype), jax.ShapeDtypeStruct(v_cache.shape, dtype))
        operands, aliases = (k_cache, v_cache), {5: 1, 6: 2}
    else:
        kv_shape = jax.ShapeDtypeStruct((b, t, num_kv_heads * head_dim), dtype)
        out_shape, operands, aliases = (q_shape, kv_shape, kv_shape), (), {}
    heads = num_heads + 2 * num_kv_heads
    tokens = b * t
    q, k, v = pl.pallas_call(
        kernel,
        grid=(b, pl.cdiv(t, bt), num_kv_heads),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=10 * tokens * (heads - num_kv_heads) * head_dim,
            transcendentals=tokens * head_dim * num_kv_heads,
            bytes_accessed=2 * tokens * heads * head_dim * jnp.dtype(dtype).itemsize + 4 * tokens,
        ),
        interpret=interpret,
        name="qkv_norm_rope",
    )(positions.astype(jnp.int32), inv_freq, q_norm, k_norm, qkv, *operands)
    q = q.reshape(b, t, num_heads, head_dim)
    if cache:
        return q, k, v
    return q, k.reshape(b, t, num_kv_heads, head_dim), v.reshape(b, t, num_kv_heads, head_dim)


def rope_reference(x, positions, inv_freq, scale=1.0):
    """HF `apply_rotary_pos_emb` for one tensor: x [B, T, heads, D], positions [B, T], inv_freq [D/2] f32, cos and
    sin scaled by `scale` (HF's `attention_scaling`)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = _rope_tables(emb, x.dtype, scale)
    xf, half = x.astype(jnp.float32), x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return _rope_combine(xf, cos, rotated, sin, x.dtype).astype(x.dtype)  # x * cos + rotated * sin


def _cache_write_reference(k_cache, v_cache, k, v, start):
    """k, v [B, T, KV, D] into the caches [B, KV, S, D] at slots start[b] .. start[b] + T - 1, per row."""
    def row(c, x, s):  # c [KV, S, D], x [T, KV, D]
        return lax.dynamic_update_slice(c, jnp.swapaxes(x, 0, 1), (0, s, 0))

    return jax.vmap(row)(k_cache, k, start), jax.vmap(row)(v_cache, v, start)


def qkv_rope_reference(qkv, q_norm, k_norm, inv_freq, positions, *, num_heads, num_kv_heads, head_dim, eps,
                       rope_scale=1.0, k_cache=None, v_cache=None):
    """Pure-jnp twin of `qkv_rope`, op by op as Hugging Face's Qwen3Attention does it after the projection."""
    check_args(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, num_heads, num_kv_heads, head_dim)
    b, t, _ = qkv.shape
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[..., :q_size].reshape(b, t, num_heads, head_dim)  # [B, T, Hq, D]
    k = qkv[..., q_size:q_size + kv_size].reshape(b, t, num_kv_heads, head_dim)  # [B, T, KV, D]
    v = qkv[..., q_size + kv_size:].reshape(b, t, num_kv_heads, head_dim)  # [B, T, KV, D]
    q = rope_reference(rms_norm_reference(q, q_norm, eps=eps), positions, inv_freq, rope_scale)
    k = rope_reference(rms_norm_reference(k, k_norm, eps=eps), positions, inv_freq, rope_scale)
    if k_cache is None:
        return q, k, v
    if t == 0:  # nothing to write (and no positions[:, 0] to read)
        return q, k_cache, v_cache
    return (q, *_cache_write_reference(k_cache, v_cache, k, v, positions[:, 0].astype(jnp.int32)))
