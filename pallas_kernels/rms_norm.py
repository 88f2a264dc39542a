"""RMSNorm (optionally fused with the residual add) as a Pallas kernel, Triton lowering.

Numerics follow Hugging Face's `Qwen3RMSNorm` exactly: statistics in f32, the normalised value cast to the
activation dtype first, and only then multiplied by the weight (a product in the activation dtype).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class RmsNormBlock:
    """Tiling of one program: `block_rows` whole rows (a power of two), Triton warps and pipeline stages."""

    block_rows: int = 1
    num_warps: int = 8
    num_stages: int = 1


def default_block(hidden: int) -> RmsNormBlock:
    """A sensible H100/H200 tiling for rows of `hidden` elements: ~2-8K elements per program."""
    hidden_pad = pl.next_power_of_2(hidden)
    block_rows = max(1, 2048 // hidden_pad)
    tile = block_rows * hidden_pad
    num_warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    return RmsNormBlock(block_rows=block_rows, num_warps=num_warps, num_stages=1)


def round_f32(x, dtype):
    """f32 `x` rounded to the nearest `dtype` value (ties to even), kept in f32: torch's `.to(dtype)`.

    Kernels and references keep values in f32 holding exactly what torch holds in bf16 and round with this
    at every point where torch rounds. For bf16 it works on the bits: a plain f32 -> bf16 -> f32 cast pair may
    be dropped by XLA ("excess precision", on by default on CPU and GPU, and in the Pallas interpreter) or
    folded by LLVM, after which NVPTX contracts a rounded product and the next add into one fma."""
    x = x.astype(jnp.float32)
    if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
        return x
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return x.astype(dtype).astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jnp.where(x != x, x, lax.bitcast_convert_type(bits, jnp.float32))  # NaN stays NaN


def weight_normalized(x, inv_rms, weight, dtype):
    """The tail of HF's RMSNorm on f32 values: x * inv_rms rounded to `dtype` first, then times the weight and
    rounded again (a product in the activation dtype; a 16-bit product is exact in f32)."""
    return round_f32(weight * round_f32(x * inv_rms, dtype), dtype)


def _rms_norm_kernel(*refs, eps, rows, hidden, block_rows, hidden_pad, has_residual):
    # refs: x, weight, [residual], out, [sum]. Whole-array refs; this program owns rows
    # [i * block_rows, (i + 1) * block_rows) and every column, masked to the real shape.
    if has_residual:
        x_ref, w_ref, r_ref, o_ref, s_ref = refs
    else:
        x_ref, w_ref, o_ref = refs
    row0 = pl.program_id(0) * block_rows
    row_ok = row0 + jnp.arange(block_rows) < rows  # [R]
    col_ok = jnp.arange(hidden_pad) < hidden  # [Hp]
    mask = row_ok[:, None] & col_ok[None, :]  # [R, Hp]
    tile = (pl.ds(row0, block_rows), pl.ds(0, hidden_pad))

    # Values stay in f32, holding exactly what torch holds in the activation dtype (see `round_f32`).
    dtype = x_ref.dtype
    # The weight is loaded first so its memory round trip overlaps the inputs' (after the row reduction's
    # barrier it would be one more round trip: ~0.5 us of a ~2 us single-row kernel at decode).
    w = plgpu.load(w_ref.at[pl.ds(0, hidden_pad)], mask=col_ok, other=0.0).astype(jnp.float32)  # [Hp]
    xf = plgpu.load(x_ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)  # [R, Hp]
    if has_residual:
        rf = plgpu.load(r_ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)
        xf = round_f32(rf + xf, dtype)  # residual + x in the activation dtype
        plgpu.store(s_ref.at[tile], xf.astype(dtype), mask=mask)
    var = jnp.sum(xf * xf, axis=1) / hidden  # [R]; padded columns are 0
    out = weight_normalized(xf, lax.rsqrt(var + eps)[:, None], w[None, :], dtype)
    plgpu.store(o_ref.at[tile], out.astype(dtype), mask=mask)


def _check_args(x, weight, residual, block):
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last (hidden) axis, got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x {x.shape}, got {weight.shape}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype} (HF multiplies in it)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x {x.shape} {x.dtype}, got {residual.shape} {residual.dtype}"
        )
    if block is not None:
        if block.block_rows < 1 or block.block_rows & (block.block_rows - 1):
            raise ValueError(f"block.block_rows must be a power of two, got {block.block_rows}")
        if block.num_warps < 1 or block.num_warps & (block.num_warps - 1):
            raise ValueError(f"block.num_warps must be a power of two, got {block.num_warps}")


def rms_norm(x, weight, *, eps, residual=None, block=None, interpret=False):
    """HF-order RMSNorm over the last axis; with `residual`, returns (norm(residual + x), residual + x)."""
    _check_args(x, weight, residual, block)
    *lead, hidden = x.shape
    x2 = x.reshape(-1, hidden)  # [M, H]
    rows = x2.shape[0]
    if rows == 0:
        return (x, x) if residual is not None else x
    block = block or default_block(hidden)
    hidden_pad = pl.next_power_of_2(hidden)
    has_residual = residual is not None

    kernel = functools.partial(
        _rms_norm_kernel, eps=float(eps), rows=rows, hidden=hidden, block_rows=block.block_rows,
        hidden_pad=hidden_pad, has_residual=has_residual,
    )
    out_shape = jax.ShapeDtypeStruct((rows, hidden), x.dtype)
    operands = (x2, weight) + ((residual.reshape(-1, hidden),) if has_residual else ())
    itemsize = jnp.dtype(x.dtype).itemsize
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows, block.block_rows),),
        out_shape=(out_shape, out_shape) if has_residual else out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=4 * rows * hidden, transcendentals=rows,
            bytes_accessed=(2 + 2 * has_residual) * rows * hidden * itemsize + hidden * itemsize,
        ),
        interpret=interpret,
        name="rms_norm_residual" if has_residual else "rms_norm",
    )(*operands)
    if has_residual:
        normed, summed = outs
        return normed.reshape(x.shape), summed.reshape(x.shape)
    return outs.reshape(*lead, hidden)


def rms_norm_reference(x, weight, *, eps, residual=None):
    """Pure-jnp twin of `rms_norm` (Hugging Face `Qwen3RMSNorm`, plus the optional residual add)."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    if residual is not None:
        xf = round_f32(residual.astype(jnp.float32) + xf, dtype)  # residual + x in dtype
    inv_rms = lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    out = weight_normalized(xf, inv_rms, weight.astype(jnp.float32), dtype).astype(dtype)
    return (out, xf.astype(dtype)) if residual is not None else out
