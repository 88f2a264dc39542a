"""Weight-only quantized matmul y = x @ dequantize(w).T as a Pallas kernel (Triton lowering), for decode-sized
batches: each weight tile is read once and dequantized in registers, never written back to memory.

Three weight formats, all in nn.Linear's [out, in] = [N, K] orientation:
- "int8": `qweight` int8 [N, K], `scales` [N] (one per output channel): w = q * s[n].
- "int4": `qweight` uint8 [N, Kp / 2] with Kp = K rounded up to `group_size`, two 4-bit values per byte; `scales`
  and `zeros` [N, G] (G = Kp / group_size, zeros uint8 in [0, 15]): w = (q - z[n, g]) * s[n, g]. Packing within a
  group: byte j holds k = j in its low nibble and k = j + group_size / 2 in its high nibble, so a kernel unpacks a
  group into its two halves with a mask and a shift (no interleave) and multiplies each by its half of x.
- "fp8": `qweight` float8_e4m3fn [N, K], `scales` [N, G] (G = ceil(K / group_size)): w = q * s[n, k // group].

Products are exact and accumulate in f32 (the integer or fp8 values are exact in the activation dtype); the
scale multiplies each group's partial sum. `quant_matmul_reference` computes the same function from the f32
dequantized weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FORMATS = ("int8", "int4", "fp8")
_QDTYPES = {"int8": jnp.dtype(jnp.int8), "int4": jnp.dtype(jnp.uint8), "fp8": jnp.dtype(jnp.float8_e4m3fn)}
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# default_block's knobs, fitted to an H200 sweep's best tilings (.bench/quant_sweep.py; BENCHMARKS.md).
_TARGET_PROGRAMS = {"int8": 384, "int4": 1024, "fp8": 384}  # K is split in two while the programs stay within this
_BLOCK_K = {"int8": 256, "int4": 256, "fp8": 128}  # input channels per step at decode rows (int4 / fp8: whole groups)


@dataclasses.dataclass(frozen=True)
class QuantMatmulBlock:
    """Tiling of one program: `block_m` rows of x (>= 16, Triton's smallest dot), `block_n` output channels,
    `block_k` input channels per step (int4 / fp8: a multiple of group_size, each group in the step scaled
    separately), the K range split over `num_splits` programs (partial sums added after), Triton warps and
    pipeline stages."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_block(m: int, n: int, k: int, fmt: str, group_size: int = 128) -> QuantMatmulBlock:
    """A tiling for x [m, k] against an [n, k] weight: 64 output channels a program (32 for a narrow weight),
    _BLOCK_K input channels a step (int4 / fp8 above 16 rows: one group), K split in two while there are at most
    _TARGET_PROGRAMS programs."""
    block_m = min(64, max(16, pl.next_power_of_2(m)))
    block_n = 32 if n <= (1024 if block_m == 16 else 4096) else 64
    if fmt == "int8":
        block_k = _BLOCK_K[fmt]
    else:
        block_k = group_size * max(1, _BLOCK_K[fmt] // group_size) if block_m == 16 else group_size
    steps = pl.cdiv(k, block_k)
    tiles = pl.cdiv(n, block_n) * pl.cdiv(m, block_m)
    num_splits = 1
    while tiles * num_splits * 2 <= _TARGET_PROGRAMS[fmt] and num_splits * 2 <= steps:
        num_splits *= 2
    return QuantMatmulBlock(block_m=block_m, block_n=block_n, block_k=block_k, num_splits=num_splits,
                            num_warps=4, num_stages=3)


def _dot_t(a, b):
    """a [M, K] @ b [N, K].T with f32 accumulation; HIGHEST keeps f32 inputs off TF32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _quant_matmul_kernel(*refs, fmt, m, n, k, group_size, block_m, block_n, block_k, steps_per_split):
    # refs: x [M, K], qweight, scales, [zeros], out ([M, N], or [splits, M, N] f32 partial sums). Whole-array refs;
    # this program owns rows [i_m * block_m, +block_m), channels [i_n * block_n, +block_n) and K steps
    # [split * steps_per_split, +steps_per_split) of block_k each, masked to the real shape. int4 / fp8: a step
    # covers block_k / group_size groups, each its own dot times its own [bn] scales, added in group order (the
    # same sums as one group a step).
    if fmt == "int4":
        x_ref, q_ref, s_ref, z_ref, o_ref = refs
    else:
        x_ref, q_ref, s_ref, o_ref = refs
    i_n, i_m, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row0, col0 = i_m * block_m, i_n * block_n
    row_ok = row0 + jnp.arange(block_m) < m  # [bm]
    col_ok = col0 + jnp.arange(block_n) < n  # [bn]
    rows, cols = pl.ds(row0, block_m), pl.ds(col0, block_n)
    dtype = x_ref.dtype
    total_steps = pl.cdiv(k, block_k)
    first = split * steps_per_split
    last = jnp.minimum(first + steps_per_split, total_steps)
    if fmt != "int8":
        n_groups, groups_per_step = s_ref.shape[-1], block_k // group_size  # G, and the groups in a step

    def load_x(k0, width):
        k_ok = k0 + jnp.arange(width) < k
        return plgpu.load(x_ref.at[rows, pl.ds(k0, width)], mask=row_ok[:, None] & k_ok[None, :], other=0)

    def group_part(g):
        """x @ the unscaled group g of the weight's [bn] channels, [bm, bn] f32; zero past the last group."""
        k0 = g * group_size
        if fmt == "fp8":
            k_ok = col_ok[:, None] & (k0 + jnp.arange(group_size) < k)[None, :]
            q = plgpu.load(q_ref.at[cols, pl.ds(k0, group_size)], mask=k_ok)  # Triton has no fp8 `other`
            return _dot_t(load_x(k0, group_size), jnp.where(k_ok, q.astype(dtype), 0))
        # int4: the group's two halves in the low and high nibbles of group_size / 2 bytes
        half = group_size // 2
        ok = col_ok & (g < n_groups)  # [bn]
        packed = plgpu.load(q_ref.at[cols, pl.ds(g * half, half)], mask=ok[:, None], other=0).astype(jnp.int32)
        z = plgpu.load(z_ref.at[cols, g], mask=ok, other=0).astype(jnp.int32)[:, None]  # [bn, 1]
        lo = ((packed & 0xF) - z).astype(dtype)  # [bn, half]: integers in [-15, 15], exact in any float
        hi = ((packed >> 4) - z).astype(dtype)
        return _dot_t(load_x(k0, half), lo) + _dot_t(load_x(k0 + half, half), hi)

    def body(step, acc):
        if fmt == "int8":
            k0 = step * block_k
            k_ok = k0 + jnp.arange(block_k) < k
            q = plgpu.load(q_ref.at[cols, pl.ds(k0, block_k)], mask=col_ok[:, None] & k_ok[None, :], other=0)
            return acc + _dot_t(load_x(k0, block_k), q.astype(dtype))  # [bm, bn]
        for j in range(groups_per_step):  # unrolled: one dot and one scale per group
            g = step * groups_per_step + j
            s = plgpu.load(s_ref.at[cols, g], mask=col_ok & (g < n_groups), other=0).astype(jnp.float32)  # [bn]
            acc = acc + group_part(g) * s[None, :]
        return acc

    acc = lax.fori_loop(first, last, body, jnp.zeros((block_m, block_n), jnp.float32))
    if fmt == "int8":
        acc = acc * plgpu.load(s_ref.at[cols], mask=col_ok, other=0).astype(jnp.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if len(o_ref.shape) == 3:
        plgpu.store(o_ref.at[split, rows, cols], acc, mask=mask)
    else:
        plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mask)


def _check_args(x, qweight, scales, zeros, fmt, in_features, group_size, block):
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must end in in_features={in_features}, got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if jnp.dtype(qweight.dtype) != _QDTYPES[fmt]:
        raise ValueError(f"{fmt} qweight must be {_QDTYPES[fmt]}, got {qweight.dtype}")
    n = qweight.shape[0]
    if fmt == "int8":
        want_q, want_s = (n, in_features), (n,)
    else:
        if group_size < 32 or group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {group_size}")
        groups = pl.cdiv(in_features, group_size)
        want_q = (n, groups * group_size // 2) if fmt == "int4" else (n, in_features)
        want_s = (n, groups)
    if qweight.shape != want_q:
        raise ValueError(f"{fmt} qweight for in_features={in_features} must have shape {want_q}, got {qweight.shape}")
    if scales.shape != want_s:
        raise ValueError(f"{fmt} scales must have shape {want_s}, got {scales.shape}")
    if fmt == "int4":
        if zeros is None or zeros.shape != want_s or jnp.dtype(zeros.dtype) != jnp.dtype(jnp.uint8):
            raise ValueError(f"int4 zeros must be uint8 of shape {want_s}, got "
                             f"{None if zeros is None else (zeros.shape, zeros.dtype)}")
    elif zeros is not None:
        raise ValueError(f"{fmt} has no zero points")
    if block is not None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(block, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"block.{name} must be a power of two >= 16, got {v}")
        if fmt != "int8" and block.block_k % group_size:
            raise ValueError(f"{fmt} steps whole groups: block.block_k must be a multiple of group_size "
                             f"{group_size}, got {block.block_k}")
        if block.num_splits < 1:
            raise ValueError(f"block.num_splits must be >= 1, got {block.num_splits}")


def quant_matmul(x, qweight, scales, zeros=None, *, fmt: str, in_features: int, group_size: int = 128,
                 block: QuantMatmulBlock | None = None, interpret: bool = False):
    """x [..., K] @ dequantize(w).T -> [..., N] in x's dtype, w in `fmt` (see the module docstring)."""
    _check_args(x, qweight, scales, zeros, fmt, in_features, group_size, block)
    *lead, k = x.shape
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)  # [M, K]
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*lead, n), x.dtype)
    block = block or default_block(m, n, k, fmt, group_size)
    total_steps = pl.cdiv(k, block.block_k)
    num_splits = min(block.num_splits, total_steps)
    steps_per_split = pl.cdiv(total_steps, num_splits)
    num_splits = pl.cdiv(total_steps, steps_per_split)  # no empty splits
    kernel = functools.partial(_quant_matmul_kernel, fmt=fmt, m=m, n=n, k=k, group_size=group_size,
                               block_m=block.block_m, block_n=block.block_n, block_k=block.block_k,
                               steps_per_split=steps_per_split)
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((num_splits, m, n), jnp.float32)
    operands = (x2, qweight, scales) + ((zeros,) if fmt == "int4" else ())
    weight_bytes = sum(a.size * a.dtype.itemsize for a in operands[1:])
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block.block_n), pl.cdiv(m, block.block_m), num_splits),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        cost_estimate=pl.CostEstimate(flops=2 * m * n * k, transcendentals=0,
                                      bytes_accessed=weight_bytes + (m * k + m * n) * x.dtype.itemsize),
        interpret=interpret,
        name=f"{fmt}_matmul",
    )(*operands)
    if num_splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out.reshape(*lead, n)


def pack_int4_groups(q, group_size: int = 128):
    """uint8 values in [0, 15] [N, Kp] (Kp a multiple of `group_size`) -> [N, Kp / 2] packed as the kernel reads."""
    n, kp = q.shape
    g = q.reshape(n, kp // group_size, 2, group_size // 2).astype(jnp.uint8)  # [N, G, 2, g/2]: the group's halves
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack_int4_groups(packed, group_size: int = 128):
    """The inverse of `pack_int4_groups`: [N, Kp / 2] uint8 -> values [N, Kp] uint8 in [0, 15]."""
    n, half_kp = packed.shape
    g = packed.reshape(n, half_kp * 2 // group_size, 1, group_size // 2)
    return jnp.concatenate([g & 0xF, g >> 4], axis=2).reshape(n, half_kp * 2)


def dequantize_reference(qweight, scales, zeros=None, *, fmt: str, in_features: int, group_size: int = 128):
    """The f32 weight [N, K] that a quantized weight stands for."""
    s = scales.astype(jnp.float32)
    if fmt == "int8":
        return qweight.astype(jnp.float32) * s[:, None]
    if fmt == "int4":
        q = unpack_int4_groups(qweight, group_size).astype(jnp.float32)  # [N, Kp]
        z = jnp.repeat(zeros.astype(jnp.float32), group_size, axis=1)
        return ((q - z) * jnp.repeat(s, group_size, axis=1))[:, :in_features]
    if fmt == "fp8":
        return qweight.astype(jnp.float32) * jnp.repeat(s, group_size, axis=1)[:, :in_features]
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def quant_matmul_reference(x, qweight, scales, zeros=None, *, fmt: str, in_features: int, group_size: int = 128):
    """Pure-jnp twin of `quant_matmul`: x @ (the f32 dequantized weight).T in f32, cast to x's dtype."""
    w = dequantize_reference(qweight, scales, zeros, fmt=fmt, in_features=in_features, group_size=group_size)
    y = lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
