"""Paged attention (prefill, decode, fused decode step): Pallas kernels vs their jnp references, the references vs
float64 numpy, and the pure pieces the kernels rely on (the run-time split rule, the prefill work list)."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import INTERPRET
from test_attention import assert_close  # same tolerances as the contiguous kernels
from test_qkv_rope import EPS, KERNEL_TOLERANCE, numpy_norm_rope
from test_qkv_rope import make_inputs as make_qkv_inputs
from test_rms_norm import assert_ulp_close, f64
from pallas_kernels import decode_attention
from pallas_kernels.attention import attention_reference
from pallas_kernels.paged_attention import (_MAX_SPLITS, Block, _combine, _split_blocks, _static_splits, _work_list,
                                            paged_decode_attention, paged_decode_attention_qkv,
                                            paged_decode_attention_qkv_reference, paged_decode_attention_reference,
                                            paged_prefill_attention, paged_prefill_attention_reference)

# Jitted (as the model runs them): one compile per shape, not a compile per eager op of the wrappers.
decode = jax.jit(paged_decode_attention, static_argnames=("block", "interpret"))
prefill = jax.jit(paged_prefill_attention, static_argnames=("block", "interpret"))
decode_reference = jax.jit(paged_decode_attention_reference)
prefill_reference = jax.jit(paged_prefill_attention_reference)
GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)


def make_pool(seed, lens, bs, KV, D, dtype, *, alloc=None, spare_blocks=3, extra_width=1):
    """k/v pools [NB, KV, bs, D] and block tables [S, M] for sequences holding lens[s] valid positions (in blocks
    enough for alloc[s] >= lens[s] positions). Blocks are handed out in shuffled order; table entries past a
    sequence's blocks hold random valid ids (often of poisoned blocks); every slot that is not a valid position
    of a live sequence (spare blocks, slots past a length, the slot a decode step writes) holds NaN / inf / 1e30."""
    rng = np.random.default_rng(seed)
    alloc = lens if alloc is None else alloc
    need = [-(-a // bs) for a in alloc]
    num_blocks = sum(need) + spare_blocks
    width = max(max(need), 1) + extra_width
    ids = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, (len(lens), width))
    valid = np.zeros((num_blocks, bs), bool)
    used = 0
    for s, (n, length) in enumerate(zip(need, lens)):
        tables[s, :n] = ids[used:used + n]
        used += n
        p = np.arange(length)
        valid[tables[s, p // bs], p % bs] = True
    junk = np.resize(GARBAGE, (num_blocks, bs))[:, None, :, None]
    ok = valid[:, None, :, None]
    k = np.where(ok, rng.standard_normal((num_blocks, KV, bs, D), np.float32), junk)
    v = np.where(ok, rng.standard_normal((num_blocks, KV, bs, D), np.float32), junk[:, :, ::-1])
    return jnp.asarray(k).astype(dtype), jnp.asarray(v).astype(dtype), jnp.asarray(tables, jnp.int32)


def bits(x):
    """The raw bits of an array (NaN payloads included) as unsigned integers."""
    a = np.asarray(x)
    return a.view(f"u{a.dtype.itemsize}")


def random_q(seed, N, Hq, D, dtype):
    return jnp.asarray(np.random.default_rng(seed + 7).standard_normal((N, Hq, D), np.float32).astype(dtype))


def naive_paged_f64(q, k_pool, v_pool, tables, pos):
    """Float64 numpy: query row r of q [R, Hq, D] at position pos[r] (-1: padding, zeros) attends to positions
    0..pos[r] read through its own table row tables[r]; query head h uses kv head h // G."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k_pool, v_pool))
    tables, pos = np.asarray(tables), np.asarray(pos)
    R, Hq, D = q.shape
    bs, G = k.shape[2], Hq // k.shape[1]
    out = np.zeros_like(q)
    for r in range(R):
        if pos[r] < 0:
            continue
        p = np.arange(pos[r] + 1)
        blocks, offs = tables[r, p // bs], p % bs
        kk = np.repeat(k[blocks, :, offs], G, axis=1)  # [n, Hq, D]
        vv = np.repeat(v[blocks, :, offs], G, axis=1)
        s = np.einsum("hd,nhd->hn", q[r], kk) * D**-0.5
        w = np.exp(s - s.max(-1, keepdims=True))
        out[r] = np.einsum("hn,nhd->hd", w / w.sum(-1, keepdims=True), vv)
    return out


def prefill_rows(q_lens, seq_lens, pad):
    """query_start [S + 1], and per flattened token its sequence and position (-1 for the `pad` padding tokens)."""
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq = np.concatenate([np.full(n, s) for s, n in enumerate(q_lens)] + [np.full(pad, -1)]).astype(int)
    pos = np.concatenate([np.arange(L - n, L) for n, L in zip(q_lens, seq_lens)] + [np.full(pad, -1)]).astype(int)
    return query_start, seq, pos


# ------------------------------------------------------------------------------------------------------ decode
# (Hq, KV, D, bs, lens, dtype, block): a padding row (0), length 1, exact multiples of bs, GQA ratios 1/2/4/5/8
# (G < 16 pads the q tile), head_dim 64/128, block sizes 16/32/64, f32/bf16; the auto split count (several
# splits: few rows), explicit counts with empty splits, and one split (the kernel normalises, no combine).
DECODE_CASES = [
    (8, 2, 64, 16, [1, 0, 77, 48], jnp.float32, None),  # G=4, auto: up to 6 one-block splits
    (8, 1, 64, 16, [33, 16, 1], jnp.float32, Block(num_splits=2)),  # G=8, blocks split 3 + 2
    (4, 4, 128, 32, [64, 0, 5], jnp.float32, Block(num_splits=1)),  # MHA, one split: padding row -> zeros
    (10, 2, 64, 32, [96, 40, 1], jnp.bfloat16, Block(num_splits=5)),  # G=5, empty splits
    (4, 2, 128, 64, [128, 1, 0, 100], jnp.bfloat16, None),  # G=2, bs 64
]


@pytest.mark.parametrize("Hq,KV,D,bs,lens,dtype,block", DECODE_CASES)
def test_paged_decode_matches_reference(Hq, KV, D, bs, lens, dtype, block):
    k, v, tables = make_pool(len(lens) * bs + Hq, lens, bs, KV, D, dtype)
    q, seq_lens = random_q(Hq, len(lens), Hq, D, dtype), jnp.asarray(lens, jnp.int32)
    out = decode(q, k, v, tables, seq_lens, block=block, interpret=INTERPRET)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, decode_reference(q, k, v, tables, seq_lens), dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[np.asarray(lens) == 0], 0)


@pytest.mark.parametrize("Hq,KV,dtype,tol", [(8, 2, jnp.float32, 1e-5), (8, 1, jnp.bfloat16, 2e-2)])
def test_decode_reference_matches_float64_numpy(Hq, KV, dtype, tol):
    lens = [1, 16, 29, 0]
    k, v, tables = make_pool(Hq + KV, lens, 16, KV, 16, dtype)
    q = random_q(KV, len(lens), Hq, 16, dtype)
    ref = np.asarray(decode_reference(q, k, v, tables, jnp.asarray(lens, jnp.int32)), np.float64)
    assert np.isfinite(ref).all()
    want = naive_paged_f64(q, k, v, tables, np.asarray(lens) - 1)
    np.testing.assert_allclose(ref, want, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ fused decode step
def check_fused(seed, Hq, KV, D, bs, positions, dtype, block, norm_scale=1.0):
    """paged_decode_attention_qkv, jitted with the pools donated as the model runs it, against its reference
    (qkv_rope_reference, the pool write, the paged decode reference): the pools aliased (updated in place); o within
    the attention tolerances, zeros for padding rows (position -1); the pools bit-identical except at each live
    row's slot, where k is within the qkv_rope kernel's ulp bounds and v is the projection's v exactly. The slot
    being written and every slot past it hold garbage beforehand."""
    dims = dict(num_heads=Hq, num_kv_heads=KV, head_dim=D, eps=EPS)
    B = len(positions)
    qkv, q_norm, k_norm, inv_freq, pos = make_qkv_inputs(seed, B, 1, Hq, KV, D, dtype, starts=positions)
    q_norm, k_norm = (w * (norm_scale / 100) for w in (q_norm, k_norm))  # drawn up to +-100
    p = np.asarray(positions)
    k_pool, v_pool, tables = make_pool(seed, np.maximum(p, 0), bs, KV, D, dtype, alloc=p + 1)
    args = (qkv, q_norm, k_norm, inv_freq, pos, k_pool, v_pool, tables)
    ref_o, ref_kp, _ = jax.jit(lambda *a: paged_decode_attention_qkv_reference(*a, **dims))(*args)
    before = bits(k_pool.copy()), bits(v_pool.copy())  # (a numpy view of a pool itself would block its donation)

    def step(*a):
        return paged_decode_attention_qkv(*a, **dims, block=block, interpret=INTERPRET)

    compiled = jax.jit(step, donate_argnums=(5, 6)).lower(*args).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == k_pool.nbytes + v_pool.nbytes
    o, kp, vp = compiled(*args)
    assert k_pool.is_deleted() and v_pool.is_deleted()
    assert o.shape == (B, Hq, D) and o.dtype == dtype
    assert_close(o, ref_o, dtype)
    np.testing.assert_array_equal(np.asarray(o, np.float32)[p < 0], 0)

    _, (_, k_scale, _) = numpy_norm_rope(qkv, q_norm, k_norm, inv_freq, pos, **dims)  # ulp scale of k
    live = np.nonzero(p >= 0)[0]
    blocks, offs = np.asarray(tables)[live, p[live] // bs], p[live] % bs
    written = np.zeros(kp.shape, bool)
    written[blocks, :, offs] = True
    for got, old in zip((kp, vp), before):
        np.testing.assert_array_equal(bits(got)[~written], old[~written])  # untouched: bit-identical, garbage too
    assert_ulp_close(f64(kp)[blocks, :, offs], f64(ref_kp)[blocks, :, offs], k_scale[live, 0], dtype,
                     **KERNEL_TOLERANCE[jnp.dtype(dtype)])
    new_v = f64(qkv)[:, 0, (Hq + KV) * D:].reshape(B, KV, D)
    np.testing.assert_array_equal(f64(vp)[blocks, :, offs], new_v[live])


# (Hq, KV, D, bs, positions, dtype, block, norm_scale): position 0, a padding row (-1), the first and last slot
# of a block, GQA ratios 1/4/8 (the k row takes a padding row of the tile), auto / explicit splits; norm weights
# ~100 as in real checkpoints (k_norm reaches ~96): the pool write stays within ulps, o stays finite.
FUSED_CASES = [
    (8, 2, 64, 16, [0, 47, -1, 16], jnp.float32, None, 1.0),  # G=4, auto splits; new token alone in its block
    (8, 1, 128, 32, [31, 70, 5], jnp.bfloat16, Block(num_splits=1), 100.0),  # G=8, one split
    (4, 4, 64, 64, [64, -1, 127], jnp.bfloat16, Block(num_splits=3), 1.0),  # MHA, bs 64
]


@pytest.mark.parametrize("Hq,KV,D,bs,positions,dtype,block,norm_scale", FUSED_CASES)
def test_paged_decode_qkv_matches_reference(Hq, KV, D, bs, positions, dtype, block, norm_scale):
    check_fused(len(positions) * bs + Hq, Hq, KV, D, bs, positions, dtype, block, norm_scale)


# ----------------------------------------------------------------------------------------------------- prefill
# (Hq, KV, D, bs, q_lens, seq_lens, pad, dtype, block): ragged chunks (1 token, exact multiples of bs, a chunk
# over several query blocks, chunked prefill after a cached prefix, a whole prompt), padding tokens past
# query_start[-1], GQA ratios 1/2/5/8, head_dim 64/128, block sizes 16/32/64, f32/bf16.
PREFILL_CASES = [
    (10, 2, 64, 16, [5, 1, 32, 14], [5, 40, 32, 30], 3, jnp.float32, None),  # G=5: heads padded to 8 rows
    (8, 1, 64, 32, [17, 1, 9], [17, 64, 70], 0, jnp.float32, Block(block_q=2)),  # G=8, many items
    (4, 4, 128, 32, [33, 1], [33, 96], 1, jnp.bfloat16, None),  # MHA
    (4, 2, 64, 64, [64, 0, 20, 1], [64, 10, 90, 1], 4, jnp.bfloat16, Block(block_q=8)),  # G=2, bs 64, no-query seq
]


@pytest.mark.parametrize("Hq,KV,D,bs,q_lens,seq_lens,pad,dtype,block", PREFILL_CASES)
def test_paged_prefill_matches_reference(Hq, KV, D, bs, q_lens, seq_lens, pad, dtype, block):
    query_start, _, pos = prefill_rows(q_lens, seq_lens, pad)
    k, v, tables = make_pool(sum(seq_lens) + Hq, seq_lens, bs, KV, D, dtype)
    q = random_q(bs + D, len(pos), Hq, D, dtype)
    args = (q, k, v, tables, jnp.asarray(query_start), jnp.asarray(seq_lens, jnp.int32))
    out = prefill(*args, block=block, interpret=INTERPRET)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, prefill_reference(*args), dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[pos < 0], 0)


@pytest.mark.parametrize("Hq,KV,dtype,tol", [(8, 2, jnp.float32, 1e-5), (8, 1, jnp.bfloat16, 2e-2)])
def test_prefill_reference_matches_float64_numpy(Hq, KV, dtype, tol):
    q_lens, seq_lens = [5, 1, 16], [5, 20, 33]
    query_start, seq, pos = prefill_rows(q_lens, seq_lens, 2)
    k, v, tables = make_pool(Hq * 3 + KV, seq_lens, 16, KV, 16, dtype)
    q = random_q(Hq, len(pos), Hq, 16, dtype)
    ref = np.asarray(prefill_reference(q, k, v, tables, jnp.asarray(query_start), jnp.asarray(seq_lens, jnp.int32)),
                     np.float64)
    assert np.isfinite(ref).all()
    want = naive_paged_f64(q, k, v, np.asarray(tables)[np.maximum(seq, 0)], pos)
    np.testing.assert_allclose(ref, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("block_q", [1, 4, 16])
def test_work_list_covers_every_token_once(block_q):
    """The prefill work list: every real token in exactly one item (of <= block_q rows, at its own position),
    within the grid's static bound cdiv(N, block_q) + S, heaviest items first, empty items last."""
    q_lens, seq_lens, pad = [5, 0, 1, 16, 33, 4], [9, 3, 1, 16, 40, 100], 6
    query_start, seq, pos = prefill_rows(q_lens, seq_lens, pad)
    N, S = len(pos), len(q_lens)
    work_list = jax.jit(_work_list, static_argnums=(2, 3))
    items = [np.asarray(x) for x in work_list(jnp.asarray(query_start), jnp.asarray(seq_lens, jnp.int32), block_q,
                                              -(-N // block_q) + S)]
    seen = np.zeros(N, int)
    for s, row0, count, pos0 in zip(*items):
        assert 0 <= count <= block_q
        rows = np.arange(row0, row0 + count)
        seen[rows] += 1
        np.testing.assert_array_equal(seq[rows], s)
        np.testing.assert_array_equal(pos[rows], pos0 + np.arange(count))
    np.testing.assert_array_equal(seen, pos >= 0)
    work = np.where(items[2] > 0, items[3] + items[2], -1)
    assert (np.diff(work) <= 0).all()


def test_combine_zeros_rows_without_keys():
    """The split combine: a row whose splits are all empty (padding) gives exact zeros, inside the combine itself
    (no select over the output); live rows, empty splits among them, match the contiguous kernel's combine."""
    rng = np.random.default_rng(0)
    B, KV, splits, G, D = 3, 2, 5, 4, 16
    acc = rng.standard_normal((B, KV, splits, G, D)).astype(np.float32)
    m = rng.standard_normal((B, KV, splits, G)).astype(np.float32)
    l = rng.uniform(1, 3, (B, KV, splits, G)).astype(np.float32)
    empty = np.zeros((B, splits), bool)
    empty[0, 3:] = True  # a live row with empty trailing splits
    empty[1] = True  # a padding row: every split empty
    e = empty[:, None, :, None]
    acc, m, l = np.where(e[..., None], 0, acc), np.where(e, -np.inf, m), np.where(e, 0, l)
    outs = tuple(jnp.asarray(x) for x in (acc, m, l))
    got = np.asarray(jax.jit(_combine, static_argnums=1)(outs, jnp.float32))
    np.testing.assert_array_equal(bits(got[1]), 0)  # +0.0 exactly, no NaN
    want = np.asarray(jax.jit(decode_attention._combine, static_argnums=1)(outs, jnp.float32))
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-6)


# ----------------------------------------------------------------------------------------------- split rule
@pytest.mark.parametrize("splits", [1, 2, 3, 6, 7, 33, 132])
def test_split_rule_covers_every_block_once(splits):
    """The run-time rule (the kernels' own helper): for every row length in blocks, the splits take whole blocks
    in order, every block exactly once, the non-empty splits first, at most `splits` of them."""
    n = np.arange(700)[:, None]
    first, last = (np.asarray(x) for x in _split_blocks(n, np.arange(splits)[None, :], splits))
    count = np.maximum(last - first, 0)  # [n, splits]
    np.testing.assert_array_equal(count.sum(axis=1), n[:, 0])
    starts = np.cumsum(count, axis=1) - count
    np.testing.assert_array_equal(np.where(count > 0, first, starts), starts)  # contiguous, in order
    assert ((count[:, 1:] > 0) <= (count[:, :-1] > 0)).all()  # the empty splits are the last ones


@pytest.mark.parametrize("B,KV,max_blocks", [(1, 8, 128), (8, 8, 128), (64, 8, 128), (1, 1, 640), (2, 8, 20),
                                             (1, 8, 640), (2, 8, 640), (256, 8, 640)])
def test_split_rule_matches_contiguous_tuning(B, KV, max_blocks):
    """Paged decode over a row of n blocks splits as `decode_attention` does over a cache of n * bs slots with
    block_k = bs, its split count capped at the grid's static count: the same number of non-empty splits and blocks
    per split, whatever the table width. The static count is the auto rule's for the table's width, capped at
    _MAX_SPLITS (batch 1, 640 blocks, 8 kv heads: 16, not 33)."""
    bs = 64
    static = _static_splits(Block(), B, KV, max_blocks, bs)
    auto = decode_attention._num_splits(decode_attention.Block(), B, KV, max_blocks * bs, bs)
    assert static == min(auto, _MAX_SPLITS)
    for n in range(1, max_blocks + 1):
        auto = decode_attention._tiling(decode_attention.Block(block_k=bs), B, KV, n * bs, 3)[2]
        contiguous = decode_attention.Block(block_k=bs, num_splits=min(auto, static))
        _, block_k, splits, chunk = decode_attention._tiling(contiguous, B, KV, n * bs, 3)
        first, last = (np.asarray(x) for x in _split_blocks(n, np.arange(static), static))
        count = np.maximum(last - first, 0)
        assert (count > 0).sum() == splits and count.max() == chunk // block_k, n


def test_static_splits():
    """The grid's split count: explicit counts kept (at most one per table block), auto capped at _MAX_SPLITS."""
    assert _static_splits(Block(), 1, 8, 640, 64) == _MAX_SPLITS == 16
    assert _static_splits(Block(), 1, 8, 3, 64) == 3
    assert _static_splits(Block(), 8, 8, 640, 64) == 5
    assert _static_splits(Block(), 256, 8, 640, 64) == 1
    assert _static_splits(Block(num_splits=33), 1, 8, 640, 64) == 33
    assert _static_splits(Block(num_splits=33), 1, 8, 20, 64) == 20


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_arguments_raise():
    q, pool = jnp.ones((2, 8, 64), jnp.float32), jnp.ones((6, 2, 16, 64), jnp.float32)
    tables, lens = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    bad_decode = functools.partial(paged_decode_attention, interpret=True)
    with pytest.raises(ValueError, match="multiple"):
        bad_decode(jnp.ones((2, 5, 64)), pool, pool, tables, lens)
    with pytest.raises(ValueError, match="head_dim"):
        bad_decode(jnp.ones((2, 8, 32)), pool, pool, tables, lens)
    with pytest.raises(ValueError, match="v_pool"):
        bad_decode(q, pool, pool[:, :, :8], tables, lens)
    with pytest.raises(ValueError, match="block_tables"):
        bad_decode(q, pool, pool, tables[:1], lens)
    with pytest.raises(ValueError, match="seq_lens"):
        bad_decode(q, pool, pool, tables, lens.astype(jnp.float32))
    with pytest.raises(ValueError, match="dtype"):
        bad_decode(q.astype(jnp.bfloat16), pool, pool, tables, lens)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        bad_decode(q, pool[:, :, :12], pool[:, :, :12], tables, lens)
    with pytest.raises(ValueError, match="power of two"):  # head_dim
        bad_decode(jnp.ones((2, 8, 24)), jnp.ones((6, 2, 16, 24)), jnp.ones((6, 2, 16, 24)), tables, lens)

    with pytest.raises(ValueError, match="query_start"):
        paged_prefill_attention(q, pool, pool, tables, jnp.zeros((2,), jnp.int32), lens, interpret=True)
    with pytest.raises(ValueError, match="q must be"):
        paged_prefill_attention(q[None], pool, pool, tables, jnp.zeros((3,), jnp.int32), lens, interpret=True)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        paged_prefill_attention(q, pool, pool, tables, jnp.zeros((3,), jnp.int32), lens, block=Block(block_q=3),
                                interpret=True)

    dims = dict(num_heads=8, num_kv_heads=2, head_dim=64, eps=EPS)
    qkv, q_norm, k_norm, inv_freq, pos = make_qkv_inputs(0, 2, 2, 8, 2, 64, jnp.float32, starts=(0, 3))
    with pytest.raises(ValueError, match="one token per row"):
        paged_decode_attention_qkv(qkv, q_norm, k_norm, inv_freq, pos, pool, pool, tables, **dims, interpret=True)
    with pytest.raises(ValueError, match="one token per row"):
        paged_decode_attention_qkv_reference(qkv, q_norm, k_norm, inv_freq, pos, pool, pool, tables, **dims)
    one = (qkv[:, :1], q_norm, k_norm, inv_freq, pos[:, :1])
    with pytest.raises(ValueError, match="kv heads"):
        paged_decode_attention_qkv(*one, pool[:, :1], pool[:, :1], tables, **dims, interpret=True)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention_qkv(*one, pool, pool, tables[:1], **dims, interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention_qkv(*one, pool.astype(jnp.bfloat16), pool.astype(jnp.bfloat16), tables, **dims,
                                   interpret=True)


# --------------------------------------------------------------------------------------------- GPU, real shapes
LONG = [1, 8192, 4097, 100, 8000, 2048, 8191, 513]


def gpu_lens(batch, seed):
    """Row lengths up to 8k: the long mix above at batch 8, one long row at batch 1, random at batch 64."""
    if batch == 1:
        return [6000]
    if batch == 8:
        return LONG
    return list(np.random.default_rng(seed).integers(1, 8193, batch))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("Hq,KV", [(32, 8), (16, 8)])
def test_paged_decode_gpu(batch, Hq, KV):
    lens = gpu_lens(batch, Hq)
    k, v, tables = make_pool(batch, lens, 64, KV, 128, jnp.bfloat16, extra_width=8)
    q, seq_lens = random_q(batch, batch, Hq, 128, jnp.bfloat16), jnp.asarray(lens, jnp.int32)
    out = decode(q, k, v, tables, seq_lens)
    assert_close(out, decode_reference(q, k, v, tables, seq_lens), jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_paged_decode_qkv_gpu(batch):
    """Qwen3-8B heads, positions up to 8k (block boundaries included), a padding row at batch 64."""
    positions = [p - 1 for p in gpu_lens(batch, 3)]
    if batch == 64:
        positions[5] = -1
    check_fused(batch, 32, 8, 128, 64, positions, jnp.bfloat16, None)


@pytest.mark.gpu
def test_paged_decode_qkv_gpu_small_model():
    """Qwen3-0.6B heads with norm weights ~100; Qwen3-8B heads in f32."""
    check_fused(1, 16, 8, 128, 64, [4095, 17, 64, 0], jnp.bfloat16, None, norm_scale=100.0)
    check_fused(2, 32, 8, 128, 64, [8191, 63, 3000], jnp.float32, None)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,KV,dtype", [(32, 8, jnp.bfloat16), (16, 8, jnp.bfloat16), (32, 8, jnp.float32)])
def test_paged_prefill_gpu(Hq, KV, dtype):
    """A whole 4k prompt, chunked-prefill chunks after long cached prefixes (up to 8k), one-token chunks, padding;
    checked per sequence against the contiguous attention reference (the paged reference would gather every
    token's context: N * L * KV * D values)."""
    q_lens, seq_lens, pad = [4096, 1, 700, 333, 1], [4096, 3000, 700, 8192, 5000], 7
    query_start, _, pos = prefill_rows(q_lens, seq_lens, pad)
    k, v, tables = make_pool(0, seq_lens, 64, KV, 128, dtype)
    q = random_q(0, len(pos), Hq, 128, dtype)
    out = prefill(q, k, v, tables, jnp.asarray(query_start), jnp.asarray(seq_lens, jnp.int32))
    out = np.asarray(out, np.float32)
    for s, (a, b) in enumerate(zip(query_start[:-1], query_start[1:])):
        blocks = np.asarray(tables)[s, :-(-seq_lens[s] // 64)]
        ks, vs = (jnp.swapaxes(p[blocks], 0, 1).reshape(1, KV, -1, 128) for p in (k, v))  # [1, KV, L, D]
        ref = jax.jit(attention_reference)(q[None, a:b], ks, vs, jnp.asarray([seq_lens[s] - (b - a)], jnp.int32))
        assert_close(out[a:b], ref[0], dtype)
    np.testing.assert_array_equal(out[query_start[-1]:], 0)
