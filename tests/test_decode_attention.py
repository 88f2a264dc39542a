"""Flash-decoding attention: Pallas kernel vs its jnp reference, and the reference vs float64 numpy."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import INTERPRET
from test_attention import assert_close  # same tolerances as prefill attention
from test_qkv_rope import EPS, KERNEL_TOLERANCE, make_caches, numpy_norm_rope
from test_qkv_rope import make_inputs as make_qkv_inputs
from test_rms_norm import assert_ulp_close, f64
from pallas_kernels.decode_attention import (Block, _tiling, decode_attention, decode_attention_qkv,
                                             decode_attention_qkv_reference, decode_attention_reference)

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


@pytest.mark.parametrize("B,KV,S", [(b, kv, s) for b in (1, 2, 8, 64) for kv in (1, 8)
                                     for s in (16, 64, 100, 384, 1280, 4097, 32768)])
def test_auto_splits_cover_the_cache_once(B, KV, S):
    """The automatic split count: whole tiles per split, every cache slot in exactly one split, no empty split."""
    rows, block_k, splits, chunk = _tiling(Block(), B, KV, S, 3)
    assert rows == 16 and chunk % block_k == 0 and splits >= 1
    assert (splits - 1) * chunk < S <= splits * chunk


@pytest.mark.parametrize("B,S,splits", [(1, 384, 6), (1, 1280, 5), (1, 32768, 32), (8, 384, 3), (64, 1280, 1)])
def test_auto_splits_as_tuned(B, S, splits):
    """The split counts measured best end to end (BENCHMARKS.md): short caches get up to 6 one-tile splits,
    longer ones >= 4 tiles per split, up to about two programs per SM (8 kv heads)."""
    assert _tiling(Block(), B, 8, S, 3)[2] == splits


def test_bad_dtype_raises():
    q, k = jnp.ones((1, 4, 16), jnp.bfloat16), jnp.ones((1, 2, 32, 16), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q, k, k, jnp.ones((1,), jnp.int32), interpret=True)


def check_fused(seed, B, Hq, KV, D, S, starts, dtype, block, norm_scale=1.0):
    """decode_attention_qkv against its reference (qkv_rope_reference, then the decode reference): o within the
    attention tolerances; the caches bit-identical except at each row's slot, where k is within the qkv_rope
    kernel's ulp bounds and v is the projection's v exactly. Slots past each row's token hold NaN / inf garbage,
    so a read beyond the valid keys shows."""
    dims = dict(num_heads=Hq, num_kv_heads=KV, head_dim=D, eps=EPS)
    qkv, q_norm, k_norm, inv_freq, positions = make_qkv_inputs(seed, B, 1, Hq, KV, D, dtype, starts=starts)
    q_norm, k_norm = (w * (norm_scale / 100) for w in (q_norm, k_norm))  # drawn up to +-100
    k_cache, v_cache = (f64(c) for c in make_caches(seed, B, KV, S, D, dtype))
    beyond = np.arange(S)[None, None, :, None] > np.asarray(starts)[:, None, None, None]  # [B, 1, S, 1]
    junk = np.resize(GARBAGE, S)[None, None, :, None]
    k_cache, v_cache = (jnp.asarray(np.where(beyond, junk, c).astype(dtype)) for c in (k_cache, v_cache))
    args = (qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache)

    o, kc, vc = decode_attention_qkv(*args, **dims, block=block, interpret=INTERPRET)
    ref_o, ref_kc, _ = jax.jit(lambda *a: decode_attention_qkv_reference(*a, **dims))(*args)
    assert o.shape == (B, Hq, D) and o.dtype == dtype
    assert_close(o, ref_o, dtype)

    _, (_, k_scale, _) = numpy_norm_rope(qkv, q_norm, k_norm, inv_freq, positions, **dims)  # ulp scale of k
    rows, slots = np.arange(B), np.asarray(starts)
    written = np.zeros(k_cache.shape, bool)
    written[rows, :, slots] = True
    for got, before in ((kc, k_cache), (vc, v_cache)):
        np.testing.assert_array_equal(f64(got)[~written], f64(before)[~written])  # untouched, garbage included
    assert_ulp_close(f64(kc)[rows, :, slots], f64(ref_kc)[rows, :, slots], k_scale[:, 0], dtype,
                     **KERNEL_TOLERANCE[jnp.dtype(dtype)])
    np.testing.assert_array_equal(f64(vc)[rows, :, slots], f64(qkv)[:, 0, (Hq + KV) * D:].reshape(B, KV, D))


# (B, Hq, KV, D, S, starts, dtype, block): a row's first token (slot 0) and the cache's last slot, S not a
# multiple of block_k, empty splits, GQA ratios 1/2/4/8/16 (the k row takes a padding row; G=16 needs 32 rows).
FUSED_CASES = [
    (3, 8, 2, 64, 40, [0, 17, 39], jnp.float32, None),  # G=4, one split
    (3, 8, 2, 64, 40, [0, 17, 39], jnp.bfloat16, Block(block_k=16, num_splits=3)),  # 3 splits, some empty
    (2, 16, 1, 128, 64, [5, 63], jnp.float32, Block(block_k=16, num_splits=2)),  # G=16
    (2, 4, 4, 64, 33, [32, 1], jnp.bfloat16, None),  # MHA, S=33
    (2, 16, 8, 128, 100, [99, 50], jnp.bfloat16, Block(block_k=32, num_splits=4)),  # Qwen3-0.6B heads
]


@pytest.mark.parametrize("B,Hq,KV,D,S,starts,dtype,block", FUSED_CASES)
def test_decode_attention_qkv_matches_reference(B, Hq, KV, D, S, starts, dtype, block):
    check_fused(B * S + Hq, B, Hq, KV, D, S, starts, dtype, block)


def test_decode_attention_qkv_large_norm_weights():
    """k_norm / q_norm weights ~100 as in real checkpoints: the cache write stays within ulps, o stays finite."""
    check_fused(7, 2, 8, 2, 128, 48, [47, 3], jnp.bfloat16, None, norm_scale=100.0)


def test_decode_attention_qkv_donated_in_place():
    """Under jit with the caches donated, the fused kernel writes into the caches' own buffers (no copy)."""
    dims = dict(num_heads=8, num_kv_heads=2, head_dim=64, eps=EPS)
    args = make_qkv_inputs(3, 2, 1, 8, 2, 64, jnp.bfloat16, starts=(4, 9))
    k_cache, v_cache = make_caches(3, 2, 2, 16, 64, jnp.bfloat16)

    def step(*a):
        return decode_attention_qkv(*a, **dims, interpret=INTERPRET)

    compiled = jax.jit(step, donate_argnums=(5, 6)).lower(*args, k_cache, v_cache).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == k_cache.nbytes + v_cache.nbytes
    compiled(*args, k_cache, v_cache)
    assert k_cache.is_deleted() and v_cache.is_deleted()


def test_decode_attention_qkv_bad_arguments():
    dims = dict(num_heads=8, num_kv_heads=2, head_dim=64, eps=EPS, interpret=True)
    qkv, q_norm, k_norm, inv_freq, positions = make_qkv_inputs(0, 2, 2, 8, 2, 64, jnp.bfloat16, starts=(0, 3))
    k_cache, v_cache = make_caches(0, 2, 2, 16, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="one token per row"):  # two tokens
        decode_attention_qkv(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache, **dims)
    with pytest.raises(ValueError, match="one token per row"):
        decode_attention_qkv_reference(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache,
                                       **{k: v for k, v in dims.items() if k != "interpret"})
    one = (qkv[:, :1], q_norm, k_norm, inv_freq, positions[:, :1])
    with pytest.raises(ValueError, match="k_cache must be"):
        decode_attention_qkv(*one, k_cache[:, :1], v_cache, **dims)
    with pytest.raises(ValueError, match="k_cache and v_cache must be given together"):
        decode_attention_qkv(*one, k_cache, None, **dims)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        decode_attention_qkv(*one, k_cache, v_cache, **dims, block=Block(block_k=24))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_attention_qkv_gpu(dtype):
    """Qwen3-8B heads at real lengths: one split (B=8, 8k) and many (B=1, 32k), slot 0 and the last slot."""
    check_fused(0, 8, 32, 8, 128, 8192, [0, 8191, 4096, 99, 8000, 2047, 8190, 512], dtype, None)
    check_fused(1, 1, 32, 8, 128, 32768, [30000], dtype, None)
    check_fused(2, 2, 16, 8, 128, 4096, [4095, 17], dtype, None, norm_scale=100.0)  # Qwen3-0.6B, weights ~100


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,KV", [(32, 8), (16, 8), (40, 8)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_decode_attention_gpu(Hq, KV, dtype):
    lengths = [1, 8192, 4097, 100, 8000, 2048, 8191, 513]
    q, k, v, lens = make_inputs(0, 8, Hq, KV, 128, 8192, lengths, dtype)
    out = jax.jit(decode_attention)(q, k, v, lens)
    assert_close(out, reference(q, k, v, lens), dtype)
