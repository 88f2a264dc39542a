"""The dequantize-matmul kernel against its reference (interpret mode on CPU: outputs start as NaN, so an element
the kernel never writes fails), the int4 packing, the Triton lowering, and bad arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.triton import gpu_info  # private: jax is pinned, as in test_gpu_lowering.py

from conftest import INTERPRET
from pallas_kernels import quant_matmul as qm

S = jax.ShapeDtypeStruct


def weight(fmt, n, k, seed, group=128):
    """Random quantized weight operands (qweight, scales, zeros) of an [n, k] weight in `fmt`."""
    rng = np.random.default_rng(seed)
    groups = -(-k // group)
    if fmt == "int8":
        return (jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8),
                jnp.asarray(rng.uniform(0.5, 2, n) / 127, jnp.bfloat16), None)
    if fmt == "int4":
        q = jnp.asarray(rng.integers(0, 16, (n, groups * group)), jnp.uint8)
        return (qm.pack_int4_groups(q, group), jnp.asarray(rng.uniform(0.5, 2, (n, groups)) / 15, jnp.bfloat16),
                jnp.asarray(rng.integers(0, 16, (n, groups)), jnp.uint8))
    q = jnp.asarray(np.clip(rng.standard_normal((n, k)) * 100, -448, 448), jnp.float8_e4m3fn)  # no NaN (>448)
    return q, jnp.asarray(rng.uniform(0.5, 2, (n, groups)) / 448, jnp.float32), None


def check(fmt, m, n, k, dtype, block=None, seed=0):
    qw, s, z = weight(fmt, n, k, seed)
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((m, k)), dtype)
    got = qm.quant_matmul(x, qw, s, z, fmt=fmt, in_features=k, block=block, interpret=INTERPRET)
    want = qm.quant_matmul_reference(x, qw, s, z, fmt=fmt, in_features=k)
    assert got.shape == (m, n) and got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()  # every element written
    # f32: summation order only; bf16: one rounding of the output
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("fmt", qm.FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (3, 131, 300), (64, 96, 383)])
def test_matches_reference_over_shapes(fmt, m, n, k):
    # batch 1, 3 and 64; odd channel counts; K on a group boundary and past one (int4: padded packing, fp8: a
    # short last group)
    check(fmt, m, n, k, jnp.bfloat16)


@pytest.mark.parametrize("fmt", qm.FORMATS)
def test_f32_activations_and_split_k(fmt):
    check(fmt, 5, 80, 640, jnp.float32, seed=3)
    # K split over 3 programs (5 steps: 2 + 2 + 1), two row blocks of 16, channel blocks of 16
    block = qm.QuantMatmulBlock(block_m=16, block_n=16, block_k=128, num_splits=3, num_warps=4, num_stages=2)
    check(fmt, 20, 50, 640, jnp.bfloat16, block=block, seed=4)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
@pytest.mark.parametrize("block_k", [256, 512])
def test_several_groups_per_step(fmt, block_k):
    # a K step of 2 or 4 groups, each scaled (and int4: offset) by its own group's values. K = 640: five groups, the
    # last step part-filled (groups past the last one masked); K = 300: a short last group (int4: padded packing);
    # odd N; one K split or three (block_k 256 over K = 1664: 7 steps, 3 + 3 + 1)
    block = functools.partial(qm.QuantMatmulBlock, block_m=16, block_n=32, block_k=block_k, num_warps=4,
                              num_stages=3)
    check(fmt, 1, 67, 640, jnp.bfloat16, block=block(num_splits=1), seed=5)
    check(fmt, 3, 50, 300, jnp.float32, block=block(num_splits=2), seed=6)
    check(fmt, 17, 33, 1664, jnp.float32, block=block(num_splits=3), seed=7)


def test_several_groups_per_step_small_groups():
    # group 32, block_k 128: four groups a step (int4: 16 bytes a group)
    for fmt in ("int4", "fp8"):
        qw, s, z = weight(fmt, 40, 200, 8, group=32)
        x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 200)), jnp.float32)
        block = qm.QuantMatmulBlock(block_m=16, block_n=16, block_k=128, num_splits=1)
        got = qm.quant_matmul(x, qw, s, z, fmt=fmt, in_features=200, group_size=32, block=block,
                              interpret=INTERPRET)
        want = qm.quant_matmul_reference(x, qw, s, z, fmt=fmt, in_features=200, group_size=32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", qm.FORMATS)
def test_default_block_is_valid(fmt):
    # Qwen3's shapes and odd ones, batch 1 to 64, groups of 32 to 256: the default tiling passes the checks
    for m, n, k in [(1, 6144, 4096), (1, 1024, 3072), (16, 151936, 1024), (64, 4096, 12288), (5, 80, 300)]:
        for group in (32, 128, 256):
            b = qm.default_block(m, n, k, fmt, group)
            operands = operand_avals(fmt, n, k, group)
            qm._check_args(S((m, k), jnp.bfloat16), *operands, *([None] * (3 - len(operands))), fmt, k, group, b)
            assert b.block_m >= min(m, 64) and (fmt == "int8" or b.block_k % group == 0)


def test_leading_dims_and_empty_batch():
    qw, s, _ = weight("int8", 40, 64, 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 64)), jnp.bfloat16)
    got = qm.quant_matmul(x, qw, s, fmt="int8", in_features=64, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(qm.quant_matmul_reference(x, qw, s, fmt="int8", in_features=64), np.float32),
                               rtol=8e-3, atol=1e-2)
    assert qm.quant_matmul(x[:0], qw, s, fmt="int8", in_features=64).shape == (0, 3, 40)


def test_int4_packing_layout_by_hand():
    # group 32: byte j holds k = j (low nibble) and k = j + 16 (high nibble) of its group
    q = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16  # two groups
    packed = np.asarray(qm.pack_int4_groups(jnp.asarray(q), 32))
    assert packed.shape == (1, 32)
    assert packed[0, 0] == q[0, 0] | (q[0, 16] << 4) == 0x00
    assert packed[0, 1] == 0x01 | (0x1 << 4)  # k=1 -> 1, k=17 -> 17 % 16 = 1
    assert packed[0, 16] == q[0, 32] | (q[0, 48] << 4)
    np.testing.assert_array_equal(np.asarray(qm.unpack_int4_groups(jnp.asarray(packed), 32)), q)
    # dequantize: (q - z) * s per group
    w = qm.dequantize_reference(jnp.asarray(packed), jnp.asarray([[0.5, 2.0]], jnp.float32),
                                jnp.asarray([[8, 0]], jnp.uint8), fmt="int4", in_features=40, group_size=32)
    np.testing.assert_array_equal(np.asarray(w)[0], np.concatenate([(q[0, :32] - 8.0) * 0.5, q[0, 32:40] * 2.0]))


def test_bad_arguments():
    qw, s, z = weight("int4", 32, 256, 0)
    x = jnp.zeros((1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="fmt must be one of"):
        qm.quant_matmul(x, qw, s, z, fmt="int3", in_features=256)
    with pytest.raises(ValueError, match="x must end in in_features=128"):
        qm.quant_matmul(x, qw, s, z, fmt="int4", in_features=128)
    with pytest.raises(ValueError, match="int4 zeros must be uint8"):
        qm.quant_matmul(x, qw, s, None, fmt="int4", in_features=256)
    with pytest.raises(ValueError, match="int8 qweight must be int8"):
        qm.quant_matmul(x, qw, s, fmt="int8", in_features=256)
    with pytest.raises(ValueError, match="block_k must be a multiple of group_size 128"):
        qm.quant_matmul(x, qw, s, z, fmt="int4", in_features=256, block=qm.QuantMatmulBlock(block_k=64))
    with pytest.raises(ValueError, match="block_k must be a multiple of group_size 128"):
        qm.quant_matmul(x, *weight("fp8", 32, 256, 0)[:2], fmt="fp8", in_features=256,
                        block=qm.QuantMatmulBlock(block_k=32))
    with pytest.raises(ValueError, match="block.block_k must be a power of two"):
        qm.quant_matmul(x, qw, s, z, fmt="int4", in_features=256, block=qm.QuantMatmulBlock(block_k=384))
    with pytest.raises(ValueError, match="x must be bfloat16"):
        qm.quant_matmul(x.astype(jnp.int32), qw, s, z, fmt="int4", in_features=256)


def operand_avals(fmt, n, k, group=128):
    g = -(-k // group)
    if fmt == "int8":
        return S((n, k), jnp.int8), S((n,), jnp.bfloat16)
    if fmt == "int4":
        return S((n, g * group // 2), jnp.uint8), S((n, g), jnp.bfloat16), S((n, g), jnp.uint8)
    return S((n, k), jnp.float8_e4m3fn), S((n, g), jnp.float32)


@pytest.mark.parametrize("fmt", qm.FORMATS)
def test_lowers_to_triton(fmt, monkeypatch):
    """Qwen3-0.6B's qkv [4096, 1024] and 8B's down_proj [4096, 12288], batch 1 and 64, default tiling and steps of
    128 and 512 input channels: the Triton lowering (what interpret mode does not run) accepts the kernel, as
    test_gpu_lowering.py checks the other kernels."""
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    steps = [qm.QuantMatmulBlock(block_m=16, block_n=64, block_k=bk, num_splits=2) for bk in (128, 512)]
    for n, k in [(4096, 1024), (4096, 12288)]:
        for m, block in [(1, None), (64, None)] + [(1, b) for b in steps]:
            fn = functools.partial(qm.quant_matmul, fmt=fmt, in_features=k, block=block)
            text = jax.jit(fn).trace(S((m, k), jnp.bfloat16), *operand_avals(fmt, n, k)).lower(
                lowering_platforms=("cuda",)).as_text()
            assert "@__gpu$xla.gpu.triton" in text
