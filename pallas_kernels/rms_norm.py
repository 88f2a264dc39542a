"""RMSNorm (optionally fused with the residual add) as a Pallas kernel, Triton or Mosaic GPU lowering.

Numerics follow Hugging Face's `Qwen3RMSNorm` exactly: statistics in f32, the normalised value cast to the
activation dtype first, and only then multiplied by the weight (a product in the activation dtype).

Two lowerings of the same op, picked by `RmsNormBlock.backend`:
- "triton": one program per `block_rows` rows, whole rows in registers, masked loads and stores.
- "mosaic": persistent CTAs (one warpgroup each) stream blocks of whole rows through shared memory with TMA
  bulk copies, `num_stages` blocks in flight per CTA, and write results back through double-buffered
  shared memory, so loads, math and stores of consecutive blocks overlap.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_BACKENDS = ("triton", "mosaic")
_WARPGROUP = 128  # threads of one Mosaic GPU CTA; each holds hidden / 128 elements of a row
_SMEM_BYTES = 223 * 1024  # an H100 / H200 CTA's 227 KiB, less room for barriers and Mosaic's reduction scratch
_NUM_SMS = 132  # H100 SXM and H200: the Mosaic grid's default when the device does not say


@dataclasses.dataclass(frozen=True)
class RmsNormBlock:
    """Tiling of one program (a CTA) and the lowering that runs it.

    `backend` "triton": `block_rows` whole rows (a power of two) per program, `num_warps` warps and
    `num_stages` Triton pipeline stages (`num_ctas` is ignored).
    `backend` "mosaic": `block_rows` rows (any count) per TMA copy, `num_stages` such blocks in flight per CTA
    (loads issued ahead of the math), and `num_ctas` persistent CTAs striding over the blocks (0: two per SM).
    `num_warps` is fixed at one warpgroup (4 warps) there and ignored."""

    block_rows: int = 1
    num_warps: int = 8
    num_stages: int = 1
    backend: str = "triton"
    num_ctas: int = 0


def default_block(hidden: int, backend: str = "triton") -> RmsNormBlock:
    """A sensible H100/H200 tiling for rows of `hidden` elements: ~2-8K elements per program (Triton), or
    ~4K elements per TMA copy with three copies in flight per CTA (Mosaic)."""
    if backend == "mosaic":
        return RmsNormBlock(block_rows=max(1, 4096 // hidden), num_stages=3, backend="mosaic")
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
    xf = plgpu.load(x_ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)  # [R, Hp]
    if has_residual:
        rf = plgpu.load(r_ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)
        xf = round_f32(rf + xf, dtype)  # residual + x in the activation dtype
        plgpu.store(s_ref.at[tile], xf.astype(dtype), mask=mask)
    var = jnp.sum(xf * xf, axis=1) / hidden  # [R]; padded columns are 0
    xn = round_f32(xf * lax.rsqrt(var + eps)[:, None], dtype)  # HF: cast to the activation dtype first,
    w = plgpu.load(w_ref.at[pl.ds(0, hidden_pad)], mask=col_ok, other=0.0).astype(jnp.float32)  # [Hp]
    out = round_f32(w[None, :] * xn, dtype)  # then weight * xn (a 16-bit product is exact in f32)
    plgpu.store(o_ref.at[tile], out.astype(dtype), mask=mask)


def _rms_norm_mosaic_kernel(x_gmem, w_gmem, *refs, eps, rows, hidden, block_rows, num_stages, num_ctas,
                            has_residual):
    # refs: [residual], out, [sum] in GMEM, then the scratch: in_smem [S, n, R, H] (S slots of the n input
    # streams: x[, residual]), out_smem [2, n, R, H] (two slots of normed[, sum]), w_smem [H] and the barriers
    # `loaded` (one per input slot) and `w_loaded`. CTA c owns the row blocks c, c + C, c + 2C, ... (C CTAs).
    n = 1 + has_residual
    in_gmem = (x_gmem, *refs[:n - 1])
    out_gmem = refs[n - 1:2 * n - 1]
    in_smem, out_smem, w_smem, loaded, w_loaded = refs[2 * n - 1:]
    dtype = x_gmem.dtype
    cta = lax.axis_index("cta")
    steps = (pl.cdiv(rows, block_rows) - cta + num_ctas - 1) // num_ctas  # blocks of this CTA, >= 1

    def block(k):  # rows of this CTA's k-th block; the last block of the array may run past `rows`
        return pl.ds((cta + k * num_ctas) * block_rows, block_rows)

    def fetch(k):
        # Whole rows are contiguous, so each copy is one TMA bulk copy (not a tiled TMA copy, which would limit
        # a row to 256 elements), clamped at the end of the array: rows past it keep stale values (zeros in the
        # interpreter) and are never stored. The weight's copy below is a bulk copy for the same reason.
        for i, src in enumerate(in_gmem):
            plmgpu.copy_gmem_to_smem(src.at[block(k)], in_smem.at[k % num_stages, i], loaded.at[k % num_stages],
                                     oob_mode=plmgpu.OOBFillMode.UNDEFINED)

    plmgpu.copy_gmem_to_smem(w_gmem, w_smem, w_loaded, oob_mode=plmgpu.OOBFillMode.PROMISE_IN_BOUNDS)
    for k in range(num_stages):  # prologue: fill every input slot
        pl.when(k < steps)(functools.partial(fetch, k))
    plmgpu.barrier_wait(w_loaded)
    w = w_smem[...].astype(jnp.float32)  # [H], kept in registers for every row

    @pl.loop(0, steps)
    def _(k):
        slot, out_slot = k % num_stages, k % 2
        plmgpu.barrier_wait(loaded.at[slot])
        plmgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the stores from out_slot two steps ago have read it
        for r in range(block_rows):  # one row at a time: [H] spread over the warpgroup, a full reduction each
            # Values stay in f32, holding exactly what torch holds in the activation dtype (see `round_f32`).
            xf = in_smem[slot, 0, r].astype(jnp.float32)  # [H]
            if has_residual:
                xf = round_f32(in_smem[slot, 1, r].astype(jnp.float32) + xf, dtype)  # residual + x in dtype
                out_smem[out_slot, 1, r] = xf.astype(dtype)
            var = jnp.sum(xf * xf) / hidden
            xn = round_f32(xf * lax.rsqrt(var + eps), dtype)  # HF: cast to the activation dtype first,
            out_smem[out_slot, 0, r] = round_f32(w * xn, dtype).astype(dtype)  # then weight * xn
        plmgpu.commit_smem()  # stores visible to TMA; also a warpgroup barrier: in_smem[slot] is free again
        for i, dst in enumerate(out_gmem):  # one bulk-copy group per step (the last copy commits it)
            plmgpu.copy_smem_to_gmem(out_smem.at[out_slot, i], dst.at[block(k)], commit_group=i == n - 1)
        pl.when(k + num_stages < steps)(functools.partial(fetch, k + num_stages))

    plmgpu.wait_smem_to_gmem(0)


def _mosaic_smem_bytes(block, hidden, itemsize, has_residual):
    """Shared memory of one Mosaic CTA: `num_stages` input slots, two output slots (each x[, residual] or
    normed[, sum] blocks) and the weight."""
    return (block.num_stages + 2) * (1 + has_residual) * block.block_rows * hidden * itemsize + hidden * itemsize


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
    if block is None:
        return
    if block.backend not in _BACKENDS:
        raise ValueError(f"block.backend must be one of {_BACKENDS}, got {block.backend!r}")
    if block.backend == "triton":
        if block.block_rows < 1 or block.block_rows & (block.block_rows - 1):
            raise ValueError(f"block.block_rows must be a power of two, got {block.block_rows}")
        if block.num_warps < 1 or block.num_warps & (block.num_warps - 1):
            raise ValueError(f"block.num_warps must be a power of two, got {block.num_warps}")
        return
    hidden = x.shape[-1]
    if hidden % _WARPGROUP:
        raise ValueError(
            f"the mosaic backend spreads each row over a warpgroup of {_WARPGROUP} threads: hidden must be a "
            f"multiple of {_WARPGROUP}, got {hidden}"
        )
    if block.block_rows < 1:
        raise ValueError(f"block.block_rows must be >= 1, got {block.block_rows}")
    if block.num_stages < 1:
        raise ValueError(f"block.num_stages (row blocks in flight per CTA) must be >= 1, got {block.num_stages}")
    if block.num_ctas < 0:
        raise ValueError(f"block.num_ctas must be >= 0 (0: two per SM), got {block.num_ctas}")
    smem = _mosaic_smem_bytes(block, hidden, jnp.dtype(x.dtype).itemsize, residual is not None)
    if smem > _SMEM_BYTES:
        raise ValueError(
            f"block {block} needs {smem / 1024:.0f} KiB of shared memory per CTA for rows of {hidden} "
            f"{x.dtype}, over the {_SMEM_BYTES // 1024} KiB an H100/H200 CTA can use: lower block_rows or "
            "num_stages"
        )


def rms_norm(x, weight, *, eps, residual=None, block=None, interpret=False):
    """HF-order RMSNorm over the last axis; with `residual`, returns (norm(residual + x), residual + x).

    `interpret=True` runs the kernel in Pallas' interpreter (on CPU); for the mosaic backend an
    `InterpretGPUParams` may be passed instead (e.g. with `detect_races=True`)."""
    _check_args(x, weight, residual, block)
    *lead, hidden = x.shape
    x2 = x.reshape(-1, hidden)  # [M, H]
    rows = x2.shape[0]
    if rows == 0:
        return (x, x) if residual is not None else x
    block = block or default_block(hidden)
    has_residual = residual is not None
    operands = (x2, weight) + ((residual.reshape(-1, hidden),) if has_residual else ())
    run = _rms_norm_mosaic if block.backend == "mosaic" else _rms_norm_triton
    outs = run(operands, eps=float(eps), rows=rows, hidden=hidden, block=block, interpret=interpret)
    if has_residual:
        normed, summed = outs
        return normed.reshape(x.shape), summed.reshape(x.shape)
    return outs.reshape(*lead, hidden)


def _rms_norm_triton(operands, *, eps, rows, hidden, block, interpret):
    """The Triton pallas_call on [M, H] operands (x, weight[, residual]): normed[, sum]."""
    x2 = operands[0]
    hidden_pad = pl.next_power_of_2(hidden)
    has_residual = len(operands) == 3
    kernel = functools.partial(
        _rms_norm_kernel, eps=eps, rows=rows, hidden=hidden, block_rows=block.block_rows,
        hidden_pad=hidden_pad, has_residual=has_residual,
    )
    out_shape = jax.ShapeDtypeStruct((rows, hidden), x2.dtype)
    itemsize = jnp.dtype(x2.dtype).itemsize
    return pl.pallas_call(
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


def _rms_norm_mosaic(operands, *, eps, rows, hidden, block, interpret):
    """The Mosaic GPU kernel on [M, H] operands (x, weight[, residual]): normed[, sum]."""
    x2 = operands[0]
    dtype = x2.dtype
    has_residual = len(operands) == 3
    n = 1 + has_residual
    block_rows = min(block.block_rows, rows)  # a copy never spans more rows than the array has
    num_blocks = pl.cdiv(rows, block_rows)
    num_ctas = block.num_ctas or 2 * (getattr(jax.devices()[0], "core_count", None) or _NUM_SMS)
    num_ctas = min(num_ctas, num_blocks)  # every CTA gets at least one block
    num_stages = min(block.num_stages, pl.cdiv(num_blocks, num_ctas))  # no slot a CTA could never fill
    if interpret and not isinstance(interpret, plmgpu.InterpretGPUParams):
        interpret = plmgpu.InterpretGPUParams()
    out_shape = jax.ShapeDtypeStruct((rows, hidden), dtype)
    kernel = functools.partial(
        _rms_norm_mosaic_kernel, eps=eps, rows=rows, hidden=hidden, block_rows=block_rows,
        num_stages=num_stages, num_ctas=num_ctas, has_residual=has_residual,
    )
    return plmgpu.kernel(
        kernel,
        out_type=(out_shape,) * n if has_residual else out_shape,
        scratch_types=(
            plmgpu.SMEM((num_stages, n, block_rows, hidden), dtype),  # in_smem
            plmgpu.SMEM((2, n, block_rows, hidden), dtype),  # out_smem
            plmgpu.SMEM((hidden,), dtype),  # w_smem
            plmgpu.Barrier(num_arrivals=n, num_barriers=num_stages),  # loaded: one per input slot
            plmgpu.Barrier(),  # w_loaded
        ),
        grid=(num_ctas,),
        grid_names=("cta",),
        kernel_name="rms_norm_residual" if has_residual else "rms_norm",
        interpret=interpret or None,
    )(*operands)


def rms_norm_reference(x, weight, *, eps, residual=None):
    """Pure-jnp twin of `rms_norm` (Hugging Face `Qwen3RMSNorm`, plus the optional residual add)."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    if residual is not None:
        xf = round_f32(residual.astype(jnp.float32) + xf, dtype)  # residual + x in dtype
    xn = round_f32(xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps), dtype)  # cast first,
    out = round_f32(weight.astype(jnp.float32) * xn, dtype).astype(dtype)  # then weight * xn in dtype
    return (out, xf.astype(dtype)) if residual is not None else out
