"""Fused few-row linear kernel (RMSNorm + matmul + SwiGLU) vs its reference, and the reference vs numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET
from test_rms_norm import RandomInputs, f64, numpy_rms_norm, round_to, run_exact, ulp

from pallas_kernels.linear import LinearBlock, default_block, linear, linear_reference

EPS = 1e-6


def make_inputs(seed, rows, k, n, dtype):
    r = RandomInputs(seed)
    x = r.normal((rows, k), dtype, 3.0)
    residual = r.normal((rows, k), dtype, 5.0)
    norm_weight = r.uniform((k,), dtype, -2.0, 2.0)
    w = r.normal((n, k), dtype, k ** -0.5)
    return x, residual, norm_weight, w


def assert_close(out, ref, dtype, max_ulps=2):
    """bf16: within `max_ulps` of the reference everywhere, mostly exact. Both sides sum in f32, in different
    orders, so a rounding may move (by one ulp; through SwiGLU more: silu(g) moves by up to |g| times g's relative
    change for negative g, and gate, silu and up may each move, 4 ulps seen at Qwen3-8B's gate_up); near-zero outputs are judged against a floor of 2^-7 of the outputs' RMS, below which the f32
    sums' own error (about 2^-24 sqrt(K) RMS) could decide a rounding. f32: relative to the outputs' RMS."""
    a, e = f64(out), f64(ref)
    assert a.shape == e.shape
    assert np.isfinite(a).all(), "non-finite output (an unwritten element?)"
    rms = np.sqrt(np.mean(e * e))
    if jnp.dtype(dtype) == jnp.dtype(jnp.float32):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5 * rms)
        return
    err = np.abs(a - e) / ulp(np.maximum(np.abs(e), rms / 128), dtype)
    assert err.max() <= max_ulps, f"max error {err.max():.2f} ulps"
    assert np.mean(a == e) >= 0.9, f"only {np.mean(a == e):.3f} of elements match exactly"


def check(rows, k, n, dtype, *, norm, residual, swiglu, block, seed=0, lead=None):
    x, res, nw, w = make_inputs(seed, rows, k, n, dtype)
    if lead is not None:  # any leading shape
        x, res = x.reshape(*lead, k), res.reshape(*lead, k)
    kw = dict(swiglu=swiglu)
    if norm:
        kw.update(norm_weight=nw, eps=EPS)
    if residual:
        kw.update(residual=res)
    got = run_exact(linear, x, w, **kw, block=block, interpret=INTERPRET)
    want = run_exact(linear_reference, x, w, **kw)
    if residual:
        (got, got_sum), (want, want_sum) = got, want
        np.testing.assert_array_equal(f64(got_sum), f64(want_sum))  # one rounding: bit-exact
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], n // 2 if swiglu else n)
    assert_close(got, want, dtype, max_ulps=5 if swiglu else 2)


@pytest.mark.parametrize(
    "rows, k, n, dtype, norm, residual, swiglu, block",
    [
        (1, 96, 40, jnp.bfloat16, False, False, False, LinearBlock(block_n=16, block_k=32)),  # K, N ragged
        (3, 256, 64, jnp.bfloat16, True, False, False, None),  # first layer: norm, no residual
        (5, 200, 48, jnp.bfloat16, True, True, False, LinearBlock(block_n=32, block_k=64)),  # norm + residual
        (2, 128, 96, jnp.bfloat16, True, True, True, LinearBlock(block_n=4, block_k=64)),  # the MLP's gate/up
        (1, 192, 24, jnp.bfloat16, True, True, True, LinearBlock(block_n=1, block_k=64, num_warps=2)),
        (20, 64, 32, jnp.bfloat16, True, True, True, None),  # three row tiles, the last one ragged
        (4, 80, 48, jnp.float32, True, True, True, LinearBlock(block_n=16, block_k=32)),
        (1, 48, 16, jnp.float32, False, False, False, None),
    ],
)
def test_kernel_matches_reference(rows, k, n, dtype, norm, residual, swiglu, block):
    check(rows, k, n, dtype, norm=norm, residual=residual, swiglu=swiglu, block=block)


def test_leading_shape_is_kept():
    check(6, 64, 32, jnp.bfloat16, norm=True, residual=True, swiglu=False, block=None, lead=(2, 3))


def test_reference_matches_numpy():
    x, res, nw, w = make_inputs(3, 4, 160, 64, jnp.bfloat16)
    got, got_sum = run_exact(linear_reference, x, w, norm_weight=nw, residual=res, eps=EPS, swiglu=True)
    xn, summed = numpy_rms_norm(x, nw, EPS, res)
    np.testing.assert_array_equal(f64(got_sum), summed)
    y = xn @ f64(w).T  # float64 sums: the f32 accumulation may differ from it by a rounding
    gate, up = round_to(y[:, :32], jnp.bfloat16), round_to(y[:, 32:], jnp.bfloat16)
    expected = round_to(round_to(gate / (1 + np.exp(-gate)), jnp.bfloat16) * up, jnp.bfloat16)
    err = np.abs(f64(got) - expected) / ulp(np.maximum(np.abs(expected), 1e-3), jnp.bfloat16)
    assert err.max() <= 2 and np.mean(err == 0) >= 0.9


def test_bad_arguments():
    x = jnp.ones((2, 64), jnp.bfloat16)
    w = jnp.ones((32, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"w must be \[out, 64\] bfloat16"):
        linear(x, w.T, interpret=True)
    with pytest.raises(ValueError, match="swiglu needs w"):
        linear(x, w[:31], swiglu=True, interpret=True)
    with pytest.raises(ValueError, match="norm_weight must be"):
        linear(x, w, norm_weight=jnp.ones((63,), jnp.bfloat16), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="eps > 0"):
        linear(x, w, norm_weight=jnp.ones((64,), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match="residual is only fused with an RMSNorm"):
        linear(x, w, residual=x, interpret=True)
    with pytest.raises(ValueError, match="block.block_n must be a power of two"):
        linear(x, w, block=LinearBlock(block_n=24), interpret=True)
    with pytest.raises(ValueError, match="block.num_warps must be a power of two"):
        linear(x, w, block=LinearBlock(num_warps=3), interpret=True)


def test_default_block_is_sane():
    for n, k, itemsize in ((1024, 2048, 2), (4096, 1024, 2), (3072, 1024, 2), (1024, 3072, 4), (12288, 4096, 2),
                           (4096, 12288, 2), (151936, 1024, 2), (8, 16, 4)):
        for swiglu in (False, True):
            b = default_block(n, k, swiglu, itemsize)
            for v in (b.block_n, b.block_k, b.num_warps):
                assert v >= 1 and v & (v - 1) == 0
            assert b.block_k == min(512 // itemsize, 1 << (k - 1).bit_length())  # one warp of 16-byte loads
            assert b.block_n <= 16 and (n // b.block_n >= 512 or b.block_n == 1)
            per_lane = b.block_n * -(-k // b.block_k) * b.block_k * (1 + swiglu) / (32 * b.num_warps)
            assert per_lane <= 128 or b.num_warps == 4  # registers: at most 64 per lane for the weight


@pytest.mark.gpu
@pytest.mark.parametrize("k, n, swiglu", [(1024, 4096, False), (1024, 6144, True), (3072, 1024, False),
                                          (4096, 24576, True), (12288, 4096, False)])
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_kernel_gpu_real_shapes(rows, k, n, swiglu):
    check(rows, k, n, jnp.bfloat16, norm=swiglu, residual=swiglu, swiglu=swiglu, block=None, seed=rows)
