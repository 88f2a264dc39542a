"""Linear layers for a few rows (decode), fused with the RMSNorm before them and the SwiGLU after (Pallas, Triton).

At decode a Qwen3 layer multiplies a handful of rows by each weight matrix: the time is the weight read and,
at small sizes, the number of kernels. XLA runs RMSNorm, the matrix-vector product and the SiLU-times-up as
separate kernels; this one kernel does

    y = act(norm(x [+ residual]) @ w.T)

with `norm` Qwen3's RMSNorm (optional, HF cast order: residual sum rounded to the activation dtype, f32
statistics, normalised value rounded, then times the weight and rounded) and `act` either nothing or SwiGLU
over a fused [gate; up] weight (silu(gate) * up, each rounded where torch rounds). The product accumulates in
f32 and is rounded once to the activation dtype, as a torch bf16 Linear.

Grid (output tiles of block_n features, row tiles of 16): each program streams its block_n weight rows
through block_k-wide tiles (Triton pipelines the loads), and recomputes the norm of its rows' inputs on the
fly (the inputs are a few KB and stay in cache; the norm statistics take one extra pass over them). Programs
of the first output tile also write the residual sum, which the next layer needs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention import _dot
from pallas_kernels.rms_norm import _FLOAT_DTYPES, rms_norm_reference, round_f32

ROW_TILE = 16  # rows per program: the smallest Triton dot; fewer rows are masked (loaded as zeros, not stored)


@dataclasses.dataclass(frozen=True)
class LinearBlock:
    """Tiling: `block_n` output features and `block_k` input features per step (powers of two >= 16)."""

    block_n: int = 16
    block_k: int = 1024
    num_warps: int = 4
    num_stages: int = 2


def default_block(n_out: int, k: int) -> LinearBlock:
    """A tiling for the H100/H200 (see BENCHMARKS.md).

    Few, large steps: a program's time is a few dependent memory round trips, so an input of up to 1024
    features is one step (no pipeline, so little shared memory per program and several programs per SM),
    longer ones stream in 1024-wide steps two deep. 16 features per program up to 4K outputs, 32 above."""
    block_k = min(1024, max(16, pl.next_power_of_2(k)))
    return LinearBlock(block_n=16 if n_out <= 4096 else 32, block_k=block_k,
                       num_stages=1 if block_k >= k else 2)


def _linear_kernel(*refs, rows, k_dim, n_out, block_k, block_n, eps, has_norm, has_residual, swiglu):
    # refs: x [M, K], [residual [M, K]], [norm weight [K]], w [N, K], y [M, N_out], [sum [M, K]]
    it = iter(refs)
    x_ref = next(it)
    r_ref = next(it) if has_residual else None
    nw_ref = next(it) if has_norm else None
    w_ref, y_ref = next(it), next(it)
    s_ref = next(it) if has_residual else None
    dtype = x_ref.dtype

    n0 = pl.program_id(0) * block_n
    first_tile = pl.program_id(0) == 0  # (read here: the interpreter has no program ids inside loops)
    row0 = pl.program_id(1) * ROW_TILE
    row_ids = pl.ds(row0, ROW_TILE)
    row_ok = row0 + jnp.arange(ROW_TILE) < rows  # [R]
    n_ok = n0 + jnp.arange(block_n) < n_out  # [bn]
    n_tiles = pl.cdiv(k_dim, block_k)

    def load_input(kk):
        """Chunk kk of the (residual-summed) input as f32 holding activation-dtype values, and its masks."""
        cols = pl.ds(kk * block_k, block_k)
        col_ok = kk * block_k + jnp.arange(block_k) < k_dim
        mask = row_ok[:, None] & col_ok[None, :]
        xf = plgpu.load(x_ref.at[row_ids, cols], mask=mask, other=0.0).astype(jnp.float32)  # [R, bk]
        if has_residual:
            rf = plgpu.load(r_ref.at[row_ids, cols], mask=mask, other=0.0).astype(jnp.float32)
            xf = round_f32(rf + xf, dtype)  # residual + x in the activation dtype
        return xf, cols, col_ok, mask

    first = load_input(0) if n_tiles == 1 else None  # one step: load the input once for both passes
    if has_norm:  # pass 1: the rows' mean square, f32
        def sum_squares(kk, acc):
            xf = first[0] if first is not None else load_input(kk)[0]
            return acc + jnp.sum(xf * xf, axis=1)

        ss = sum_squares(0, 0.0) if first is not None else lax.fori_loop(
            0, n_tiles, sum_squares, jnp.zeros((ROW_TILE,), jnp.float32))
        inv_rms = lax.rsqrt(ss / k_dim + eps)[:, None]  # [R, 1]

    def step(kk, accs):
        xf, cols, col_ok, mask = first if first is not None else load_input(kk)
        if has_residual:  # the first output tile's programs hand the residual sum on
            plgpu.store(s_ref.at[row_ids, cols], xf.astype(dtype), mask=mask & first_tile)
        if has_norm:
            nw = plgpu.load(nw_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)  # [bk]
            xf = round_f32(nw[None, :] * round_f32(xf * inv_rms, dtype), dtype)  # HF: cast, then weight * xn
        xb = xf.astype(dtype)
        w_mask = n_ok[:, None] & col_ok[None, :]
        out = []
        for off, acc in zip((0, n_out), accs):  # SwiGLU: gate rows [n0, n0 + bn), up rows n_out further on
            w = plgpu.load(w_ref.at[pl.ds(off + n0, block_n), cols], mask=w_mask, other=0.0)  # [bn, bk]
            out.append(acc + _dot(xb, w, trans_b=True))  # [R, bn] f32
        return tuple(out)

    zeros = jnp.zeros((ROW_TILE, block_n), jnp.float32)
    accs = (zeros, zeros) if swiglu else (zeros,)
    accs = step(0, accs) if first is not None else lax.fori_loop(0, n_tiles, step, accs)
    y = round_f32(accs[0], dtype)  # the Linear's output in the activation dtype
    if swiglu:
        silu = round_f32(y / (1.0 + jnp.exp(-y)), dtype)  # torch: silu in f32 on the bf16 gate, rounded
        y = round_f32(silu * round_f32(accs[1], dtype), dtype)  # silu(gate) * up in the activation dtype
    plgpu.store(y_ref.at[row_ids, pl.ds(n0, block_n)], y.astype(dtype), mask=row_ok[:, None] & n_ok[None, :])


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
        for name in ("block_n", "block_k"):
            v = getattr(block, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"block.{name} must be a power of two >= 16, got {v}")


def linear(x, w, *, norm_weight=None, residual=None, eps=None, swiglu=False, block=None, interpret=False):
    """act(norm(x [+ residual]) @ w.T) over the last axis of x [..., K] with w [N, K] -> [..., N] (N/2 for swiglu).

    norm_weight: RMSNorm the input first (Qwen3RMSNorm); with `residual` the input is residual + x and the
    call returns (y, residual + x). swiglu: w stacks [gate; up] and y = silu(gate) * up. Meant for few rows
    (decode): every row tile of 16 re-reads the weight."""
    _check_args(x, w, norm_weight, residual, eps, swiglu, block)
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    n_out = w.shape[0] // 2 if swiglu else w.shape[0]
    if rows == 0:
        y = jnp.zeros((*lead, n_out), x.dtype)
        return (y, x) if residual is not None else y
    block = block or default_block(n_out, k)
    block_k = min(block.block_k, max(16, pl.next_power_of_2(k)))
    has_norm, has_residual = norm_weight is not None, residual is not None
    kernel = functools.partial(
        _linear_kernel, rows=rows, k_dim=k, n_out=n_out, block_k=block_k, block_n=block.block_n,
        eps=float(eps or 0.0), has_norm=has_norm, has_residual=has_residual, swiglu=swiglu)
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
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n_out, block.block_n), pl.cdiv(rows, ROW_TILE)),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * rows * k * w.shape[0], transcendentals=rows * n_out * swiglu,
            bytes_accessed=(w.size + rows * (k * (1 + 2 * has_residual) + n_out)) * itemsize),
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
