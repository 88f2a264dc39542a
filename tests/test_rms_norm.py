"""rms_norm kernel vs its reference, and the reference vs an independent float64 numpy formula.

Also holds the numeric test helpers (ulp comparison, exact-rounding compile, random inputs) that
tests/test_qkv_rope.py imports.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET

from pallas_kernels.rms_norm import RmsNormBlock, default_block, rms_norm, rms_norm_reference, round_f32

EPS = 1e-6
_BITS = {jnp.dtype(jnp.bfloat16): 8, jnp.dtype(jnp.float16): 11, jnp.dtype(jnp.float32): 24}
# Kernel vs reference: bf16 agrees exactly but for rare wobbles. f32 sums in another order can move the rounded
# normalised value by one of its ulps; the weight product then carries that into up to two ulps of the output,
# plus its own rounding (3 ulps, seen once in 33M elements at 8192 x 4096 on an H200). In f32 a few ulps.
TOLERANCE = {
    jnp.dtype(jnp.bfloat16): dict(max_ulps=3, min_exact=0.99),
    jnp.dtype(jnp.float32): dict(max_ulps=4, min_exact=0.5),
}
# XLA (CPU and GPU) may by default skip a bf16 rounding between two ops ("excess precision"), e.g. between
# the residual add and the f32 statistics. HF rounds there; so must the code under test, interpreter included.
EXACT_OPTIONS = {"xla_allow_excess_precision": False}


# ---------------------------------------------------------------------------------------------- helpers
def round_to(v, dtype):
    """Round float64 values to `dtype`'s precision directly (one rounding, half to even), kept in float64."""
    bits = _BITS[jnp.dtype(dtype)]
    m, e = np.frexp(np.asarray(v, np.float64))
    return np.ldexp(np.round(np.ldexp(m, bits)), e - bits)


def ulp(v, dtype):
    """Spacing of `dtype` values at magnitude |v| (float64), floored at the smallest f32 normal."""
    bits = _BITS[jnp.dtype(dtype)]
    mag = np.maximum(np.abs(v), np.finfo(np.float32).tiny)
    return np.exp2(np.floor(np.log2(mag)) - (bits - 1))


def f64(a):
    return np.asarray(a).astype(np.float64)


def assert_ulp_close(actual, expected, scale, dtype, *, max_ulps, min_exact):
    """|actual - expected| <= max_ulps ulps of `scale` everywhere, and at least `min_exact` of elements equal."""
    a, e = f64(actual), f64(expected)
    assert a.shape == e.shape
    assert np.isfinite(a).all(), "non-finite output (an unwritten element?)"
    err = np.abs(a - e) / ulp(scale, dtype)
    exact = np.mean(a == e)
    assert err.max() <= max_ulps, f"max error {err.max():.2f} ulps (exact fraction {exact:.4f})"
    assert exact >= min_exact, f"only {exact:.4f} of elements match exactly"


@functools.cache
def _compiled(fn, static, avals):
    def call(args, arrays):
        return fn(*args, **arrays, **dict(static))

    arg_avals, array_avals = avals
    return jax.jit(call).lower(arg_avals, dict(array_avals)).compile(compiler_options=EXACT_OPTIONS)


def run_exact(fn, *args, **kwargs):
    """fn(*args, **kwargs) compiled once per (fn, static kwargs, shapes), rounding where HF rounds.

    Array keyword arguments are traced; every other keyword argument is static (and must be hashable)."""
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    aval = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    avals = (tuple(map(aval, args)), tuple(sorted((k, aval(v)) for k, v in arrays.items())))
    return _compiled(fn, static, avals)(tuple(args), arrays)


@functools.partial(jax.jit, static_argnums=1)
def _random_pool(seed, size):
    kn, ku = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kn, (size,), jnp.float32), jax.random.uniform(ku, (size,), jnp.float32)


class RandomInputs:
    """Fresh jax.random draws for one seed. Small draws are sliced from one pool (a single compiled generator
    for every test shape: compiling jax.random per shape dominates CPU test time); big ones are drawn directly."""

    POOL = 1 << 20

    def __init__(self, seed):
        self._key = jax.random.key(seed)
        normal, uniform = _random_pool(seed, self.POOL)
        self._pools = {"normal": np.asarray(normal), "uniform": np.asarray(uniform)}
        self._used = {"normal": 0, "uniform": 0}
        self._draws = 0

    def _take(self, kind, shape):
        n, start = int(np.prod(shape)), self._used[kind]
        if start + n > self.POOL:  # GPU-sized: draw directly (compiles for this shape)
            self._draws += 1
            key = jax.random.fold_in(self._key, self._draws)
            draw = jax.random.normal if kind == "normal" else jax.random.uniform
            return np.asarray(draw(key, shape, jnp.float32))
        self._used[kind] += n
        return self._pools[kind][start:start + n].reshape(shape)

    def normal(self, shape, dtype, scale=1.0):
        return jnp.asarray((self._take("normal", shape) * np.float32(scale)).astype(dtype))

    def uniform(self, shape, dtype, low, high):
        return jnp.asarray((low + (high - low) * self._take("uniform", shape)).astype(dtype))

    def integers(self, shape, high):
        return jnp.asarray(np.minimum(self._take("uniform", shape) * high, high - 1).astype(np.int32))


# ------------------------------------------------------------------------------------------------ tests
def numpy_rms_norm(x, weight, eps, residual=None):
    """Independent float64 formula with HF's cast points: f32-or-better statistics, cast, then weight."""
    dtype = x.dtype
    s = f64(x) if residual is None else round_to(f64(residual) + f64(x), dtype)
    xn = round_to(s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps), dtype)
    return round_to(f64(weight) * xn, dtype), s


def make_inputs(seed, shape, dtype):
    r = RandomInputs(seed)
    x = r.normal(shape, dtype, 3.0)
    residual = r.normal(shape, dtype, 5.0)
    # Real Qwen3 norm weights reach ~100 (k_norm); draw both signs and a wide range of magnitudes.
    weight = r.uniform(shape[-1:], dtype, -100.0, 100.0)
    return x, residual, weight


def check_kernel(shape, dtype, block, seeds):
    tol = TOLERANCE[jnp.dtype(dtype)]
    for seed in seeds:
        x, residual, weight = make_inputs(seed, shape, dtype)
        out = run_exact(rms_norm, x, weight, eps=EPS, block=block, interpret=INTERPRET)
        ref = run_exact(rms_norm_reference, x, weight, eps=EPS)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_ulp_close(out, ref, f64(ref), dtype, **tol)

        out, summed = run_exact(rms_norm, x, weight, residual=residual, eps=EPS, block=block, interpret=INTERPRET)
        ref, ref_sum = run_exact(rms_norm_reference, x, weight, residual=residual, eps=EPS)
        assert out.shape == summed.shape == x.shape and out.dtype == summed.dtype == x.dtype
        np.testing.assert_array_equal(f64(summed), f64(ref_sum))  # one rounding: must be bit-exact
        assert_ulp_close(out, ref, f64(ref), dtype, **tol)


@pytest.mark.parametrize(
    "shape, dtype, block",
    [
        ((3, 5, 96), jnp.bfloat16, RmsNormBlock(block_rows=4, num_warps=4)),  # 15 rows, H not a power of 2
        ((7, 160), jnp.bfloat16, RmsNormBlock(block_rows=2, num_warps=2)),
        ((1, 1, 256), jnp.bfloat16, None),  # one row (decode), default block
        ((13, 64), jnp.float32, RmsNormBlock(block_rows=16, num_warps=4)),  # one block, larger than the rows
        ((2, 3, 4, 160), jnp.float32, None),  # 4-d input, default block
    ],
)
def test_kernel_matches_reference(shape, dtype, block):
    check_kernel(shape, dtype, block, seeds=(0, 1))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reference_matches_numpy(dtype):
    x, residual, weight = make_inputs(7, (4, 33, 160), dtype)
    for res in (None, residual):
        expected, expected_sum = numpy_rms_norm(x, weight, EPS, res)
        got = run_exact(rms_norm_reference, x, weight, eps=EPS, **({} if res is None else {"residual": res}))
        if res is not None:
            got, got_sum = got
            np.testing.assert_array_equal(f64(got_sum), expected_sum)
        # f32 vs f64 statistics may move a bf16 rounding by one ulp of the normalised value: <= 2 ulps after
        # the weight multiply.
        assert_ulp_close(got, expected, expected, dtype, **TOLERANCE[jnp.dtype(dtype)])


def test_cast_order_is_hf():
    """Multiplying by the weight in f32 and casting afterwards is a different function: make sure we differ."""
    x, _, weight = make_inputs(3, (8, 128), jnp.bfloat16)
    xf = f64(x)
    wrong = round_to(f64(weight) * xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + EPS), jnp.bfloat16)
    ref = f64(run_exact(rms_norm_reference, x, weight, eps=EPS))
    assert np.mean(ref != wrong) > 0.05


def test_round_f32_is_torch_cast():
    """round_f32 (bit-level bf16 rounding) == a plain f32 -> bf16 cast, over random bit patterns and specials."""
    bits = np.asarray(jax.random.bits(jax.random.key(5), (1 << 16,), jnp.uint32))
    specials = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, np.inf, -np.inf, np.nan, 3.4028235e38,
                         -3.4028235e38, 1e-40, -1e-45], np.float32)
    cuda_nans = np.array([0x7FFFFFFF, 0xFFFFFFFF], np.uint32).view(np.float32)  # must not wrap to -0
    x = np.concatenate([bits.view(np.float32), specials, cuda_nans])
    got = np.asarray(jax.jit(round_f32, static_argnums=1)(x, jnp.bfloat16))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
    ok = ~np.isnan(x)
    want = x[ok].astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got[ok].view(np.uint32), want.view(np.uint32))


def test_bad_arguments():
    x = jnp.ones((4, 96), jnp.bfloat16)
    w = jnp.ones((96,), jnp.bfloat16)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, jnp.ones((64,), jnp.bfloat16), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x, w.astype(jnp.float32), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, eps=EPS, residual=jnp.ones((4, 95), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, w, eps=EPS, residual=x.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="x must be bfloat16"):
        rms_norm(x.astype(jnp.int32), w.astype(jnp.int32), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="block.block_rows must be a power of two"):
        rms_norm(x, w, eps=EPS, block=RmsNormBlock(block_rows=3), interpret=True)
    with pytest.raises(ValueError, match="x must have a non-empty last"):
        rms_norm(jnp.ones((), jnp.bfloat16), w, eps=EPS, interpret=True)


def test_default_block_is_sane():
    for hidden in (1024, 2048, 2560, 4096, 5120):
        b = default_block(hidden)
        assert b.block_rows >= 1 and b.block_rows & (b.block_rows - 1) == 0
        assert 4 <= b.num_warps <= 16


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 2560, 5120])
def test_kernel_gpu_real_shapes(hidden):
    check_kernel((8192, hidden), jnp.bfloat16, None, seeds=(0,))
    check_kernel((8, 1, hidden), jnp.bfloat16, None, seeds=(1,))  # decode rows
