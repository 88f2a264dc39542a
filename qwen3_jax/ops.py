"""The one switch between Pallas kernels and their pure-jnp references, per op."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import attention as _attn
from pallas_kernels import decode_attention as _dec
from pallas_kernels import qkv_rope as _qkv
from pallas_kernels import rms_norm as _rms


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which ops run as Pallas kernels (True) or as the jnp reference (False); `interpret` runs kernels on CPU."""

    rms_norm: bool = False
    qkv_rope: bool = False
    attention: bool = False
    decode_attention: bool = False
    interpret: bool = False

    @classmethod
    def reference(cls) -> "Kernels":
        return cls()

    @classmethod
    def pallas(cls, interpret: bool | None = None) -> "Kernels":
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        return cls(True, True, True, True, interpret)

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
        flags = (self.rms_norm, self.qkv_rope, self.attention, self.decode_attention)
        base = "pallas" if all(flags) else "reference" if not any(flags) else "mixed"
        return base + (" (interpret)" if self.interpret and any(flags) else "")


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w.T for an nn.Linear weight w [out, in]: f32 accumulation, result in x's dtype (as torch does)."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                            precision=precision, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def rms_norm(k: Kernels, x, weight, eps, residual=None):
    if k.rms_norm:
        return _rms.rms_norm(x, weight, eps=eps, residual=residual, interpret=k.interpret)
    return _rms.rms_norm_reference(x, weight, eps=eps, residual=residual)


def qkv_rope(k: Kernels, x, w_qkv, q_norm, k_norm, inv_freq, positions, **dims):
    if k.qkv_rope:
        return _qkv.qkv_rope(x, w_qkv, q_norm, k_norm, inv_freq, positions, interpret=k.interpret, **dims)
    return _qkv.qkv_rope_reference(x, w_qkv, q_norm, k_norm, inv_freq, positions, **dims)


def attention(k: Kernels, q, k_cache, v_cache, q_start):
    if k.attention:
        return _attn.attention(q, k_cache, v_cache, q_start, interpret=k.interpret)
    return _attn.attention_reference(q, k_cache, v_cache, q_start)


def decode_attention(k: Kernels, q, k_cache, v_cache, lengths):
    if k.decode_attention:
        return _dec.decode_attention(q, k_cache, v_cache, lengths, interpret=k.interpret)
    return _dec.decode_attention_reference(q, k_cache, v_cache, lengths)
