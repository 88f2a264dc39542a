"""Flash-decoding attention: Pallas kernel vs its jnp reference, and the reference vs float64 numpy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import INTERPRET
from test_attention import assert_close  # same tolerances as prefill attention
from pallas_kernels.decode_attention import Block, decode_attention, decode_attention_reference

reference = jax.jit(decode_attention_reference)  # one compile per shape instead of op-by-op dispatch
GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)


def make_inputs(seed, B, Hq, KV, D, S, lengths, dtype):
    """Random q and caches (numpy-built); every slot at or past lengths[b] holds NaN / inf / huge garbage."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, D), np.float32)
    k = rng.standard_normal((B, KV, S, D), np.float32)
    v = rng.standard_normal((B, KV, S, D), np.float32)
    lengths = np.asarray(lengths, np.int32)
    beyond = np.arange(S)[None, None, :, None] >= lengths[:, None, None, None]  # [B, 1, S, 1]
    junk = np.resize(GARBAGE, S)[None, None, :, None]
    k = np.where(beyond, junk, k)
    v = np.where(beyond, junk[:, :, ::-1], v)
    return (*(jnp.asarray(x.astype(dtype)) for x in (q, k, v)), jnp.asarray(lengths))


def naive_decode_f64(q, k, v, lengths):
    """Float64 numpy decode attention, K/V repeated per query head (query head h uses kv head h // G)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # [B, Hq, S, D]
    out = np.zeros_like(q)
    for b in range(B):
        n = int(lengths[b])
        s = np.einsum("hd,hsd->hs", q[b], k[b, :, :n]) * D**-0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b] = np.einsum("hs,hsd->hd", p, v[b, :, :n])
    return out


# (B, Hq, KV, D, S, lengths, dtype, block): lengths 1 and S, rows of different lengths, splits left empty,
# S not a multiple of block_k, GQA ratios 1/2/4/5/8/16 (G < 16 pads the q tile), head_dim 64/128, f32/bf16.
CASES = [
    (3, 8, 2, 64, 128, [1, 77, 128], jnp.float32, None),  # G=4, default block (one split at this S)
    (3, 8, 1, 64, 128, [1, 77, 128], jnp.float32, Block(block_k=16, num_splits=3)),  # G=8, 3 splits
    (2, 4, 4, 128, 64, [64, 3], jnp.float32, Block(block_k=16, num_splits=4)),  # G=1, empty splits
    (2, 10, 2, 64, 100, [100, 37], jnp.float32, Block(block_k=16, num_splits=3)),  # G=5, S % block_k != 0
    (2, 16, 1, 64, 48, [48, 1], jnp.float32, Block(block_k=32, num_splits=2)),  # G=16: no padding rows
    (3, 8, 2, 128, 128, [1, 128, 50], jnp.bfloat16, Block(block_k=32, num_splits=2)),
    (2, 4, 2, 64, 64, [64, 20], jnp.bfloat16, None),  # G=2
    (2, 16, 1, 64, 48, [48, 1], jnp.bfloat16, Block(block_k=16, num_splits=1)),  # one split, G=16, bf16
]


@pytest.mark.parametrize("B,Hq,KV,D,S,lengths,dtype,block", CASES)
def test_decode_attention_matches_reference(B, Hq, KV, D, S, lengths, dtype, block):
    q, k, v, lens = make_inputs(B * S + Hq, B, Hq, KV, D, S, lengths, dtype)
    out = decode_attention(q, k, v, lens, block=block, interpret=INTERPRET)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference(q, k, v, lens), dtype)


@pytest.mark.parametrize("Hq,KV,dtype,tol", [(4, 4, jnp.float32, 1e-5), (8, 2, jnp.float32, 1e-5),
                                             (8, 1, jnp.bfloat16, 2e-2), (4, 2, jnp.bfloat16, 2e-2)])
def test_reference_matches_float64_numpy(Hq, KV, dtype, tol):
    q, k, v, lens = make_inputs(Hq * 5 + KV, 3, Hq, KV, 16, 24, [1, 13, 24], dtype)
    ref = np.asarray(reference(q, k, v, lens), np.float64)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ref, naive_decode_f64(q, k, v, np.asarray(lens)), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,len_shape,match",
    [
        ((1, 6, 16), (1, 4, 32, 16), (1, 4, 32, 16), (1,), "multiple"),  # Hq not a multiple of KV
        ((1, 4, 16), (1, 2, 32, 32), (1, 2, 32, 32), (1,), "head_dim"),  # D mismatch
        ((1, 4, 16), (1, 2, 32, 16), (1, 2, 16, 16), (1,), "v_cache"),  # K/V shape mismatch
        ((2, 4, 16), (1, 2, 32, 16), (1, 2, 32, 16), (2,), "batch"),  # batch mismatch
        ((1, 4, 16), (1, 2, 32, 16), (1, 2, 32, 16), (2,), "lengths"),  # lengths shape
        ((1, 1, 4, 16), (1, 2, 32, 16), (1, 2, 32, 16), (1,), "q must be"),  # q rank
        ((1, 4, 24), (1, 2, 32, 24), (1, 2, 32, 24), (1,), "power of two"),  # kernel needs pow2 D
    ],
)
def test_bad_shapes_raise(q_shape, k_shape, v_shape, len_shape, match):
    q, k, v = jnp.ones(q_shape), jnp.ones(k_shape), jnp.ones(v_shape)
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, jnp.ones(len_shape, jnp.int32), interpret=True)


def test_bad_dtype_raises():
    q, k = jnp.ones((1, 4, 16), jnp.bfloat16), jnp.ones((1, 2, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q, k, k, jnp.ones((1,), jnp.int32), interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,KV", [(32, 8), (16, 8), (40, 8)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_attention_gpu(Hq, KV, dtype):
    lengths = [1, 8192, 4097, 100, 8000, 2048, 8191, 513]
    q, k, v, lens = make_inputs(0, 8, Hq, KV, 128, 8192, lengths, dtype)
    out = jax.jit(decode_attention)(q, k, v, lens)
    assert_close(out, reference(q, k, v, lens), dtype)
