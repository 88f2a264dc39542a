"""The Qwen3 forward pass as pure functions of (params, tokens, positions, cache, metadata), op by op as HF
computes it, over a flat batch of tokens from any number of sequences and a paged KV cache.

Layers are unrolled (a Python loop under jit), so XLA sees one straight-line program per step. The residual
add of each sub-block is fused into the RMSNorm that opens the next one (`ops.dense` = RMSNorm + linear), which
computes exactly HF's `residual + out` followed by the norm and the projection.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import ops
from .config import Qwen3Config
from .kv_cache import AttentionMetadata, KVCache
from .ops import Kernels, linear


@dataclasses.dataclass(frozen=True)
class Shard:
    """This device's part of a tensor-parallel model (`parallel.py`, under shard_map): the mesh axis its
    collectives run over, and the full vocabulary its logits are gathered to."""

    axis: str
    vocab_size: int


def _attention(p, qkv, positions, k_pool, v_pool, meta: AttentionMetadata, inv_freq, config: Qwen3Config,
               kernels: Kernels):
    """q/k norm, RoPE, this step's keys and values into the pool, attention: -> ([N, Hq * D], pools)."""
    n = qkv.shape[0]
    norms = (p["q_norm"], p["k_norm"], inv_freq)
    # YaRN's attention factor scales cos and sin before their cast to the activation dtype, where HF applies it,
    # so the bf16 rotated q and k (and the cached k) are HF's own; folding attention_factor**2 into the softmax
    # scale would be the same function in exact arithmetic but round differently in bf16.
    dims = dict(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim, eps=config.rms_norm_eps, rope_scale=config.rope_attention_scaling)
    if meta.decode:  # one token per row: one fused kernel when both ops are kernels
        o, k_pool, v_pool = ops.paged_decode_qkv_attention(kernels, qkv[:, None], *norms, positions[:, None],
                                                           k_pool, v_pool, meta.block_tables, **dims)  # [B, Hq, D]
    else:
        q, k, v = ops.qkv_rope(kernels, qkv[None], *norms, positions[None], **dims)  # [1, N, H, D]
        k_pool, v_pool = ops.write_kv(k_pool, v_pool, k[0], v[0], meta.slot_mapping)
        o = ops.paged_prefill_attention(kernels, q[0], k_pool, v_pool, meta.block_tables, meta.query_start,
                                        meta.seq_lens)  # [N, Hq, D]
    return o.reshape(n, config.q_size), k_pool, v_pool


def forward(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache, meta: AttentionMetadata, *,
            config: Qwen3Config, kernels: Kernels = Kernels(), logits_indices: jax.Array | None = None,
            return_hidden: bool = False, shard: Shard | None = None):
    """Run the model on a flat batch of tokens [N] at positions [N], writing their keys and values into the pool
    where `meta` says, each token attending to its own sequence's cached positions up to its own.

    Returns (logits, cache): logits [N, V] float32, or [S, V] for the rows `logits_indices` [S] when given (a step
    only needs each sequence's last token). With `return_hidden`, also the residual stream after the embedding
    and after every layer (a list of [N, H]).

    With `shard`, this is one device's part of a tensor-parallel model: params, pool and `config` are its local
    shards (its heads, MLP columns and vocabulary rows); the o_proj and down_proj products and the embedding are
    summed over the devices and the logits gathered, so the result is the whole model's on every device.
    """
    if tokens.ndim != 1 or positions.shape != tokens.shape:
        raise ValueError(f"tokens and positions must both be flat [N], got {tokens.shape} and {positions.shape}")
    if meta.decode and meta.block_tables.shape[0] != tokens.shape[0]:
        raise ValueError(f"a decode step has one token per row: {tokens.shape[0]} tokens but "
                         f"{meta.block_tables.shape[0]} block-table rows")
    dtype = config.jnp_dtype
    inv_freq = jnp.asarray(config.inv_freq())
    eps = config.rms_norm_eps
    positions = positions.astype(jnp.int32)

    axis = shard.axis if shard is not None else None
    h = ops.embed(params["embed_tokens"], tokens, axis).astype(dtype)  # [N, H]; Qwen3 never scales embeddings
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
        o, k_i, v_i = _attention(p, qkv, positions, cache.k[i], cache.v[i], meta, inv_freq, config, kernels)
        new_k.append(k_i)
        new_v.append(v_i)
        a = ops.dense(kernels, o, p["o_proj"], reduce_axis=axis)
        act, residual = ops.dense(kernels, a, p["gate_up_proj"], norm_weight=p["post_attention_layernorm"],
                                  residual=residual, eps=eps, swiglu=True)  # silu(gate) * up
        out = ops.dense(kernels, act, p["down_proj"], reduce_axis=axis)
    x, residual = ops.rms_norm(kernels, out, params["norm"], eps, residual=residual)
    if return_hidden:
        hidden.append(residual)

    if logits_indices is not None:
        x = x[logits_indices.astype(jnp.int32)]  # [S, H]
    lm_head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    logits = linear(x, lm_head, kernels).astype(jnp.float32)  # HF: lm_head in the model dtype, then .float()
    if shard is not None:  # [S, V / N] per device -> [S, V] on every device (the padding rows cut off)
        logits = jax.lax.all_gather(logits, axis, axis=1, tiled=True)[:, :shard.vocab_size]
    cache = KVCache(k=tuple(new_k), v=tuple(new_v))
    return (logits, cache, hidden) if return_hidden else (logits, cache)
