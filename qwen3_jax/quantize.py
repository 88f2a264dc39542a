"""Weight-only quantized linear weights: int8 and int4 made at load time, and Qwen's FP8 and AWQ checkpoints read
as published. A quantized weight is a `QuantizedWeight` pytree in place of the [out, in] array, so `ops.linear`
dispatches on it and the model code does not change.

- int8: symmetric per output channel, w = q * s[n] (q in [-127, 127], s bf16).
- int4: asymmetric in groups of 128 along the input, w = (q - z) * s (q, z in [0, 15], s bf16; AWQ keeps its fp16
  scales), packed two per byte as `pallas_kernels.quant_matmul` reads them.
- fp8: float8_e4m3fn weights with transformers' block scales (`weight_scale_inv`, [ceil(N/bn), ceil(K/bk)]),
  stored expanded over rows ([N, ceil(K/bk)], f32 as the checkpoint's) so fused q/k/v and gate/up concatenate
  along the output axis whatever the block size.

With tied embeddings the lookup keeps the bf16 table and the lm_head matmul reads a quantized copy
(`TiedEmbedding`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import quant_matmul as _qm

QUANTIZE_MODES = ("int8", "int4")
GROUP_SIZE = 128
# AWQ's GEMM packing: nibble i (bits 4i..4i+3) of an int32 holds output channel 8c + AWQ_ORDER[i] (AutoAWQ's
# `pack` order; its `reverse_awq_order` undoes it).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """An nn.Linear weight [out, in] in one of `pallas_kernels.quant_matmul.FORMATS` (layouts in that module)."""

    qweight: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    fmt: str = dataclasses.field(metadata=dict(static=True))
    in_features: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(default=GROUP_SIZE, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.in_features)

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.qweight, self.scales, self.zeros) if a is not None)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The [out, in] weight this stands for (computed in f32, then cast to `dtype`)."""
        return _qm.dequantize_reference(self.qweight, self.scales, self.zeros, fmt=self.fmt,
                                        in_features=self.in_features, group_size=self.group_size).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TiedEmbedding:
    """A tied embedding: `table[ids]` looks up the unquantized table, `ops.linear` multiplies by `head`."""

    table: jax.Array
    head: QuantizedWeight

    def __getitem__(self, index):
        return self.table[index]

    @property
    def shape(self):
        return self.table.shape

    @property
    def dtype(self):
        return self.table.dtype


def _round_up_bf16(s):
    """f32 scales -> bf16 scales no smaller than them, so the quantization grid still covers the range."""
    b = s.astype(jnp.bfloat16)
    bits = jax.lax.bitcast_convert_type(b, jnp.uint16)
    up = jax.lax.bitcast_convert_type(bits + jnp.uint16(1), jnp.bfloat16)  # next bf16 up, for positive finite s
    return jnp.where(b.astype(jnp.float32) < s, up, b)


@jax.jit
def quantize_int8(w) -> QuantizedWeight:
    """Symmetric per-output-channel int8: s = max|w[n]| / 127 (bf16), q = round(w / s); |w - q s| <= s / 2."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=1)
    scales = _round_up_bf16(jnp.where(absmax > 0, absmax / 127.0, 1.0))
    q = jnp.clip(jnp.round(w / scales.astype(jnp.float32)[:, None]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q, scales, None, fmt="int8", in_features=w.shape[1])


@jax.jit
def quantize_int4(w) -> QuantizedWeight:
    """Asymmetric int4 in groups of 128 along the input: s = (max - min) / 15 over the group's range widened to
    include 0 (bf16), z = round(-min / s), q = clip(round(w / s) + z, 0, 15); |w - (q - z) s| <= s / 2."""
    n, k = w.shape
    g = GROUP_SIZE
    groups = -(-k // g)
    w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, groups * g - k))).reshape(n, groups, g)  # [N, G, g]
    lo = jnp.minimum(jnp.min(w, axis=2), 0.0)
    hi = jnp.maximum(jnp.max(w, axis=2), 0.0)
    scales = _round_up_bf16(jnp.where(hi > lo, (hi - lo) / 15.0, 1.0))  # [N, G]
    s = scales.astype(jnp.float32)
    zeros = jnp.clip(jnp.round(-lo / s), 0, 15)
    q = jnp.clip(jnp.round(w / s[:, :, None]) + zeros[:, :, None], 0, 15).astype(jnp.uint8)
    packed = _qm.pack_int4_groups(q.reshape(n, groups * g), g)
    return QuantizedWeight(packed, scales, zeros.astype(jnp.uint8), fmt="int4", in_features=k, group_size=g)


def quantize(w, mode: str) -> QuantizedWeight:
    """An [out, in] weight quantized as `mode` ('int8' or 'int4')."""
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w)
    raise ValueError(f"quantize must be one of {QUANTIZE_MODES} or None, got {mode!r}")


def from_fp8(weight, scale_inv, block: Sequence[int]) -> QuantizedWeight:
    """transformers' fine-grained FP8 (float8_e4m3fn [N, K], `weight_scale_inv` [ceil(N/bn), ceil(K/bk)]):
    w = weight * scale_inv[n // bn, k // bk] in f32."""
    bn, bk = block
    n, k = weight.shape
    scales = jnp.repeat(jnp.asarray(scale_inv, jnp.float32), bn, axis=0)[:n]  # [N, ceil(K/bk)]
    return QuantizedWeight(jnp.asarray(weight), scales, None, fmt="fp8", in_features=k, group_size=bk)


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AWQ GEMM int32 tensors -> (q [K, N], z [K / g, N]) uint8, channels back in order."""
    def unpack(packed):
        rows, cols = packed.shape
        u = packed.view(np.uint32)
        out = np.empty((rows, cols, 8), np.uint8)
        for i, channel in enumerate(AWQ_ORDER):
            out[:, :, channel] = (u >> np.uint32(4 * i)) & np.uint32(0xF)
        return out.reshape(rows, cols * 8)
    return unpack(qweight), unpack(qzeros)


def from_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int) -> QuantizedWeight:
    """AutoAWQ GEMM (`qweight` int32 [K, N/8], `qzeros` int32 [K/g, N/8], `scales` fp16 [K/g, N]):
    w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]."""
    q, z = unpack_awq(qweight, qzeros)
    k, n = q.shape
    packed = _qm.pack_int4_groups(jnp.asarray(np.ascontiguousarray(q.T)), group_size)
    return QuantizedWeight(packed, jnp.asarray(np.ascontiguousarray(scales.T)),
                           jnp.asarray(np.ascontiguousarray(z.T)), fmt="int4", in_features=k, group_size=group_size)


def concat(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Quantized weights of one format stacked along the output axis (fused q/k/v, gate/up)."""
    first = weights[0]
    for w in weights[1:]:
        if (w.fmt, w.in_features, w.group_size) != (first.fmt, first.in_features, first.group_size):
            raise ValueError(f"cannot fuse {first.fmt}/{first.in_features}/{first.group_size} with "
                             f"{w.fmt}/{w.in_features}/{w.group_size}")
    cat = lambda parts: jnp.concatenate(parts, axis=0)  # noqa: E731
    zeros = None if first.zeros is None else cat([w.zeros for w in weights])
    return QuantizedWeight(cat([w.qweight for w in weights]), cat([w.scales for w in weights]), zeros,
                           fmt=first.fmt, in_features=first.in_features, group_size=first.group_size)


def should_convert(module: str, modules_to_not_convert: Sequence[str] | None) -> bool:
    """transformers' rule (`should_convert_module`): a pattern keeps `module` unquantized when it matches from the
    start up to a module boundary, as a regex with that boundary, or as a suffix ('lm_head', 'mlp.down_proj')."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p)
                   for p in (modules_to_not_convert or ()))


def dequantize_params(params, dtype=jnp.float32):
    """The params pytree with every quantized weight replaced by its dequantized array (tied: the bf16 table)."""
    def one(x):
        if isinstance(x, TiedEmbedding):
            return x.table.astype(dtype)
        if isinstance(x, QuantizedWeight):
            return x.dequantize(dtype)
        return x
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, (QuantizedWeight, TiedEmbedding)))


def params_nbytes(params) -> int:
    """Bytes the params take on the device."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
