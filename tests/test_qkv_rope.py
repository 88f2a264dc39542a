"""qkv_rope kernel vs its reference (with and without the in-place cache write), and the reference vs an
independent float64 numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET
from test_rms_norm import TOLERANCE, RandomInputs, assert_ulp_close, f64, round_to, run_exact

from pallas_kernels.qkv_rope import QkvRopeBlock, qkv_rope, qkv_rope_reference

EPS = 1e-6
THETA = 1_000_000.0
# Kernel vs reference. bf16 as for rms_norm. f32: the two sum x * x in other orders, so inv_rms can differ by an
# ulp, which the normed value, the weight (up to 100) and both RoPE products carry; each side is within ~4 ulps
# of the float64 formula (`test_reference_matches_numpy`), in opposite directions at worst (5 ulps seen).
KERNEL_TOLERANCE = {**TOLERANCE, jnp.dtype(jnp.float32): dict(max_ulps=8, min_exact=0.5)}


def make_inputs(seed, batch, seq, num_heads, num_kv_heads, head_dim, dtype, starts=None):
    """qkv_rope's array arguments: a random projection qkv [B, T, (Hq + 2KV) * D], norm weights, inv_freq, and
    positions [B, T], random per token, or rows of contiguous positions from `starts` [B] (the cache contract)."""
    r = RandomInputs(seed)
    qkv = r.normal((batch, seq, (num_heads + 2 * num_kv_heads) * head_dim), dtype, 2.0)
    # Real Qwen3 k_norm weights reach ~96: draw both signs, magnitudes up to 100.
    q_norm = r.uniform((head_dim,), dtype, -100.0, 100.0)
    k_norm = r.uniform((head_dim,), dtype, -100.0, 100.0)
    inv_freq = jnp.asarray(1.0 / THETA ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if starts is None:
        positions = np.array(r.integers((batch, seq), 40960))
        positions[0, 0], positions[-1, -1] = 30000, 0  # a large position and position 0
    else:
        positions = np.asarray(starts)[:, None] + np.arange(seq)
    return qkv, q_norm, k_norm, inv_freq, jnp.asarray(positions, jnp.int32)


def make_caches(seed, batch, num_kv_heads, cache_len, head_dim, dtype):
    """k and v caches [B, KV, S, D] full of random values (never zeros), so a stray or missing write shows."""
    r = RandomInputs(seed + 1000)
    return tuple(r.normal((batch, num_kv_heads, cache_len, head_dim), dtype) for _ in range(2))


def numpy_norm_rope(qkv, q_norm, k_norm, inv_freq, positions, *, num_heads, num_kv_heads, head_dim, eps):
    """Independent float64 formula, HF's cast points, from the projection qkv [B, T, (Hq + 2KV) * D].

    Returns (q, k, v) and, per element, the scale |x * cos| + |rotate_half(x) * sin| (for v: |v|) that bounds
    how far one-ulp wobbles upstream can move the result."""
    dtype = qkv.dtype
    b, t, _ = qkv.shape
    heads = f64(qkv).reshape(b, t, num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = np.split(heads, [num_heads, num_heads + num_kv_heads], axis=2)
    # HF: freqs = pos.float() * inv_freq in f32 (one f32 rounding); cos/sin computed, then cast to dtype.
    freqs = (np.asarray(positions).astype(np.float32)[..., None] * np.asarray(inv_freq)).astype(np.float64)
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = round_to(np.cos(emb), dtype), round_to(np.sin(emb), dtype)

    def norm_rope(h, weight):
        hn = round_to(h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps), dtype)
        hn = round_to(f64(weight) * hn, dtype)
        rot = np.concatenate([-hn[..., head_dim // 2:], hn[..., :head_dim // 2]], axis=-1)
        out = round_to(round_to(hn * cos, dtype) + round_to(rot * sin, dtype), dtype)
        return out, np.abs(hn * cos) + np.abs(rot * sin)

    (q, q_scale), (k, k_scale) = norm_rope(q, q_norm), norm_rope(k, k_norm)
    return (q, k, v), (q_scale, k_scale, np.abs(v))


def check_kernel(batch, seq, num_heads, num_kv_heads, head_dim, dtype, block, seeds):
    heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    for seed in seeds:
        args = make_inputs(seed, batch, seq, num_heads, num_kv_heads, head_dim, dtype)
        out = run_exact(qkv_rope, *args, **heads, eps=EPS, block=block, interpret=INTERPRET)
        ref = run_exact(qkv_rope_reference, *args, **heads, eps=EPS)
        _, scales = numpy_norm_rope(*args, **heads, eps=EPS)
        shapes = [(batch, seq, n, head_dim) for n in (num_heads, num_kv_heads, num_kv_heads)]
        for name, o, r, s, shape in zip("qkv", out, ref, scales, shapes):
            assert o.shape == shape and o.dtype == dtype, name
            if name == "v":  # a copy of qkv's v columns: bit-exact
                np.testing.assert_array_equal(f64(o), f64(r))
            else:
                assert_ulp_close(o, r, s, dtype, **KERNEL_TOLERANCE[jnp.dtype(dtype)])


def check_cache(batch, seq, num_heads, num_kv_heads, head_dim, cache_len, starts, dtype, block, seed):
    """The cache path: q as without caches; each token's k, v at slot starts[b] + t of every kv head (slots past
    the cache dropped); every other slot bit-identical to before."""
    heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    args = make_inputs(seed, batch, seq, num_heads, num_kv_heads, head_dim, dtype, starts=starts)
    k_cache, v_cache = make_caches(seed, batch, num_kv_heads, cache_len, head_dim, dtype)
    caches = dict(k_cache=k_cache, v_cache=v_cache)
    q, kc, vc = run_exact(qkv_rope, *args, **heads, eps=EPS, **caches, block=block, interpret=INTERPRET)
    assert q.shape == (batch, seq, num_heads, head_dim) and q.dtype == dtype
    assert kc.shape == vc.shape == k_cache.shape and kc.dtype == vc.dtype == dtype
    ref_q, ref_k, ref_v = run_exact(qkv_rope_reference, *args, **heads, eps=EPS)  # k, v [B, T, KV, D]
    _, (q_scale, k_scale, _) = numpy_norm_rope(*args, **heads, eps=EPS)
    tol = KERNEL_TOLERANCE[jnp.dtype(dtype)]
    assert_ulp_close(q, ref_q, q_scale, dtype, **tol)

    slots = np.asarray(starts)[:, None] + np.arange(seq)  # [B, T]
    rows, toks = np.nonzero(slots < cache_len)  # the tokens that land in the cache
    written = np.zeros(k_cache.shape, bool)  # [B, KV, S, D]
    written[rows, :, slots[rows, toks]] = True
    for got, before, want, scale in ((kc, k_cache, ref_k, k_scale), (vc, v_cache, ref_v, None)):
        got, before, want = f64(got), f64(before), f64(want)
        np.testing.assert_array_equal(got[~written], before[~written])  # untouched: bit-identical
        at_slots = got[rows, :, slots[rows, toks]]  # [tokens, KV, D]
        if scale is None:  # v: a copy
            np.testing.assert_array_equal(at_slots, want[rows, toks])
        else:
            assert_ulp_close(at_slots, want[rows, toks], scale[rows, toks], dtype, **tol)

    if (slots < cache_len).all():  # the reference's own write (in range: dynamic_update_slice clamps past S)
        _, ref_kc, ref_vc = run_exact(qkv_rope_reference, *args, **heads, eps=EPS, **caches)
        for got, before, want in ((ref_kc, k_cache, ref_k), (ref_vc, v_cache, ref_v)):
            expected = np.array(f64(before))
            expected[np.arange(batch)[:, None], :, slots] = f64(want)  # [B, T, KV, D] into [B, KV, S, D]
            np.testing.assert_array_equal(f64(got), expected)


@pytest.mark.parametrize(
    "batch, seq, num_heads, num_kv_heads, head_dim, dtype, block",
    [
        (2, 7, 4, 4, 64, jnp.bfloat16, QkvRopeBlock(block_tokens=4)),  # MHA, 7 tokens a row over blocks of 4
        (1, 13, 8, 4, 128, jnp.bfloat16, QkvRopeBlock(block_tokens=8, num_warps=8)),  # GQA 2
        (3, 5, 8, 2, 64, jnp.float32, QkvRopeBlock(block_tokens=16, num_warps=2)),  # GQA 4, one block > T
        (1, 9, 8, 1, 128, jnp.bfloat16, None),  # GQA 8, default block
        (3, 1, 4, 2, 128, jnp.float32, QkvRopeBlock(block_tokens=2)),  # decode: one token per row, bt -> 1
    ],
)
def test_kernel_matches_reference(batch, seq, num_heads, num_kv_heads, head_dim, dtype, block):
    check_kernel(batch, seq, num_heads, num_kv_heads, head_dim, dtype, block, seeds=(0, 1))


@pytest.mark.parametrize(
    "batch, seq, num_heads, num_kv_heads, head_dim, cache_len, starts, dtype, block",
    [
        # Prefill chunks into the middle of the cache, rows at different starts, the last row ending at slot S - 1.
        (3, 5, 8, 2, 64, 32, (0, 11, 27), jnp.bfloat16, QkvRopeBlock(block_tokens=2)),
        (2, 9, 8, 1, 128, 64, (3, 40), jnp.float32, QkvRopeBlock(block_tokens=4)),  # GQA 8, f32
        (4, 1, 4, 4, 128, 16, (0, 5, 15, 9), jnp.bfloat16, None),  # decode (T = 1), MHA
        (2, 4, 4, 2, 64, 8, (6, 2), jnp.bfloat16, QkvRopeBlock(block_tokens=2)),  # row 0 overflows: dropped
    ],
)
def test_kernel_writes_cache(batch, seq, num_heads, num_kv_heads, head_dim, cache_len, starts, dtype, block):
    check_cache(batch, seq, num_heads, num_kv_heads, head_dim, cache_len, starts, dtype, block, seed=2)


@pytest.mark.parametrize("fn", [qkv_rope, qkv_rope_reference])
def test_donated_cache_is_updated_in_place(fn):
    """Under jit with the caches donated, the outputs reuse the caches' buffers (no copy; pytest turns a
    'Some donated buffers were not usable' warning into an error)."""
    heads = dict(num_heads=4, num_kv_heads=2, head_dim=64, eps=EPS)
    starts = (4, 9)
    args = make_inputs(5, 2, 3, 4, 2, 64, jnp.bfloat16, starts=starts)
    k_cache, v_cache = make_caches(5, 2, 2, 16, 64, jnp.bfloat16)
    v_before = f64(make_caches(5, 2, 2, 16, 64, jnp.bfloat16)[1])  # a twin: reading v_cache would pin its buffer
    kw = dict(interpret=INTERPRET) if fn is qkv_rope else {}

    def step(qkv, q_norm, k_norm, inv_freq, positions, k_cache, v_cache):
        return fn(qkv, q_norm, k_norm, inv_freq, positions, **heads, k_cache=k_cache, v_cache=v_cache, **kw)

    compiled = jax.jit(step, donate_argnums=(5, 6)).lower(*args, k_cache, v_cache).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == k_cache.nbytes + v_cache.nbytes
    _, kc, vc = compiled(*args, k_cache, v_cache)
    assert k_cache.is_deleted() and v_cache.is_deleted()
    # v is a copy, so its cache is known exactly: the qkv's v columns at the slots, the rest as before.
    expected = v_before.copy()
    slots = np.asarray(starts)[:, None] + np.arange(3)  # [B, T]
    expected[np.arange(2)[:, None], :, slots] = f64(args[0])[..., 6 * 64:].reshape(2, 3, 2, 64)
    np.testing.assert_array_equal(f64(vc), expected)
    assert np.isfinite(f64(kc)).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reference_matches_numpy(dtype):
    # The reference's own math, on the CPU: the ulp bounds assume correctly rounded f32 sin/cos/rsqrt, which
    # GPU libraries do not promise. On the GPU, kernels are compared with this same reference instead.
    with jax.default_device(jax.devices("cpu")[0]):
        heads = dict(num_heads=8, num_kv_heads=2, head_dim=64)
        args = make_inputs(11, 2, 24, 8, 2, 64, dtype)
        got = run_exact(qkv_rope_reference, *args, **heads, eps=EPS)
        expected, scales = numpy_norm_rope(*args, **heads, eps=EPS)
        for g, e, s in zip(got, expected, scales):
            assert_ulp_close(g, e, s, dtype, **TOLERANCE[jnp.dtype(dtype)])


def test_bad_arguments():
    args = make_inputs(0, 1, 4, 4, 2, 64, jnp.bfloat16)
    caches = make_caches(0, 1, 2, 8, 64, jnp.bfloat16)
    heads = dict(num_heads=4, num_kv_heads=2, head_dim=64, eps=EPS, interpret=True)

    def call(i=None, value=None, **overrides):
        a = list(args)
        if i is not None:
            a[i] = value
        return qkv_rope(*a, **{**heads, **overrides})

    qkv, q_norm, k_norm, inv_freq, positions = args
    k_cache, v_cache = caches
    with pytest.raises(ValueError, match="qkv must be"):
        call(0, qkv[0])
    with pytest.raises(ValueError, match="qkv must be bfloat16"):
        call(0, qkv.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"qkv last dim must be .* = 512"):
        call(0, qkv[..., :-64])
    with pytest.raises(ValueError, match="q_norm must be"):
        call(1, q_norm[:32])
    with pytest.raises(ValueError, match="k_norm must be"):
        call(2, k_norm.astype(jnp.float32))
    with pytest.raises(ValueError, match="inv_freq must be"):
        call(3, inv_freq.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="positions must be"):
        call(4, positions[:, :2])
    with pytest.raises(ValueError, match="positions must be"):
        call(4, positions.astype(jnp.float32))
    with pytest.raises(ValueError, match="k_cache and v_cache must be given together"):
        call(k_cache=k_cache)
    with pytest.raises(ValueError, match="k_cache must be"):
        call(k_cache=k_cache[:, :1], v_cache=v_cache)  # one kv head short
    with pytest.raises(ValueError, match="v_cache must be"):
        call(k_cache=k_cache, v_cache=v_cache.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"k_cache must be .*S >= T = 4"):
        call(k_cache=k_cache[:, :, :3], v_cache=v_cache[:, :, :3])  # shorter than the chunk
    with pytest.raises(ValueError, match="v_cache shape"):
        call(k_cache=k_cache, v_cache=v_cache[:, :, :6])
    with pytest.raises(ValueError, match="num_heads"):
        call(num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be even"):
        call(head_dim=15)
    with pytest.raises(ValueError, match=r"head_dim must be 2 \* a power of two"):  # the kernel's tiles only
        qkv_rope(qkv[..., :8 * 48], q_norm[:48], k_norm[:48], inv_freq[:24], positions, **{**heads, "head_dim": 48})
    with pytest.raises(ValueError, match="block.block_tokens must be a power of two"):
        call(block=QkvRopeBlock(block_tokens=12))


@pytest.mark.gpu
def test_kernel_gpu_real_shapes():
    check_kernel(8, 512, 32, 8, 128, jnp.bfloat16, None, seeds=(0,))  # prefill, Qwen3-8B attention
    check_kernel(8, 1, 32, 8, 128, jnp.bfloat16, None, seeds=(1,))  # decode
    check_kernel(2, 64, 16, 8, 128, jnp.bfloat16, None, seeds=(2,))  # Qwen3-0.6B: Hq * D != hidden
    starts = (0, 1, 63, 64, 1000, 2047, 4000, 4095)
    check_cache(8, 1, 32, 8, 128, 4096, starts, jnp.bfloat16, None, seed=3)  # decode into a 4096-slot cache
    check_cache(2, 512, 32, 8, 128, 4096, (0, 1500), jnp.bfloat16, None, seed=4)  # prefill chunks, mid-cache
