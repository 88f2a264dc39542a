"""The Qwen3 forward pass as pure functions of (params, tokens, positions, cache), op by op as HF computes it.

Layers are unrolled (a Python loop under jit), so XLA sees one straight-line program per step. The residual
add of each sub-block is fused into the RMSNorm that opens the next one (`ops.dense` = RMSNorm + linear), which
computes exactly HF's `residual + out` followed by the norm and the projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import ops
from .config import Qwen3Config
from .kv_cache import KVCache
from .ops import Kernels, linear


def _attention(p, qkv, positions, k_cache, v_cache, inv_freq, config: Qwen3Config, kernels: Kernels):
    """q/k norm, RoPE, this step's keys and values into the cache, attention: -> ([B, T, Hq * D], caches)."""
    b, t, _ = qkv.shape
    args = (qkv, p["q_norm"], p["k_norm"], inv_freq, positions, k_cache, v_cache)
    dims = dict(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim, eps=config.rms_norm_eps)
    if t == 1:  # a decode step: one fused kernel when both ops are kernels
        o, k_cache, v_cache = ops.decode_qkv_attention(kernels, *args, **dims)  # o [B, Hq, D]
    else:
        q, k_cache, v_cache = ops.qkv_rope(kernels, *args, **dims)  # q [B, T, Hq, D]
        o = ops.attention(kernels, q, k_cache, v_cache, positions[:, 0])  # [B, T, Hq, D]
    return o.reshape(b, t, config.q_size), k_cache, v_cache


def forward(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, config: Qwen3Config,
            kernels: Kernels = Kernels(), logits_index: jax.Array | None = None, return_hidden: bool = False):
    """Run the model on tokens [B, T] at positions [B, T] (contiguous per row), writing their keys and values.

    Returns (logits, cache), with logits [B, T, V] float32, or [B, V] at `logits_index` [B] when given (prefill
    only needs the last prompt token's). With `return_hidden`, also the residual stream after the embedding and
    after every layer (a list of [B, T, H]).
    """
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise ValueError(f"tokens and positions must both be [batch, seq], got {tokens.shape} and {positions.shape}")
    if tokens.shape[0] != cache.batch:
        raise ValueError(f"tokens have batch {tokens.shape[0]} but the KV cache was made for batch {cache.batch}")
    if not isinstance(positions, jax.core.Tracer):  # an eager call: check here (under jit the caller must)
        cache.check_fits(int(np.max(np.asarray(positions))) + 1)
    dtype = config.jnp_dtype
    inv_freq = jnp.asarray(config.inv_freq())
    eps = config.rms_norm_eps
    positions = positions.astype(jnp.int32)

    h = params["embed_tokens"][tokens].astype(dtype)  # [B,T,H]; Qwen3 never scales embeddings
    hidden = [h] if return_hidden else None
    new_k, new_v = [], []
    out, residual = None, None
    for i, p in enumerate(params["layers"]):
        # Each sub-block's residual add is fused into the RMSNorm that opens the next one (`ops.dense`).
        if residual is None:
            qkv, residual = ops.dense(kernels, h, p["qkv_proj"], norm_weight=p["input_layernorm"], eps=eps), h
        else:
            qkv, residual = ops.dense(kernels, out, p["qkv_proj"], norm_weight=p["input_layernorm"],
                                      residual=residual, eps=eps)
            if return_hidden:
                hidden.append(residual)
        o, k_i, v_i = _attention(p, qkv, positions, cache.k[i], cache.v[i], inv_freq, config, kernels)
        new_k.append(k_i)
        new_v.append(v_i)
        a = ops.dense(kernels, o, p["o_proj"])
        act, residual = ops.dense(kernels, a, p["gate_up_proj"], norm_weight=p["post_attention_layernorm"],
                                  residual=residual, eps=eps, swiglu=True)  # silu(gate) * up
        out = ops.dense(kernels, act, p["down_proj"])
    x, residual = ops.rms_norm(kernels, out, params["norm"], eps, residual=residual)
    if return_hidden:
        hidden.append(residual)

    if logits_index is not None:
        x = jnp.take_along_axis(x, logits_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]  # [B,H]
    lm_head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    logits = linear(x, lm_head).astype(jnp.float32)  # HF: lm_head in the model dtype, then .float()
    cache = KVCache(k=tuple(new_k), v=tuple(new_v))
    return (logits, cache, hidden) if return_hidden else (logits, cache)
