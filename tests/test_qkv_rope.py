"""qkv_rope kernel vs its reference, and the reference vs an independent float64 numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET
from test_rms_norm import TOLERANCE, RandomInputs, assert_ulp_close, f64, round_to, run_exact, ulp

from pallas_kernels.qkv_rope import QkvRopeBlock, qkv_rope, qkv_rope_reference

EPS = 1e-6
THETA = 1_000_000.0


def make_inputs(seed, batch, seq, hidden, num_heads, num_kv_heads, head_dim, dtype):
    r = RandomInputs(seed)
    x = r.normal((batch, seq, hidden), dtype)
    w_qkv = r.normal(((num_heads + 2 * num_kv_heads) * head_dim, hidden), dtype, hidden**-0.5)
    # Real Qwen3 k_norm weights reach ~96: draw both signs, magnitudes up to 100.
    q_norm = r.uniform((head_dim,), dtype, -100.0, 100.0)
    k_norm = r.uniform((head_dim,), dtype, -100.0, 100.0)
    inv_freq = jnp.asarray(1.0 / THETA ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    positions = np.array(r.integers((batch, seq), 40960))
    positions[0, 0], positions[-1, -1] = 30000, 0  # a large position and position 0
    return x, w_qkv, q_norm, k_norm, inv_freq, jnp.asarray(positions)


def project(x, w_qkv):
    """The interface's projection: f32 accumulation, output in the activation dtype."""
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    y = jax.lax.dot_general(x, w_qkv, (((2,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


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


def check_kernel(batch, seq, hidden, num_heads, num_kv_heads, head_dim, dtype, block, seeds):
    heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    for seed in seeds:
        x, w_qkv, *rest = args = make_inputs(seed, batch, seq, hidden, num_heads, num_kv_heads, head_dim, dtype)
        out = run_exact(qkv_rope, *args, **heads, eps=EPS, block=block, interpret=INTERPRET)
        ref = run_exact(qkv_rope_reference, *args, **heads, eps=EPS)
        _, scales = numpy_norm_rope(run_exact(project, x, w_qkv), *rest, **heads, eps=EPS)
        shapes = [(batch, seq, n, head_dim) for n in (num_heads, num_kv_heads, num_kv_heads)]
        for name, o, r, s, shape in zip("qkv", out, ref, scales, shapes):
            assert o.shape == shape and o.dtype == dtype, name
            if name == "v" and INTERPRET:  # passed through: bit-exact where both sides run one CPU matmul
                np.testing.assert_array_equal(f64(o), f64(r))
            elif name == "v":  # on the GPU the two projections are separately autotuned: f32 sums in other orders
                assert_ulp_close(o, r, f64(r), dtype, max_ulps=1, min_exact=0.999)
            else:
                assert_ulp_close(o, r, s, dtype, **TOLERANCE[jnp.dtype(dtype)])


@pytest.mark.parametrize(
    "batch, seq, hidden, num_heads, num_kv_heads, head_dim, dtype, block",
    [
        (2, 7, 96, 4, 4, 64, jnp.bfloat16, QkvRopeBlock(block_tokens=4)),  # MHA, 14 tokens over blocks of 4
        (1, 13, 160, 8, 4, 128, jnp.bfloat16, QkvRopeBlock(block_tokens=8, num_warps=8)),  # GQA 2
        (3, 5, 64, 8, 2, 64, jnp.float32, QkvRopeBlock(block_tokens=16, num_warps=2)),  # GQA 4, one block > N
        (1, 9, 96, 8, 1, 128, jnp.bfloat16, None),  # GQA 8, default block
        (3, 1, 64, 4, 2, 128, jnp.float32, QkvRopeBlock(block_tokens=2)),  # decode: one token per row
    ],
)
def test_kernel_matches_reference(batch, seq, hidden, num_heads, num_kv_heads, head_dim, dtype, block):
    check_kernel(batch, seq, hidden, num_heads, num_kv_heads, head_dim, dtype, block, seeds=(0, 1))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reference_matches_numpy(dtype):
    # The reference's own math, on the CPU: the ulp bounds assume correctly rounded f32 sin/cos/rsqrt, which
    # GPU libraries do not promise. On the GPU, kernels are compared with this same reference instead.
    with jax.default_device(jax.devices("cpu")[0]):
        _reference_matches_numpy(dtype)


def _reference_matches_numpy(dtype):
    heads = dict(num_heads=8, num_kv_heads=2, head_dim=64)
    x, w_qkv, *rest = args = make_inputs(11, 2, 24, 160, 8, 2, 64, dtype)
    # The projection against a float64 matmul: within one rounding plus f32 accumulation error.
    qkv = run_exact(project, x, w_qkv)
    exact = f64(x) @ f64(w_qkv).T
    bound = ulp(exact, dtype) + 2.0**-20 * (np.abs(f64(x)) @ np.abs(f64(w_qkv)).T)
    assert (np.abs(f64(qkv) - exact) <= bound).all()
    # Norm + RoPE against the float64 formula applied to that same projection.
    got = run_exact(qkv_rope_reference, *args, **heads, eps=EPS)
    expected, scales = numpy_norm_rope(qkv, *rest, **heads, eps=EPS)
    for g, e, s in zip(got, expected, scales):
        assert_ulp_close(g, e, s, dtype, **TOLERANCE[jnp.dtype(dtype)])


def test_bad_arguments():
    args = make_inputs(0, 1, 4, 64, 4, 2, 64, jnp.bfloat16)
    heads = dict(num_heads=4, num_kv_heads=2, head_dim=64, eps=EPS, interpret=True)

    def call(i=None, value=None, **overrides):
        a = list(args)
        if i is not None:
            a[i] = value
        return qkv_rope(*a, **{**heads, **overrides})

    x, w_qkv, q_norm, k_norm, inv_freq, positions = args
    with pytest.raises(ValueError, match="x must be"):
        call(0, x[0])
    with pytest.raises(ValueError, match="w_qkv must be"):
        call(1, w_qkv[:-64])
    with pytest.raises(ValueError, match="w_qkv must be"):
        call(1, w_qkv.astype(jnp.float32))
    with pytest.raises(ValueError, match="q_norm must be"):
        call(2, q_norm[:32])
    with pytest.raises(ValueError, match="k_norm must be"):
        call(3, k_norm.astype(jnp.float32))
    with pytest.raises(ValueError, match="inv_freq must be"):
        call(4, inv_freq.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="positions must be"):
        call(5, positions[:, :2])
    with pytest.raises(ValueError, match="positions must be"):
        call(5, positions.astype(jnp.float32))
    with pytest.raises(ValueError, match="num_heads"):
        call(num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be"):
        call(head_dim=48)
    with pytest.raises(ValueError, match="block.block_tokens must be a power of two"):
        call(block=QkvRopeBlock(block_tokens=12))


@pytest.mark.gpu
def test_kernel_gpu_real_shapes():
    check_kernel(8, 512, 4096, 32, 8, 128, jnp.bfloat16, None, seeds=(0,))  # prefill, Qwen3-8B attention
    check_kernel(8, 1, 4096, 32, 8, 128, jnp.bfloat16, None, seeds=(1,))  # decode
    check_kernel(2, 64, 1024, 16, 8, 128, jnp.bfloat16, None, seeds=(2,))  # Qwen3-0.6B: Hq * D != hidden
