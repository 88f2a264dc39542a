"""Linear layers for a few rows (decode), fused with the RMSNorm before them and the SwiGLU after (Pallas, Triton).

At batch-1 decode a Qwen3 layer multiplies one row by each weight matrix: the time is the weight read and, at
small model sizes, the number of kernels (each costs ~1-2 us of latency however little it moves). XLA runs the
RMSNorm, the matrix-vector product and the SiLU-times-up as separate kernels; this one kernel does

    y = act(norm(x [+ residual]) @ w.T)

with `norm` Qwen3's RMSNorm (optional, HF cast order: residual sum rounded to the activation dtype, f32
statistics, normalised value rounded, then times the weight and rounded) and `act` either nothing or SwiGLU
over a fused [gate; up] weight (silu(gate) * up, each rounded where torch rounds). The product accumulates in
f32 and is rounded once to the activation dtype, as a torch bf16 Linear.

A matrix-vector product, not a matrix product: each program owns `block_n` output features and reads their
weight rows whole, in `block_k`-wide chunks unrolled in straight-line code, so every load of the program is in
flight at once (no loop, no pipeline, no shared memory); with one-warp-wide chunks each warp sums its own rows. The weight loads are issued first; the program then
sums its row's input (+ residual), takes the norm statistics and multiplies on the CUDA cores (products of
16-bit values are exact in f32). Programs of the first output tile also write the residual sum, which the
next layer needs. Rows are unrolled too (at most `MAX_ROW_TILE` per program); every row tile re-reads the
weight, so this is for decode steps of a few rows only (`ops.dense` picks it there).
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

MAX_ROW_TILE = 8  # rows per program, unrolled: more rows cost registers and code, not weight reads


@dataclasses.dataclass(frozen=True)
class LinearBlock:
    """Tiling: `block_n` output features per program and `block_k`-wide input chunks (powers of two)."""

    block_n: int = 8
    block_k: int = 256
    num_warps: int = 4


def default_block(n_out: int, k: int, swiglu: bool = False, itemsize: int = 2) -> LinearBlock:
    """A tiling for the H100/H200 (see BENCHMARKS.md).

    Chunks one warp wide (32 lanes x 16 bytes: 256 bf16 values), so Triton lays a [block_n, block_k] tile out
    with each warp on whole weight rows and the sum over K stays inside the warp (shuffles, no shared memory or
    barrier) wherever there is a warp per row or more. block_n: as many rows per program as leave at least 512
    programs (about four per SM), at most 16, and at most 16K weight values per program; warps: one per row,
    up to 4, and enough that a lane holds at most 128 weight values (64 registers)."""
    block_k = min(32 * 16 // itemsize, pl.next_power_of_2(k))
    span = pl.cdiv(k, block_k) * block_k * (2 if swiglu else 1)  # weight values per output feature
    block_n = 1
    while block_n < 16 and n_out // (2 * block_n) >= 512 and 2 * block_n * span <= 16384:
        block_n *= 2
    lanes_needed = pl.next_power_of_2(pl.cdiv(block_n * span, 32 * 128))
    return LinearBlock(block_n=block_n, block_k=block_k, num_warps=min(4, max(block_n, lanes_needed)))


def _linear_kernel(*refs, rows, row_tile, k_dim, n_out, block_k, block_n, eps, has_norm, has_residual, swiglu):
    # refs: x [M, K], [residual [M, K]], [norm weight [K]], w [N, K], y [M, N_out], [sum [M, K]]
    it = iter(refs)
    x_ref = next(it)
    r_ref = next(it) if has_residual else None
    nw_ref = next(it) if has_norm else None
    w_ref, y_ref = next(it), next(it)
    s_ref = next(it) if has_residual else None
    dtype = x_ref.dtype

    n0 = pl.program_id(0) * block_n
    first_tile = pl.program_id(0) == 0
    row0 = pl.program_id(1) * row_tile
    n_ok = n0 + jnp.arange(block_n) < n_out  # [bn]
    # Chunk starts are traced (tied to a program id): jax rejects a static slice that runs past the array's end,
    # and a ragged last chunk (K = 2560, 9728 in Qwen3-4B) is exactly that, masked.
    base = pl.program_id(1) * 0
    chunks = [(pl.ds(pl.multiple_of(base + c * block_k, block_k), block_k), c * block_k + jnp.arange(block_k) < k_dim)
              for c in range(pl.cdiv(k_dim, block_k))]

    # The weight first, so its memory round trip is not queued behind the inputs' and the norm's.
    # SwiGLU: gate rows [n0, n0 + bn), up rows n_out further on.
    w_tiles = [[plgpu.load(w_ref.at[pl.ds(off + n0, block_n), cols], mask=n_ok[:, None] & ok[None, :], other=0.0)
                for cols, ok in chunks] for off in ((0, n_out) if swiglu else (0,))]  # [bn, bk] each
    if has_norm:
        nws = [plgpu.load(nw_ref.at[cols], mask=ok, other=0.0).astype(jnp.float32)[None, :] for cols, ok in chunks]

    for r in range(row_tile):
        row = pl.ds(row0 + r, 1)
        row_ok = row0 + r + jnp.arange(1) < rows  # [1]
        xs = []  # the row's input chunks [1, bk], f32 holding activation-dtype values
        for cols, ok in chunks:
            mask = row_ok[:, None] & ok[None, :]
            xf = plgpu.load(x_ref.at[row, cols], mask=mask, other=0.0).astype(jnp.float32)
            if has_residual:
                rf = plgpu.load(r_ref.at[row, cols], mask=mask, other=0.0).astype(jnp.float32)
                xf = round_f32(rf + xf, dtype)  # residual + x in the activation dtype
                plgpu.store(s_ref.at[row, cols], xf.astype(dtype), mask=mask & first_tile)
            xs.append(xf)
        if has_norm:
            var = functools.reduce(jnp.add, [jnp.sum(xf * xf, axis=1) for xf in xs]) / k_dim  # [1]; pads are 0
            inv_rms = lax.rsqrt(var + eps)[:, None]
            xs = [round_f32(nw * round_f32(xf * inv_rms, dtype), dtype)  # HF: cast, then weight * xn
                  for nw, xf in zip(nws, xs)]
        # Products of 16-bit values are exact in f32: sum them per lane over the chunks, then across lanes.
        accs = [jnp.sum(functools.reduce(jnp.add, [w.astype(jnp.float32) * xf for w, xf in zip(tiles, xs)]), axis=1)
                for tiles in w_tiles]  # [bn] f32 each
        y = round_f32(accs[0], dtype)  # the Linear's output in the activation dtype
        if swiglu:
            silu = round_f32(y / (1.0 + jnp.exp(-y)), dtype)  # torch: silu in f32 on the bf16 gate, rounded
            y = round_f32(silu * round_f32(accs[1], dtype), dtype)  # silu(gate) * up in the activation dtype
        plgpu.store(y_ref.at[row, pl.ds(n0, block_n)], y[None, :].astype(dtype),
                    mask=row_ok[:, None] & n_ok[None, :])


def _check_args(x, w, norm_weight, residual, eps, swiglu, block):
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last (input feature) axis, got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    k = x.shape[-1]
    if w.ndim != 2 or w.shape[1] != k or w.dtype != x.dtype:
        raise ValueError(f"w must be [out, {k}] {x.dtype} (an nn.Linear weight), got {w.shape} {w.dtype}")
    if swiglu and w.shape[0] % 2:
        raise ValueError(f"swiglu needs w = [gate; up] with an even number of rows, got {w.shape[0]}")
    if norm_weight is not None:
        if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
            raise ValueError(f"norm_weight must be ({k},) {x.dtype}, got {norm_weight.shape} {norm_weight.dtype}")
        if eps is None or eps <= 0:
            raise ValueError(f"a fused RMSNorm needs eps > 0, got {eps}")
    if residual is not None:
        if norm_weight is None:
            raise ValueError("residual is only fused with an RMSNorm: pass norm_weight too")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x {x.shape} {x.dtype}, got {residual.shape} {residual.dtype}")
    if block is not None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(block, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"block.{name} must be a power of two, got {v}")


def linear(x, w, *, norm_weight=None, residual=None, eps=None, swiglu=False, block=None, interpret=False):
    """act(norm(x [+ residual]) @ w.T) over the last axis of x [..., K] with w [N, K] -> [..., N] (N/2 for swiglu).

    norm_weight: RMSNorm the input first (Qwen3RMSNorm); with `residual` the input is residual + x and the
    call returns (y, residual + x). swiglu: w stacks [gate; up] and y = silu(gate) * up. Meant for few rows
    (decode): every tile of `MAX_ROW_TILE` rows re-reads the weight."""
    _check_args(x, w, norm_weight, residual, eps, swiglu, block)
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    n_out = w.shape[0] // 2 if swiglu else w.shape[0]
    if rows == 0:
        y = jnp.zeros((*lead, n_out), x.dtype)
        return (y, x) if residual is not None else y
    block = block or default_block(n_out, k, swiglu, jnp.dtype(x.dtype).itemsize)
    block_k = min(block.block_k, pl.next_power_of_2(k))
    row_tile = min(rows, MAX_ROW_TILE)
    has_norm, has_residual = norm_weight is not None, residual is not None
    kernel = functools.partial(
        _linear_kernel, rows=rows, row_tile=row_tile, k_dim=k, n_out=n_out, block_k=block_k,
        block_n=block.block_n, eps=float(eps or 0.0), has_norm=has_norm, has_residual=has_residual, swiglu=swiglu)
    operands = [x2]
    if has_residual:
        operands.append(residual.reshape(-1, k))
    if has_norm:
        operands.append(norm_weight)
    operands.append(w)
    out_shape = [jax.ShapeDtypeStruct((rows, n_out), x.dtype)]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct((rows, k), x.dtype))
    itemsize = jnp.dtype(x.dtype).itemsize
    row_tiles = pl.cdiv(rows, row_tile)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n_out, block.block_n), row_tiles),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=1),
        cost_estimate=pl.CostEstimate(
            flops=2 * rows * k * w.shape[0], transcendentals=rows * n_out * swiglu,
            bytes_accessed=(w.size * row_tiles + rows * (k * (1 + 2 * has_residual) + n_out)) * itemsize),
        interpret=interpret,
        name="linear_" + "_".join(["norm"] * has_norm + ["residual"] * has_residual + ["swiglu"] * swiglu)
        if has_norm or swiglu else "linear",
    )(*operands)
    y = outs[0].reshape(*lead, n_out)
    return (y, outs[1].reshape(x.shape)) if has_residual else y


def linear_reference(x, w, *, norm_weight=None, residual=None, eps=None, swiglu=False):
    """Pure-jnp twin of `linear`: HF's RMSNorm, nn.Linear (f32 accumulation, one rounding) and SwiGLU."""
    _check_args(x, w, norm_weight, residual, eps, swiglu, None)
    summed = None
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps=eps, residual=residual)
        if residual is not None:
            x, summed = x
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    y = round_f32(y, x.dtype)
    if swiglu:
        gate, up = jnp.split(y, 2, axis=-1)
        y = round_f32(round_f32(jax.nn.silu(gate), x.dtype) * up, x.dtype)  # torch's bf16 silu computes in f32
    y = y.astype(x.dtype)
    return (y, summed) if summed is not None else y
