"""Every Pallas kernel lowers to Triton IR for an H100, on a machine without a GPU.

Interpret mode (the CPU tests) runs a kernel's jaxpr, not the Triton lowering, so an op the lowering does not
support (or a shape mismatch only Triton checks) would first fail on the GPU. Lowering for "cuda" with the GPU
info pinned to an H100 runs jax's Pallas-to-Triton lowering here; only ptxas compilation needs the GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import gpu_info  # private: jax is pinned (requirements), so this cannot drift

from pallas_kernels import paged_attention as paged
from pallas_kernels.attention import attention
from pallas_kernels.decode_attention import Block, decode_attention, decode_attention_qkv
from pallas_kernels.qkv_rope import qkv_rope
from pallas_kernels.rms_norm import rms_norm

S = jax.ShapeDtypeStruct


@pytest.fixture(autouse=True)
def h100(monkeypatch):
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))


def lowers(fn, *avals):
    text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "@__gpu$xla.gpu.triton" in text  # a Triton custom call: the kernel went through the Triton lowering


def qkv_avals(batch, seq, hq, kv, d, cache_len, dtype):
    return (S((batch, seq, (hq + 2 * kv) * d), dtype), S((d,), dtype), S((d,), dtype), S((d // 2,), jnp.float32),
            S((batch, seq), jnp.int32), S((batch, kv, cache_len, d), dtype), S((batch, kv, cache_len, d), dtype))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(1, 1024), (8192, 4096), (7, 5120)])
def test_rms_norm_lowers(shape, dtype):
    x, w = S(shape, dtype), S(shape[-1:], dtype)
    lowers(functools.partial(rms_norm, eps=1e-6), x, w)
    lowers(lambda x, w, r: rms_norm(x, w, eps=1e-6, residual=r), x, w, x)


@pytest.mark.parametrize("batch,seq,hq,kv", [(1, 1, 16, 8), (8, 1, 32, 8), (1, 2048, 32, 8)])
def test_qkv_rope_lowers(batch, seq, hq, kv):
    fn = functools.partial(qkv_rope, num_heads=hq, num_kv_heads=kv, head_dim=128, eps=1e-6)
    lowers(lambda *a: fn(*a[:5], k_cache=a[5], v_cache=a[6]), *qkv_avals(batch, seq, hq, kv, 128, 4096,
                                                                            jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_attention_lowers(dtype):
    cache = S((1, 8, 4096, 128), dtype)
    lowers(attention, S((1, 2048, 32, 128), dtype), cache, cache, S((1,), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("batch,hq,block", [(1, 16, None), (8, 32, None), (1, 40, Block(num_splits=4))])
def test_decode_attention_lowers(batch, hq, block, dtype):
    cache = S((batch, 8, 8192, 128), dtype)
    lowers(functools.partial(decode_attention, block=block), S((batch, hq, 128), dtype), cache, cache,
           S((batch,), jnp.int32))
    fn = functools.partial(decode_attention_qkv, num_heads=hq, num_kv_heads=8, head_dim=128, eps=1e-6, block=block)
    lowers(fn, *qkv_avals(batch, 1, hq, 8, 128, 8192, dtype))


# Paged kernels: a pool of 1000 blocks and tables 129 blocks wide (neither a power of two: only the loaded tiles
# must be), block ids loaded from the table in-kernel.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("batch,hq,block", [(1, 16, None), (8, 32, None), (64, 32, paged.Block(num_splits=1)),
                                            (1, 40, paged.Block(num_splits=4))])
def test_paged_decode_attention_lowers(batch, hq, block, dtype):
    pool, table = S((1000, 8, 64, 128), dtype), S((batch, 129), jnp.int32)
    lowers(functools.partial(paged.paged_decode_attention, block=block), S((batch, hq, 128), dtype), pool, pool, table,
           S((batch,), jnp.int32))
    fn = functools.partial(paged.paged_decode_attention_qkv, num_heads=hq, num_kv_heads=8, head_dim=128, eps=1e-6,
                           block=block)
    lowers(fn, *qkv_avals(batch, 1, hq, 8, 128, 1, dtype)[:5], pool, pool, table)  # (qkv_rope's avals, no caches)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("hq,block_size", [(32, 64), (16, 16), (40, 32)])
def test_paged_prefill_attention_lowers(hq, block_size, dtype):
    pool = S((1000, 8, block_size, 128), dtype)
    lowers(paged.paged_prefill_attention, S((2048, hq, 128), dtype), pool, pool, S((3, 129), jnp.int32),
           S((4,), jnp.int32), S((3,), jnp.int32))
