"""Fused QKV projection + per-head q/k RMSNorm + RoPE (Qwen3 attention prologue).

Design: the projection is one XLA matmul (cuBLAS; f32 accumulate, output in the activation dtype, exactly
what a torch bf16 Linear does), followed by ONE Pallas epilogue kernel that reads the projection once and
writes q, k and v: per (token block, kv group) program it RMS-normalises each of the group's q heads and its
k head over head_dim (HF cast order), applies RoPE with cos/sin computed in f32 from positions * inv_freq and
cast to the activation dtype, and copies the v head through. cos/sin are computed once per program and
shared by the group's Hq/KV + 1 rotated heads. `qkv_rope` only composes `_project` and `_qkv_epilogue`, so a
fully fused variant (GEMM + epilogue in one kernel) can slot in behind the same wrapper.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.rms_norm import _FLOAT_DTYPES, rms_norm_reference, round_f32


@dataclasses.dataclass(frozen=True)
class QkvRopeBlock:
    """Epilogue tiling: `block_tokens` tokens (a power of two) per program, Triton warps and stages."""

    block_tokens: int = 32
    num_warps: int = 4
    num_stages: int = 1


def _rope_combine(a, cos, b, sin, dtype):
    """a * cos + b * sin as torch computes it in `dtype`: each product and the sum rounded (all f32 values
    holding `dtype` values; a 16-bit product is exact in f32, and rounding the f32 sum of two 16-bit values
    equals the 16-bit sum since f32 has more than 2p + 2 bits)."""
    return round_f32(round_f32(a * cos, dtype) + round_f32(b * sin, dtype), dtype)


def _qkv_epilogue_kernel(
    pos_ref, inv_freq_ref, q_norm_ref, k_norm_ref, qkv_ref,  # inputs
    q_ref, k_ref, v_ref,  # outputs
    *, tokens, num_heads, num_kv_heads, head_dim, eps, block_tokens,
):
    # Whole-array refs: pos [N]; inv_freq [D/2]; q_norm, k_norm [D]; qkv [N, (Hq + 2KV) * D];
    # q [N, Hq * D]; k, v [N, KV * D]. Program (i, g) owns tokens [i * bt, (i + 1) * bt) of kv group g.
    bt, half = block_tokens, head_dim // 2
    group = num_heads // num_kv_heads
    dtype = qkv_ref.dtype
    g = pl.program_id(1)
    row0 = pl.program_id(0) * bt
    rows = pl.ds(row0, bt)
    row_ok = row0 + jnp.arange(bt) < tokens  # [bt]
    mask = jnp.broadcast_to(row_ok[:, None], (bt, half))  # [bt, D/2]

    # Values stay in f32, holding exactly what torch holds in the activation dtype (see `round_f32`).
    # RoPE tables: emb = concat(freqs, freqs), so both halves of a head share one [bt, D/2] cos / sin.
    pos = plgpu.load(pos_ref.at[rows], mask=row_ok, other=0).astype(jnp.float32)  # [bt]
    freqs = pos[:, None] * inv_freq_ref[...][None, :]  # [bt, D/2] f32
    cos = round_f32(jnp.cos(freqs), dtype)
    sin = round_f32(jnp.sin(freqs), dtype)

    def norm_rope(src_col, w_ref, dst_ref, dst_col):
        # One head as its two halves x1 = x[:D/2], x2 = x[D/2:], so rotate_half(x) = concat(-x2, x1).
        x1 = plgpu.load(qkv_ref.at[rows, pl.ds(src_col, half)], mask=mask, other=0.0).astype(jnp.float32)
        x2 = plgpu.load(qkv_ref.at[rows, pl.ds(src_col + half, half)], mask=mask, other=0.0).astype(jnp.float32)
        var = (jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / head_dim  # [bt]
        inv_rms = lax.rsqrt(var + eps)[:, None]
        w1 = w_ref[pl.ds(0, half)].astype(jnp.float32)[None, :]
        w2 = w_ref[pl.ds(half, half)].astype(jnp.float32)[None, :]
        n1 = round_f32(w1 * round_f32(x1 * inv_rms, dtype), dtype)  # HF order: cast, then weight * xn
        n2 = round_f32(w2 * round_f32(x2 * inv_rms, dtype), dtype)
        o1 = _rope_combine(n1, cos, -n2, sin, dtype)  # x * cos + rotate_half(x) * sin
        o2 = _rope_combine(n2, cos, n1, sin, dtype)
        plgpu.store(dst_ref.at[rows, pl.ds(dst_col, half)], o1.astype(dtype), mask=mask)
        plgpu.store(dst_ref.at[rows, pl.ds(dst_col + half, half)], o2.astype(dtype), mask=mask)

    @pl.loop(0, group)
    def _(j):  # the group's q heads
        head = g * group + j
        norm_rope(head * head_dim, q_norm_ref, q_ref, head * head_dim)

    norm_rope((num_heads + g) * head_dim, k_norm_ref, k_ref, g * head_dim)
    # v passes through untouched.
    v_mask = jnp.broadcast_to(row_ok[:, None], (bt, head_dim))
    v = plgpu.load(qkv_ref.at[rows, pl.ds((num_heads + num_kv_heads + g) * head_dim, head_dim)], mask=v_mask)
    plgpu.store(v_ref.at[rows, pl.ds(g * head_dim, head_dim)], v, mask=v_mask)


def _precision(x):
    """Full f32 matmuls for f32 activations (torch does not use TF32 by default); bf16 needs nothing."""
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def _project(x, w_qkv):
    """x [B, T, H] @ w_qkv.T with f32 accumulation, cast to x.dtype: [B, T, (Hq + 2KV) * D].

    A plain cast, so cuBLAS can write bf16 directly; on GPU the Pallas call boundary materialises the bf16
    array, so no compiler can skip this rounding (the reference uses `round_f32` instead)."""
    y = lax.dot_general(x, w_qkv, (((x.ndim - 1,), (1,)), ((), ())), precision=_precision(x),
                        preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _qkv_epilogue(qkv, q_norm, k_norm, inv_freq, positions, *, num_heads, num_kv_heads, head_dim, eps,
                  block, interpret):
    """qkv [N, (Hq + 2KV) * D], positions [N] -> q [N, Hq * D], k [N, KV * D], v [N, KV * D]."""
    tokens = qkv.shape[0]
    bt = min(block.block_tokens, pl.next_power_of_2(tokens))
    kernel = functools.partial(
        _qkv_epilogue_kernel, tokens=tokens, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, eps=float(eps), block_tokens=bt,
    )
    heads = num_heads + 2 * num_kv_heads
    itemsize = jnp.dtype(qkv.dtype).itemsize
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(tokens, bt), num_kv_heads),
        out_shape=(
            jax.ShapeDtypeStruct((tokens, num_heads * head_dim), qkv.dtype),
            jax.ShapeDtypeStruct((tokens, num_kv_heads * head_dim), qkv.dtype),
            jax.ShapeDtypeStruct((tokens, num_kv_heads * head_dim), qkv.dtype),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=10 * tokens * (heads - num_kv_heads) * head_dim,
            transcendentals=tokens * head_dim * num_kv_heads,
            bytes_accessed=2 * tokens * heads * head_dim * itemsize + 4 * tokens,
        ),
        interpret=interpret,
        name="qkv_norm_rope",
    )(positions, inv_freq, q_norm, k_norm, qkv)


def _check_args(x, w_qkv, q_norm, k_norm, inv_freq, positions, num_heads, num_kv_heads, head_dim, block):
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, H], got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    half = head_dim // 2
    if head_dim < 2 or head_dim % 2 or half & (half - 1):
        raise ValueError(f"head_dim must be 2 * a power of two (Triton tiles), got {head_dim}")
    b, t, hidden = x.shape
    want = ((num_heads + 2 * num_kv_heads) * head_dim, hidden)
    if w_qkv.shape != want or w_qkv.dtype != x.dtype:
        raise ValueError(f"w_qkv must be {want} {x.dtype} (q, k, v rows stacked), got {w_qkv.shape} {w_qkv.dtype}")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w.shape != (head_dim,) or w.dtype != x.dtype:
            raise ValueError(f"{name} must be ({head_dim},) {x.dtype}, got {w.shape} {w.dtype}")
    if inv_freq.shape != (half,) or inv_freq.dtype != jnp.float32:
        raise ValueError(f"inv_freq must be ({half},) float32, got {inv_freq.shape} {inv_freq.dtype}")
    if positions.shape != (b, t) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integer [B, T] = {(b, t)}, got {positions.shape} {positions.dtype}")
    if block is not None:
        for name in ("block_tokens", "num_warps"):
            v = getattr(block, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"block.{name} must be a power of two, got {v}")


def qkv_rope(x, w_qkv, q_norm, k_norm, inv_freq, positions, *, num_heads, num_kv_heads, head_dim, eps,
             block=None, interpret=False):
    """Qwen3 attention prologue: q, k, v = split(x @ w_qkv.T); q, k get per-head RMSNorm then RoPE."""
    _check_args(x, w_qkv, q_norm, k_norm, inv_freq, positions, num_heads, num_kv_heads, head_dim, block)
    b, t, _ = x.shape
    if b * t == 0:
        return qkv_rope_reference(x, w_qkv, q_norm, k_norm, inv_freq, positions, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps)
    qkv = _project(x, w_qkv).reshape(b * t, -1)  # [N, (Hq + 2KV) * D]
    q, k, v = _qkv_epilogue(
        qkv, q_norm, k_norm, inv_freq, positions.reshape(b * t).astype(jnp.int32), num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, eps=eps, block=block or QkvRopeBlock(),
        interpret=interpret,
    )
    return (q.reshape(b, t, num_heads, head_dim), k.reshape(b, t, num_kv_heads, head_dim),
            v.reshape(b, t, num_kv_heads, head_dim))


def rope_reference(x, positions, inv_freq):
    """HF `apply_rotary_pos_emb` for one tensor: x [B, T, heads, D], positions [B, T], inv_freq [D/2] f32."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = round_f32(jnp.cos(emb), x.dtype), round_f32(jnp.sin(emb), x.dtype)
    xf, half = x.astype(jnp.float32), x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return _rope_combine(xf, cos, rotated, sin, x.dtype).astype(x.dtype)  # x * cos + rotated * sin


def qkv_rope_reference(x, w_qkv, q_norm, k_norm, inv_freq, positions, *, num_heads, num_kv_heads, head_dim,
                       eps):
    """Pure-jnp twin of `qkv_rope`, op by op as Hugging Face's Qwen3Attention does it."""
    b, t, _ = x.shape
    qkv = lax.dot_general(x, w_qkv, (((2,), (1,)), ((), ())), precision=_precision(x),
                          preferred_element_type=jnp.float32)
    qkv = round_f32(qkv, x.dtype).astype(x.dtype)  # [B, T, (Hq + 2KV) * D]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[..., :q_size].reshape(b, t, num_heads, head_dim)  # [B, T, Hq, D]
    k = qkv[..., q_size:q_size + kv_size].reshape(b, t, num_kv_heads, head_dim)  # [B, T, KV, D]
    v = qkv[..., q_size + kv_size:].reshape(b, t, num_kv_heads, head_dim)  # [B, T, KV, D]
    q = rope_reference(rms_norm_reference(q, q_norm, eps=eps), positions, inv_freq)
    k = rope_reference(rms_norm_reference(k, k_norm, eps=eps), positions, inv_freq)
    return q, k, v
