"""KV block accounting: reference counts, chained prefix hashes, LRU eviction; and after 1,000 random requests
through an engine (aborts, preemptions, shared prefixes) every block is free and every cached block holds the
keys and values of the tokens its hash names."""

import collections
import functools

import jax
import numpy as np
import pytest

import qwen3_jax as q
from qwen3_jax import block_manager
from qwen3_jax.block_manager import BlockManager, NoFreeBlocksError, chain_hash
from qwen3_jax.weights import random_params

BS = 16


def tokens(*starts):
    """Full blocks of consecutive ids, one block per start value."""
    return [t for s in starts for t in range(s, s + BS)]


def run(bm, ids, *, max_cached=None):
    """Allocate a sequence for `ids` as the scheduler does and register its full blocks -> (table, cached)."""
    max_cached = len(ids) // BS if max_cached is None else max_cached
    table, cached = bm.allocate(ids, len(ids), max_cached=max_cached)
    bm.cache_full_blocks(table, ids, len(ids), [])
    return table, cached


def free_list(bm):
    return list(bm._free)


def test_a_block_hits_only_after_the_same_prefix():
    bm = BlockManager(8, BS)
    (a0, a1), _ = run(bm, tokens(0, 100))
    assert bm.cached_prefix(tokens(0, 100, 200)) == [a0, a1]
    assert bm.cached_prefix(tokens(0, 300)) == [a0]
    assert bm.cached_prefix(tokens(50, 100)) == []  # block 100's tokens, after another first block: no hit
    assert bm.cached_prefix(tokens(0)[:-1]) == []  # a partial block never hits
    table, cached = run(bm, tokens(0, 100, 200), max_cached=1)
    assert table[0] == a0 and a1 not in table and cached == BS  # max_cached caps the hit
    assert bm.hits == 1 and bm.queries == 2 + 3


def test_a_hash_collision_never_hands_out_another_block(monkeypatch):
    monkeypatch.setattr(block_manager, "chain_hash", lambda previous, toks: 0)  # every block collides
    bm = BlockManager(4, BS)
    (a0,), _ = run(bm, tokens(0))
    assert bm.cached_prefix(tokens(0)) == [a0]
    assert bm.cached_prefix(tokens(1)) == []  # same hash, other tokens


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(6, BS)
    a, _ = run(bm, tokens(0, 100))
    b, cached = run(bm, tokens(0, 100, 200))
    assert b[:2] == a and cached == 2 * BS
    assert [bm.blocks[i].ref_count for i in b] == [2, 2, 1] and bm.num_free_blocks == 3
    bm.free(a)
    assert a == [] and [bm.blocks[i].ref_count for i in b] == [1, 1, 1] and bm.num_free_blocks == 3
    shared = list(b)
    bm.free(b)
    assert all(bm.blocks[i].ref_count == 0 for i in shared) and bm.num_free_blocks == 6
    assert bm.num_cached_blocks == 3  # freed blocks keep their prefix until evicted


def test_eviction_takes_least_recently_freed_blocks_tail_first():
    bm = BlockManager(4, BS)
    old, _ = run(bm, tokens(500))
    old_ids = list(old)
    a, _ = run(bm, tokens(0, 100, 200))
    a_ids = list(a)
    bm.free(old)
    bm.free(a)
    assert free_list(bm) == old_ids + a_ids[::-1]  # freed earlier first; a sequence's tail before its head
    order = []
    for i in range(4):
        (block,), _ = bm.allocate(tokens(1000 + i), BS, max_cached=0)
        order.append(block)
        if i == 1:  # the tail went first: the head of `a` still hits
            assert bm.cached_prefix(tokens(0, 100, 200)) == a_ids[:2]
    assert order == old_ids + a_ids[::-1]
    assert bm.cached_prefix(tokens(0)) == [] and bm.num_cached_blocks == 0


def test_a_hit_on_a_free_cached_block_takes_it_off_the_free_list():
    bm = BlockManager(4, BS)
    a, _ = run(bm, tokens(0, 100))
    head = a[0]
    bm.free(a)
    assert bm.blocks_to_allocate(tokens(0, 300), 2 * BS, max_cached=1) == 2  # the idle hit leaves the free list
    table, cached = bm.allocate(tokens(0, 300), 2 * BS, max_cached=1)
    assert table[0] == head and cached == BS
    assert bm.blocks[head].ref_count == 1 and head not in free_list(bm) and bm.num_free_blocks == 2
    rest, _ = bm.allocate(tokens(600, 700), 2 * BS, max_cached=0)  # the last two free blocks: never the hit one
    assert head not in rest and bm.num_free_blocks == 0


def test_freeing_twice_and_running_out_raise():
    bm = BlockManager(3, BS)
    a, _ = run(bm, tokens(0, 100))
    ids = list(a)
    bm.free(a)
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(ids)
    b, _ = bm.allocate(tokens(5, 6, 7), 3 * BS, max_cached=0)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(tokens(9), BS, max_cached=0)
    with pytest.raises(NoFreeBlocksError):
        bm.grow(b, 4 * BS)
    assert len(b) == 3 and bm.num_free_blocks == 0  # nothing taken by the failed calls
    c = [b.pop()]
    bm.free(c)
    with pytest.raises(NoFreeBlocksError):  # two blocks wanted, one free: all or nothing
        bm.allocate(tokens(1, 2), 2 * BS, max_cached=0)
    assert bm.num_free_blocks == 1


def test_reset_prefix_cache_forgets_only_free_blocks():
    bm = BlockManager(6, BS)
    a, _ = run(bm, tokens(0, 100))
    b, _ = run(bm, tokens(7, 8))
    held = list(b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.cached_prefix(tokens(0, 100)) == []
    assert bm.cached_prefix(tokens(7, 8)) == held and bm.num_cached_blocks == 2
    bm.free(b)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 6


def test_prefix_caching_off_never_hits():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    a, _ = run(bm, tokens(0, 100))
    bm.free(a)
    assert bm.cached_prefix(tokens(0, 100)) == [] and bm.num_cached_blocks == 0
    table, cached = run(bm, tokens(0, 100))
    assert cached == 0 and len(table) == 2


# ---- 1,000 requests through an engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    config = q.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, dtype="float32",
                           max_position_embeddings=128, eos_token_id=(1,))
    return q.Qwen3(config, random_params(config, seed=3), tokenizer=None, generation_config={},
                   kernels=q.Kernels.reference())


def check_invariants(engine):
    """Every block's reference count is the number of running tables holding it; free blocks are exactly those
    with none; only cached (full, hashed) blocks are shared; the hash table points at blocks with that hash."""
    bm, sched = engine.blocks, engine.scheduler
    owners = collections.Counter(b for s in sched.running for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == owners[block.block_id]
        assert (block.ref_count == 0) == (block.block_id in bm._free)
        assert block.ref_count <= 1 or block.hash is not None
    assert all(bm.blocks[b].hash == h for h, b in bm._cached.items())
    assert all(not s.block_table for s in sched.waiting)
    for s in sched.running:
        assert len(set(s.block_table)) == len(s.block_table) >= bm.blocks_needed(s.num_computed_tokens)


def chain(ids):
    """{chain hash: the tokens up to that block's end} for every full block of `ids`."""
    out, h = {}, None
    for i in range(len(ids) // BS):
        h = chain_hash(h, tuple(ids[i * BS:(i + 1) * BS]))
        out[h] = tuple(ids[:(i + 1) * BS])
    return out


def check_cached_blocks(engine, model, seen, forward):
    """Each cached block holds the last BS tokens its hash names, and the pool holds their keys and values as a
    fresh prefill of the whole prefix computes them."""
    bm = engine.blocks
    width = model.config.max_position_embeddings // BS
    for h, block_id in bm._cached.items():
        block = bm.blocks[block_id]
        assert block.hash == h and h in seen
        prefix = seen[h]
        assert block.tokens == prefix[-BS:]
        n = len(prefix)
        ids = np.zeros(width * BS, np.int32)
        ids[:n] = prefix
        pos = np.full(width * BS, -1, np.int32)
        pos[:n] = np.arange(n)
        meta = q.AttentionMetadata.for_prefill([list(range(n // BS))], [n], [n], block_size=BS,
                                               num_tokens=width * BS, max_blocks=width)
        _, fresh = forward(model.params, ids, pos, q.KVCache.init(model.config, width, BS), meta)
        for pool, ref in zip(engine.cache.k + engine.cache.v, fresh.k + fresh.v):
            np.testing.assert_allclose(pool[block_id], ref[n // BS - 1], rtol=1e-5, atol=1e-6)


def test_thousand_random_requests_leave_every_block_free_and_cached_blocks_right(model):
    engine = q.LLMEngine(model, max_num_seqs=4, max_num_batched_tokens=64, block_size=BS, num_blocks=8,
                         decode_steps=4, precompile=False)
    forward = jax.jit(functools.partial(q.forward, config=model.config, kernels=model.kernels))
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    bases = [rng.integers(2, vocab, n).tolist() for n in (16, 20, 32, 40)]

    def request():
        if rng.random() < 0.5:
            prompt = bases[rng.integers(len(bases))] + rng.integers(2, vocab, int(rng.integers(0, 9))).tolist()
        else:
            prompt = rng.integers(0, vocab, int(rng.integers(1, 33))).tolist()
        max_tokens = 200 if rng.random() < 0.01 else int(rng.integers(1, 33))  # 200: capped at max_model_len
        stop = rng.integers(0, vocab, int(rng.integers(0, 3))).tolist()
        return prompt, q.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=bool(rng.random() < 0.5),
                                        stop_token_ids=stop)

    seen = {}  # chain hash -> prefix tokens, over every request's tokens
    added = aborted = finished = steps = 0
    while added < 1000 or engine.has_unfinished_requests():
        for _ in range(min(1000 - added, int(rng.integers(0, 4)))):
            prompt, params = request()
            engine.add_request(f"r{added}", prompt, params)
            added += 1
        if engine.seqs and rng.random() < 0.1:
            rid = sorted(engine.seqs)[rng.integers(len(engine.seqs))]
            seen.update(chain(engine.seqs[rid].token_ids))
            assert engine.abort_request(rid)
            aborted += 1
        for out in engine.step():
            if out.finished:
                seen.update(chain(out.prompt_token_ids + out.token_ids))
                finished += 1
                assert len(out.token_ids) <= 128 - len(out.prompt_token_ids)
        check_invariants(engine)
        steps += 1
        if steps % 50 == 0:
            for s in engine.seqs.values():  # running, and preempted ones whose freed blocks stay cached
                seen.update(chain(s.token_ids))
            check_cached_blocks(engine, model, seen, forward)
        assert steps < 20000, "the engine stopped making progress"

    assert finished + aborted == 1000 and aborted > 100
    assert engine.scheduler.num_preemptions > 10 and engine.blocks.hits > 100
    bm = engine.blocks
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert sorted(bm._free) == list(range(bm.num_blocks)) and bm.num_free_blocks == bm.num_blocks
    assert bm.num_cached_blocks > 0
    check_cached_blocks(engine, model, seen, forward)
