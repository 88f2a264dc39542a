"""Prefill / chunked-prefill attention: Pallas kernel vs its jnp reference, and the reference vs float64 numpy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import INTERPRET
from pallas_kernels.attention import Block, attention, attention_reference

reference = jax.jit(attention_reference)  # one compile per shape instead of op-by-op dispatch
GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)


def make_inputs(seed, B, T, Hq, KV, D, S, q_start, dtype):
    """Random q and caches (numpy-built: no per-shape XLA compiles); every cache slot past a row's last query
    holds NaN / inf / huge garbage that must never reach the output."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hq, D), np.float32)
    k = rng.standard_normal((B, KV, S, D), np.float32)
    v = rng.standard_normal((B, KV, S, D), np.float32)
    q_start = np.asarray(q_start, np.int32)
    beyond = np.arange(S)[None, None, :, None] > (q_start + T - 1)[:, None, None, None]  # [B, 1, S, 1]
    junk = np.resize(GARBAGE, S)[None, None, :, None]
    k = np.where(beyond, junk, k)
    v = np.where(beyond, junk[:, :, ::-1], v)
    return (*(jnp.asarray(x.astype(dtype)) for x in (q, k, v)), jnp.asarray(q_start))


def naive_attention_f64(q, k, v, q_start):
    """Float64 numpy attention, K/V repeated per query head (query head h uses kv head h // G)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, Hq, D = q.shape
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # [B, Hq, S, D]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            n = int(q_start[b]) + t + 1  # keys 0..pos
            s = np.einsum("hd,hsd->hs", q[b, t], k[b, :, :n]) * D**-0.5
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, t] = np.einsum("hs,hsd->hd", p, v[b, :, :n])
    return out


def assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "kernel output has NaN/inf (an unwritten tile or split, or leaked garbage)"
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    else:
        np.testing.assert_allclose(out, ref, atol=3e-2, rtol=3e-2)
        assert np.linalg.norm(out - ref) <= 1e-2 * np.linalg.norm(ref)


# (B, T, Hq, KV, D, S, q_start, dtype, block): T odd / not a multiple of block_q, prefill from 0 and chunked
# prefill (q_start > 0) with rows at different q_start, GQA ratios 1/2/4/5/8, head_dim 64/128, f32/bf16.
CASES = [
    (2, 33, 8, 2, 64, 64, [0, 19], jnp.float32, None),  # G=4, 2 query blocks, second partial
    (2, 7, 4, 4, 128, 64, [0, 50], jnp.float32, None),  # G=1 (MHA), D=128
    (3, 1, 4, 2, 64, 64, [0, 17, 63], jnp.float32, None),  # G=2, one token, last slot of the cache
    (2, 33, 8, 1, 64, 96, [5, 40], jnp.float32, Block(block_q=2, block_k=16)),  # G=8, many tiles
    (2, 21, 4, 2, 64, 80, [0, 37], jnp.float32, Block(block_q=16, block_k=16)),  # unaligned diagonals
    (2, 7, 10, 2, 64, 32, [0, 9], jnp.float32, None),  # G=5: heads padded to 8 rows per token
    (2, 33, 8, 2, 128, 64, [0, 21], jnp.bfloat16, None),
    (2, 7, 4, 2, 64, 48, [3, 41], jnp.bfloat16, Block(block_q=8, block_k=32)),
]


@pytest.mark.parametrize("B,T,Hq,KV,D,S,q_start,dtype,block", CASES)
def test_attention_matches_reference(B, T, Hq, KV, D, S, q_start, dtype, block):
    q, k, v, qs = make_inputs(B * T + Hq, B, T, Hq, KV, D, S, q_start, dtype)
    out = attention(q, k, v, qs, block=block, interpret=INTERPRET)
    ref = reference(q, k, v, qs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("Hq,KV,dtype,tol", [(4, 4, jnp.float32, 1e-5), (8, 2, jnp.float32, 1e-5),
                                             (8, 1, jnp.bfloat16, 2e-2), (4, 2, jnp.bfloat16, 2e-2)])
def test_reference_matches_float64_numpy(Hq, KV, dtype, tol):
    B, T, D, S = 2, 5, 16, 24
    q, k, v, qs = make_inputs(Hq * 7 + KV, B, T, Hq, KV, D, S, [0, 11], dtype)
    ref = np.asarray(reference(q, k, v, qs), np.float64)
    want = naive_attention_f64(q, k, v, np.asarray(qs))
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ref, want, atol=tol, rtol=tol)


def test_reference_chunked_prefill_equals_full_prefill():
    q, k, v, _ = make_inputs(3, 1, 12, 4, 2, 16, 12, [0], jnp.float32)
    full = reference(q, k, v, jnp.array([0], jnp.int32))
    parts = [reference(q[:, a:b], k, v, jnp.array([a], jnp.int32)) for a, b in [(0, 5), (5, 6), (6, 12)]]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,qs_shape,match",
    [
        ((1, 4, 6, 16), (1, 4, 32, 16), (1, 4, 32, 16), (1,), "multiple"),  # Hq not a multiple of KV
        ((1, 4, 4, 16), (1, 2, 32, 32), (1, 2, 32, 32), (1,), "head_dim"),  # D mismatch
        ((1, 4, 4, 16), (1, 2, 32, 16), (1, 2, 16, 16), (1,), "v_cache"),  # K/V shape mismatch
        ((2, 4, 4, 16), (1, 2, 32, 16), (1, 2, 32, 16), (2,), "batch"),  # batch mismatch
        ((1, 4, 4, 16), (1, 2, 32, 16), (1, 2, 32, 16), (2,), "q_start"),  # q_start shape
        ((4, 4, 16), (1, 2, 32, 16), (1, 2, 32, 16), (1,), "q must be"),  # q rank
        ((1, 4, 4, 24), (1, 2, 32, 24), (1, 2, 32, 24), (1,), "power of two"),  # kernel needs pow2 D
    ],
)
def test_bad_shapes_raise(q_shape, k_shape, v_shape, qs_shape, match):
    q, k, v = jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, jnp.zeros(qs_shape, jnp.int32), interpret=True)


def test_bad_dtype_raises():
    q, k = jnp.ones((1, 4, 4, 16), jnp.bfloat16), jnp.ones((1, 2, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k, k, jnp.zeros((1,), jnp.int32), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,KV", [(32, 8), (16, 8), (40, 8)])
def test_attention_gpu_prefill(Hq, KV):
    q, k, v, qs = make_inputs(0, 1, 4096, Hq, KV, 128, 4096, [0], jnp.bfloat16)
    out = jax.jit(attention)(q, k, v, qs)
    assert_close(out, reference(q, k, v, qs), jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_attention_gpu_chunked_prefill(dtype):
    q, k, v, qs = make_inputs(1, 3, 509, 32, 8, 128, 4096, [0, 1000, 3587], dtype)
    out = jax.jit(attention)(q, k, v, qs)
    assert_close(out, reference(q, k, v, qs), dtype)
