"""The one switch between Pallas kernels and their pure-jnp references, per op."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import paged_attention as _paged
from pallas_kernels import qkv_rope as _qkv
from pallas_kernels import quant_matmul as _qm
from pallas_kernels import rms_norm as _rms

from .quantize import QuantizedWeight, TiedEmbedding

# Rows (tokens), per weight format, up to which a quantized linear runs the Pallas dequantize-matmul kernel; above,
# XLA multiplies by the converted weight. From an H200 sweep (BENCHMARKS.md): XLA's int8 dot is the faster at 64
# rows, its int4 / fp8 dequantize-then-dot several times slower.
QUANT_KERNEL_MAX_ROWS = {"int8": 16, "int4": 64, "fp8": 64}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which ops run as Pallas kernels (True) or as the jnp reference (False); `interpret` runs kernels on CPU."""

    rms_norm: bool = False
    qkv_rope: bool = False
    attention: bool = False
    decode_attention: bool = False
    quant_matmul: bool = False
    interpret: bool = False

    @classmethod
    def reference(cls) -> "Kernels":
        return cls()

    @classmethod
    def pallas(cls, interpret: bool | None = None) -> "Kernels":
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        return cls(rms_norm=True, qkv_rope=True, attention=True, decode_attention=True, quant_matmul=True,
                   interpret=interpret)

    @classmethod
    def resolve(cls, choice: "str | Kernels | None") -> "Kernels":
        """'auto' (kernels on a GPU, references elsewhere), 'pallas', 'reference', or a Kernels instance."""
        if isinstance(choice, Kernels):
            return choice
        choice = choice or "auto"
        if choice == "auto":
            return cls.pallas(False) if jax.default_backend() == "gpu" else cls.reference()
        if choice == "pallas":
            return cls.pallas()
        if choice == "reference":
            return cls.reference()
        raise ValueError(f"kernels must be 'auto', 'pallas' or 'reference', got {choice!r}")

    @property
    def name(self) -> str:
        flags = (self.rms_norm, self.qkv_rope, self.attention, self.decode_attention, self.quant_matmul)
        base = "pallas" if all(flags) else "reference" if not any(flags) else "mixed"
        return base + (" (interpret)" if self.interpret and any(flags) else "")


def linear(x: jax.Array, w, k: Kernels | None = None, reduce_axis: str | None = None) -> jax.Array:
    """x @ w.T for an nn.Linear weight w [out, in]: f32 accumulation, result in x's dtype (as torch does).
    A quantized w (`QuantizedWeight`, or a `TiedEmbedding`'s head) runs `quantized_linear`. With `reduce_axis`
    (tensor parallel, w split by input) the devices' f32 partial products are summed before the cast, so the
    result rounds once, as the unsplit product does."""
    if isinstance(w, TiedEmbedding):
        w = w.head
    if isinstance(w, QuantizedWeight):
        if reduce_axis is not None:
            raise ValueError("quantized weights are not split over devices")
        return quantized_linear(x, w, k)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
    if reduce_axis is not None:
        y = jax.lax.psum(y, reduce_axis)
    return y.astype(x.dtype)


def embed(table, tokens: jax.Array, axis: str | None = None) -> jax.Array:
    """table[tokens]. With `axis` (tensor parallel) each device holds a contiguous slice of the vocabulary's rows:
    it looks up the tokens in its slice, zeros for the others, and the devices' rows are summed (exact: one of
    them is the row, the rest are zeros)."""
    if axis is None:
        return table[tokens]
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(axis) * rows
    mine = (local >= 0) & (local < rows)
    found = jnp.where(mine[:, None], table[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(found, axis)


def quantized_linear(x: jax.Array, w: QuantizedWeight, k: Kernels | None = None) -> jax.Array:
    """x @ dequantize(w).T: the Pallas dequantize-matmul kernel for up to QUANT_KERNEL_MAX_ROWS[w.fmt] rows when
    `k.quant_matmul`, else XLA's dot over the weight converted to x's dtype."""
    use_kernel = k is not None and k.quant_matmul
    rows = x.size // x.shape[-1]
    args = dict(fmt=w.fmt, in_features=w.in_features, group_size=w.group_size)
    if use_kernel and rows <= QUANT_KERNEL_MAX_ROWS[w.fmt]:
        return _qm.quant_matmul(x, w.qweight, w.scales, w.zeros, **args, interpret=k.interpret)
    if w.fmt == "int8":  # exact int8 -> activation-dtype products, the per-channel scale after the sum
        precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
        y = jax.lax.dot_general(x, w.qweight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                                precision=precision, preferred_element_type=jnp.float32)
        return (y * w.scales.astype(jnp.float32)).astype(x.dtype)
    return linear(x, w.dequantize(x.dtype))


def rms_norm(k: Kernels, x, weight, eps, residual=None):
    if k.rms_norm:
        return _rms.rms_norm(x, weight, eps=eps, residual=residual, interpret=k.interpret)
    return _rms.rms_norm_reference(x, weight, eps=eps, residual=residual)


def dense(k: Kernels, x, w, *, norm_weight=None, residual=None, eps=None, swiglu=False, reduce_axis=None):
    """A linear layer act(norm(x [+ residual]) @ w.T): the RMSNorm op (optional; with `residual` the call returns
    (y, residual + x)), an XLA matmul, and SwiGLU (silu(gate) * up over w = [gate; up]) as torch rounds it.

    A bf16 matmul stays with XLA: a fused Pallas RMSNorm + matrix-vector kernel (Triton lowering) measured slower
    than XLA's own matrix-vector kernels at decode (BENCHMARKS.md). A quantized w goes through `quantized_linear`.
    `reduce_axis`: sum the product over the tensor-parallel devices (`linear`)."""
    summed = None
    if norm_weight is not None:
        x = rms_norm(k, x, norm_weight, eps, residual=residual)
        if residual is not None:
            x, summed = x
    y = linear(x, w, k, reduce_axis)
    if swiglu:
        gate, up = jnp.split(y, 2, axis=-1)
        y = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up  # torch's bf16 silu computes in f32
    return (y, summed) if summed is not None else y


def qkv_rope(k: Kernels, qkv, q_norm, k_norm, inv_freq, positions, **dims):
    """q [B, T, Hq, D], k and v [B, T, KV, D] from the projection: q/k RMSNorm and RoPE at `positions`."""
    fn = functools.partial(_qkv.qkv_rope, interpret=k.interpret) if k.qkv_rope else _qkv.qkv_rope_reference
    return fn(qkv, q_norm, k_norm, inv_freq, positions, **dims)


def write_kv(k_pool, v_pool, k, v, slots):
    """Keys and values [N, KV, D] into their pool slots [N] (an XLA scatter, in place on donated pools)."""
    return _paged.write_slots(k_pool, v_pool, k, v, slots)


def paged_decode_qkv_attention(k: Kernels, qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool, block_tables,
                               **dims):
    """A decode step, qkv [B, 1, (Hq + 2KV) * D] at positions [B, 1]: `qkv_rope`, k/v into the pool, then paged
    decode attention -> (o [B, Hq, D], k_pool, v_pool). With both ops as kernels this is one fused Pallas kernel."""
    if k.qkv_rope and k.decode_attention:
        return _paged.paged_decode_attention_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_pool, v_pool,
                                                 block_tables, **dims, interpret=k.interpret)
    q, key, value = qkv_rope(k, qkv, q_norm, k_norm, inv_freq, positions, **dims)
    pos = positions[:, 0].astype(jnp.int32)
    k_pool, v_pool = write_kv(k_pool, v_pool, key[:, 0], value[:, 0],
                              _paged.slot_of(block_tables, pos, k_pool.shape[2]))
    seq_lens = jnp.maximum(pos + 1, 0)
    if k.decode_attention:
        o = _paged.paged_decode_attention(q[:, 0], k_pool, v_pool, block_tables, seq_lens, interpret=k.interpret)
    else:
        o = _paged.paged_decode_attention_reference(q[:, 0], k_pool, v_pool, block_tables, seq_lens)
    return o, k_pool, v_pool


def paged_prefill_attention(k: Kernels, q, k_pool, v_pool, block_tables, query_start, seq_lens):
    """Causal attention of a flat batch of query chunks q [N, Hq, D] over their sequences' blocks -> [N, Hq, D]."""
    if k.attention:
        return _paged.paged_prefill_attention(q, k_pool, v_pool, block_tables, query_start, seq_lens,
                                              interpret=k.interpret)
    return _paged.paged_prefill_attention_reference(q, k_pool, v_pool, block_tables, query_start, seq_lens)
