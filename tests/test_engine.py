"""The continuous-batching engine: batched output equals each request alone and HF `generate` (f32, greedy), through
chunked prefill, preemption and prefix-cache hits; log-probabilities against HF's logits; seeded sampling; the
LLM API, aborts and bad requests; donated caches and start-up compilation.

One small engine (4 sequences, an 8-block pool) serves every test but the start-up one, so each step shape compiles
once for the whole module.
"""

import functools
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen3_jax as q
from qwen3_jax.sampling import batch_arrays, request_keys, sample
from qwen3_jax.weights import random_params
from tiny_checkpoint import build_checkpoint, load_hf_model

POOL_BLOCKS = 8  # 128 positions: a few long requests fill it, so requests are preempted
ENGINE = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, block_size=16, num_blocks=POOL_BLOCKS,
              decode_steps=4, precompile=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("engine"), num_attention_heads=8, num_key_value_heads=2,
                            head_dim=64, norm_weight_scale=100.0, seed=5)


@pytest.fixture(scope="module")
def model(ckpt):
    return q.load(ckpt, dtype="float32", kernels="reference")


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt, "float32")


@pytest.fixture(scope="module")
def llm(model):
    return q.LLM(model, **ENGINE)


@pytest.fixture
def engine(llm):
    yield llm.engine
    assert_idle(llm.engine)


def assert_idle(engine):
    """No request left and every block back in the free list."""
    assert not engine.has_unfinished_requests() and not engine.seqs
    b = engine.blocks
    assert b.num_free_blocks == b.num_blocks
    assert all(block.ref_count == 0 for block in b.blocks)


def greedy(max_tokens, **kw):
    return q.SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def random_prompts(lengths, seed, vocab=512):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def alone(engine, prompt, params):
    """The request run by itself with an empty prefix cache."""
    engine.blocks.reset_prefix_cache()
    (out,) = engine.generate([prompt], [params])
    assert out.metrics.num_cached_tokens == 0 and out.metrics.num_preemptions == 0
    return out


def hf_greedy(hf, prompt, max_new_tokens, eos="none"):
    """HF's greedy tokens; eos="none" runs all max_new_tokens, eos=None stops at generation_config's EOS ids."""
    kw = dict(eos_token_id=None, min_new_tokens=max_new_tokens) if eos == "none" else {}
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def hf_logits(hf, tokens):
    """HF's f32 logits at every position of `tokens` -> [T, V]."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float().numpy()


def hf_logprobs(hf, tokens):
    """log_softmax of HF's f32 logits at every position of `tokens` -> [T, V]."""
    return torch.log_softmax(torch.from_numpy(hf_logits(hf, tokens)), -1).numpy()


# ---- 1. continuous batching == each request alone --------------------------------------------------------------
def test_random_arrivals_equal_each_request_alone(engine):
    rng = np.random.default_rng(0)
    bases = random_prompts([16, 32, 40], seed=1)  # shared prefixes of one, two and two and a half blocks
    prompts, params = [], []
    for i in range(64):
        if i % 3 == 0:  # a shared prefix, alone (a prompt seen before, maybe all full blocks) or with a suffix
            base = bases[i % len(bases)]
            prompt = base + rng.integers(0, 512, int(rng.integers(0, 61 - len(base))) * (i % 2)).tolist()
        else:
            prompt = rng.integers(0, 512, int(rng.integers(1, 61))).tolist()
        prompts.append(prompt)
        params.append(greedy(int(rng.integers(1, 41)), ignore_eos=bool(i % 2)))
    preemptions0, hits0 = engine.scheduler.num_preemptions, engine.blocks.hits

    final, latest, pending, steps = {}, {}, list(range(len(prompts))), 0
    while pending or engine.has_unfinished_requests():
        for _ in range(min(len(pending), int(rng.integers(0, 6)))):
            i = pending.pop(0)
            engine.add_request(f"r{i}", prompts[i], params[i])
        for _ in range(int(rng.integers(1, 4))):
            for out in engine.step():
                i = int(out.request_id[1:])
                assert out.token_ids[:len(latest.get(i, []))] == latest.get(i, [])  # outputs are cumulative
                latest[i] = out.token_ids
                if out.finished:
                    final[i] = out
        steps += 1
        assert steps < 2000, "the engine stopped making progress"

    assert engine.scheduler.num_preemptions > preemptions0
    assert engine.blocks.hits > hits0 and any(o.metrics.num_cached_tokens > 0 for o in final.values())
    assert any(o.metrics.num_preemptions > 0 for o in final.values())
    assert sorted(final) == list(range(len(prompts)))
    for i, out in final.items():
        ref = alone(engine, prompts[i], params[i])
        assert out.prompt_token_ids == prompts[i] and out.logprobs is None and out.prompt_logprobs is None
        assert out.token_ids == ref.token_ids, f"request {i}"
        assert out.finish_reason == ref.finish_reason


# ---- 2. parity with HF generate ------------------------------------------------------------------------------
def test_greedy_batch_equals_hf_generate_with_stop_tokens(engine, hf):
    prompts = random_prompts([5, 23, 41], seed=2)
    refs = [hf_greedy(hf, p, 20) for p in prompts]
    outs = engine.generate(prompts, [greedy(20, ignore_eos=True)] * 3)
    assert [o.token_ids for o in outs] == refs
    assert [o.finish_reason for o in outs] == ["length"] * 3

    stop = refs[1][6]  # a stop token id ends a request where it first appears, the stop token kept
    outs = engine.generate(prompts, [greedy(20, ignore_eos=True, stop_token_ids=[stop])] * 3)
    for out, ref in zip(outs, refs):
        cut = ref[:ref.index(stop) + 1] if stop in ref else ref
        assert out.token_ids == cut
        assert out.finish_reason == ("stop" if stop in ref else "length")
    assert outs[1].finish_reason == "stop" and len(outs[1].token_ids) <= 7
    (out,) = engine.generate([prompts[1]], [greedy(20, ignore_eos=True, stop_token_ids=[stop])])
    assert out.token_ids == outs[1].token_ids
    assert_idle(engine)  # the decode call queued past the stop token has nothing left to deliver


def test_eos_stops_unless_ignore_eos_as_hf_generate(engine, hf):
    eos = set(hf.generation_config.eos_token_id)
    assert set(engine.model.eos_token_ids) == eos
    candidates = random_prompts([8] * 64, seed=0)
    free = engine.generate(candidates, [greedy(12, ignore_eos=True)] * len(candidates))
    hit = [i for i, o in enumerate(free) if eos & set(o.token_ids[:-1])]
    assert hit, "no candidate prompt produced an EOS token: pick other candidates"
    prompt, other = candidates[hit[0]], candidates[(hit[0] + 1) % len(candidates)]

    ref = hf_greedy(hf, prompt, 12, eos=None)
    assert ref[-1] in eos and len(ref) < 12
    outs = engine.generate([prompt, other], [greedy(12), greedy(12, ignore_eos=True)])
    assert outs[0].token_ids == ref and outs[0].finish_reason == "stop"
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 12
    assert free[hit[0]].token_ids == hf_greedy(hf, prompt, 12)  # ignore_eos runs through the EOS as HF does


# ---- 3. log-probabilities ------------------------------------------------------------------------------------
def test_logprobs_equal_log_softmax_of_hf_logits(engine, hf):
    long, short = random_prompts([70, 12], seed=4)  # 70 tokens: prefilled in two chunks of the 64-token budget
    # Sampled rows (every step of this test then runs one set of executables): log-probabilities are the model's,
    # before temperature, and the chosen token need not be the most likely.
    sampled = functools.partial(q.SamplingParams, temperature=1.2, ignore_eos=True)
    params = [sampled(seed=1, max_tokens=6, logprobs=5, prompt_logprobs=5),
              sampled(seed=3, max_tokens=5, logprobs=3),
              sampled(seed=2, max_tokens=4, logprobs=0, prompt_logprobs=2)]
    outs = engine.generate([long, short, long], params)
    # prompt log-probabilities need every prompt token computed: no prefix-cache hit for the repeated prompt
    assert outs[2].metrics.num_cached_tokens == 0
    assert outs[1].prompt_logprobs is None
    assert any(next(iter(entry)) != max(entry, key=entry.get) for out in outs for entry in out.logprobs)

    for out, sp in zip(outs, params):
        prompt, gen = out.prompt_token_ids, out.token_ids
        lp = hf_logprobs(hf, prompt + gen)
        if sp.prompt_logprobs is not None:
            assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
            for i in range(1, len(prompt)):
                check_entry(out.prompt_logprobs[i], prompt[i], lp[i - 1], sp.prompt_logprobs)
        if sp.logprobs is not None:
            assert len(out.logprobs) == len(gen)
            for j, token in enumerate(gen):
                check_entry(out.logprobs[j], token, lp[len(prompt) - 1 + j], sp.logprobs)

    # Preempted between its prefill chunks (the scheduler preempts the newest running request, prefilling or not),
    # the request recomputes its prompt and still returns one entry per prompt token.
    engine.add_request("p", long, params[0])
    engine.step()
    seq = engine.seqs["p"]
    assert seq.prefilling and seq.num_computed_tokens == 64
    engine.scheduler.preempt(seq)
    while not seq.finished:
        engine.step()
    assert seq.output_token_ids == outs[0].token_ids
    assert len(seq.prompt_logprobs) == len(long) and seq.prompt_logprobs[0] is None
    for got, want in zip(seq.prompt_logprobs[1:], outs[0].prompt_logprobs[1:]):
        assert got.keys() == want.keys() and np.allclose(list(got.values()), list(want.values()), atol=1e-5)


def check_entry(entry, token, row, k):
    """{token: logprob} holds the chosen token first, then the k most likely, each with HF's log-probability."""
    assert next(iter(entry)) == token
    top = np.argsort(-row)[:k].tolist()
    assert set(entry) == set(top) | {token}
    got = np.array([entry[t] for t in top + [token]])
    np.testing.assert_allclose(got, row[top + [token]], rtol=1e-4, atol=1e-4)  # f32 logits agree to ~1e-5


# ---- 4. sampling ---------------------------------------------------------------------------------------------
def test_seeded_sampling_is_independent_of_the_batch(engine, hf):
    x, y, z = random_prompts([10, 30, 7], seed=5)
    s7 = q.SamplingParams(temperature=1.5, top_k=100, seed=7, max_tokens=40, ignore_eos=True)
    s8 = q.SamplingParams(temperature=1.5, top_k=100, seed=8, max_tokens=40, ignore_eos=True)
    ref = alone(engine, x, s7).token_ids
    # Token j is drawn with the request's seed folded with j, from the filtered logits (HF's, teacher-forced): the
    # draws do not depend on how the engine groups tokens into device calls.
    logits = jnp.asarray(hf_logits(hf, x + ref)[len(x) - 1:-1])
    keys = request_keys(jnp.full(len(ref), 7, jnp.uint32), jnp.arange(len(ref), dtype=jnp.int32))
    assert sample(logits, keys, batch_arrays([s7] * len(ref), len(ref))).tolist() == ref
    ref_y = alone(engine, y, greedy(16, ignore_eos=True)).token_ids
    outs = engine.generate([y, x, x, z], [greedy(16, ignore_eos=True), s7, s8,
                                           q.SamplingParams(temperature=0.9, top_p=0.9, max_tokens=9)])
    assert outs[1].token_ids == ref  # same seed, other rows and another batch size
    assert outs[2].token_ids != ref  # another seed
    assert outs[0].token_ids == ref_y  # a greedy row among sampled rows takes the argmax

    # Preempted and recomputed, the seeded request draws the same tokens: its draws are keyed by token index.
    # It is admitted last, so it is the newest running request when two longer ones outgrow the pool.
    crowd = random_prompts([30, 30], seed=6)
    outs = engine.generate(crowd + [x], [greedy(60, ignore_eos=True)] * 2 + [s7])
    assert outs[2].metrics.num_preemptions > 0
    assert outs[2].token_ids == ref


# ---- 5. API, aborts and errors -------------------------------------------------------------------------------
def test_llm_generate_prompt_kinds_in_input_order(llm, model):
    tok = model.tokenizer
    chat = [{"role": "user", "content": "hi"}]
    prompts = ["Hello there", [5, 6, 7], chat, {"prompt_token_ids": [9, 10]}]
    params = [greedy(n) for n in (3, 4, 5, 6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [tok.encode("Hello there"), [5, 6, 7],
                                                   tok.encode(model.chat_prompt(chat)), [9, 10]]
    for out, sp in zip(outs, params):
        assert out.finished and out.finish_reason in ("stop", "length")
        assert 1 <= len(out.token_ids) <= sp.max_tokens
        assert out.finish_reason == "stop" or len(out.token_ids) == sp.max_tokens
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert outs[0].prompt == "Hello there" and outs[1].prompt is None

    one = llm.generate("Hello there", greedy(3), use_tqdm=False)  # one prompt, one params for all
    assert len(one) == 1 and one[0].token_ids == outs[0].token_ids
    assert llm.generate([5, 6, 7], greedy(4), use_tqdm=False)[0].token_ids == outs[1].token_ids
    assert llm.generate(chat, greedy(5), use_tqdm=False)[0].token_ids == outs[2].token_ids
    assert [o.token_ids for o in llm.chat([chat, chat], greedy(5), use_tqdm=False)] == [outs[2].token_ids] * 2
    assert_idle(llm.engine)


def test_stop_strings_across_token_boundaries_and_streamed_text_never_shrinks(llm, engine):
    tok = llm.get_tokenizer()
    prompt = random_prompts([12], seed=21)[0]
    ref = alone(engine, prompt, greedy(24, ignore_eos=True))
    pieces = [tok.decode(ref.token_ids[:i], skip_special_tokens=True) for i in range(len(ref.token_ids) + 1)]
    # A stop string from the middle of one token's text into the next one's, first occurring after token 6.
    i = next(i for i in range(6, 20) if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[i + 1][len(pieces[i]) - 1:len(pieces[i]) + 1]
    cut = ref.text.find(stop)
    assert cut >= 0
    end = next(j for j in range(len(pieces)) if stop in pieces[j])  # tokens up to the one completing the match

    for include in (False, True):
        params = greedy(24, ignore_eos=True, stop=[stop, "\x00never"], include_stop_str_in_output=include)
        engine.add_request("s", prompt, params)
        streamed = []
        while engine.has_unfinished_requests():
            streamed += [o for o in engine.step() if o.request_id == "s"]
        out = streamed[-1]
        assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
        assert out.text == ref.text[:cut + (len(stop) if include else 0)]
        assert out.token_ids == ref.token_ids[:end]
        texts = [o.text for o in streamed]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # streamed text is never taken back

    (out,) = engine.generate([prompt], [greedy(24, ignore_eos=True, stop_token_ids=[ref.token_ids[3]])])
    assert out.outputs[0].stop_reason == ref.token_ids[3] and out.token_ids == ref.token_ids[:4]


def test_abort_mid_generation_frees_blocks(engine):
    a, b = random_prompts([40, 20], seed=7)
    ref_b = alone(engine, b, greedy(20, ignore_eos=True)).token_ids
    engine.add_request("a", a, greedy(20, ignore_eos=True))
    engine.add_request("b", b, greedy(20, ignore_eos=True))
    while not engine.seqs["a"].output_token_ids:
        engine.step()
    engine.step()
    assert engine._inflight is not None and not engine.seqs["a"].finished  # a decode call with "a" in flight
    assert engine.abort_request("a") and not engine.abort_request("a") and not engine.abort_request("nope")
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks - len(engine.seqs["b"].block_table)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert list(outs) == ["b"] and outs["b"].token_ids == ref_b

    engine.add_request("w", a, greedy(5))  # a waiting request aborts too
    assert engine.abort_request("w") and engine.num_waiting == 0


def test_bad_requests_raise_and_the_engine_serves_the_next(llm, engine):
    good = [3, 1, 4, 1, 5]
    ref = alone(engine, good, greedy(4)).token_ids

    def serves():
        assert engine.generate([good], [greedy(4)])[0].token_ids == ref
        assert_idle(engine)

    for n in (256, 300):
        with pytest.raises(ValueError, match=f"the prompt has {n} tokens; max_model_len=256 leaves no room"):
            engine.add_request(None, [1] * n, greedy(1))
    serves()
    # 100 + 100 tokens need 13 blocks of the pool's 8: refused at once instead of waiting forever
    with pytest.raises(q.CacheOverflowError, match="needs up to 13 KV blocks .* whole pool has 8 blocks"):
        engine.add_request(None, [1] * 100, greedy(100))
    serves()
    # ... while a request that needs exactly the whole pool runs to the end
    (out,) = engine.generate([[2] * 100], [greedy(POOL_BLOCKS * 16 - 100, ignore_eos=True)])
    assert len(out.token_ids) == POOL_BLOCKS * 16 - 100 and out.finish_reason == "length"
    serves()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(None, [], greedy(1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(None, [1, 512], greedy(1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(None, [-1], greedy(1))
    with pytest.raises(TypeError, match="token ids must be integers"):
        engine.add_request(None, [1, 2.5], greedy(1))
    serves()
    engine.add_request("dup", good, greedy(4))
    with pytest.raises(ValueError, match="'dup' is already in use"):
        engine.add_request("dup", good, greedy(4))
    assert [o.token_ids for o in engine.generate([good], [greedy(4)])] == [ref]  # runs alongside "dup"
    while engine.has_unfinished_requests():
        engine.step()
    serves()
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("max_tokens", 0),
                         ("seed", -1), ("logprobs", 21), ("prompt_logprobs", 1.5), ("stop_token_ids", "ab"),
                         ("stop", [""]), ("stop", 3), ("include_stop_str_in_output", "yes")]:
        with pytest.raises(ValueError, match=f"invalid sampling value {field}="):
            q.SamplingParams(**{field: value})
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request(None, good, {"temperature": 0})
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([good] * 3, [greedy(1)] * 2, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):  # the first prompt's request is aborted with the call
        llm.generate([good, []], greedy(4), use_tqdm=False)
    serves()


# ---- 6. donated cache, start-up compilation ------------------------------------------------------------------
def test_precompiled_steps_donate_the_cache_and_compile_nothing_later():
    config = q.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, dtype="float32",
                           max_position_embeddings=64)
    model = q.Qwen3(config, random_params(config), tokenizer=None, generation_config={},
                    kernels=q.Kernels.reference())
    engine = q.LLMEngine(model, max_num_seqs=1, max_num_batched_tokens=16, block_size=16, num_blocks=4,
                         decode_steps=2, precompile=True)
    # one prefill bucket (16 tokens) and one decode bucket (batch 1), greedy and sampled
    assert len(engine.steps._compiled) == 4 and engine.compile_s > 0
    compiled = engine.steps.compile_seconds
    for executable in engine.steps._compiled.values():  # the cache argument's buffers are the output's
        assert executable.memory_analysis().alias_size_in_bytes == engine.cache.nbytes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = engine.cache
        engine.add_request("a", list(range(1, 40)), greedy(6, ignore_eos=True))  # 39 tokens: 3 prefill chunks
        engine.step()
        assert all(k.is_deleted() for k in before.k + before.v)  # donated, not copied
        outs = engine.generate([[1, 2, 3], [4] * 20], [q.SamplingParams(temperature=1.0, seed=1, max_tokens=5),
                                                       greedy(3, ignore_eos=True)])
        while engine.has_unfinished_requests():
            engine.step()
    assert not [w for w in caught if "donated" in str(w.message)]
    assert engine.steps.compile_seconds == compiled
    assert [len(o.token_ids) for o in outs] == [5, 3]
    assert_idle(engine)


# ---- 7. penalties ---------------------------------------------------------------------------------------------
def hf_greedy_penalized(hf, prompt, max_new_tokens, repetition_penalty):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                          min_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    return out[0, len(prompt):].tolist()


def test_repetition_penalty_greedy_equals_hf_generate(engine, hf):
    prompts = random_prompts([9, 23], seed=11) + [[5, 6, 5, 6, 5, 6, 5]]
    penalties = [1.5, 0.7, 1.3]
    n = 3 * ENGINE["decode_steps"] + 2  # a prefill and four decode calls
    outs = engine.generate(prompts, [greedy(n, ignore_eos=True, repetition_penalty=p) for p in penalties])
    plain = engine.generate(prompts, [greedy(n, ignore_eos=True)] * 3)
    for prompt, p, out, base in zip(prompts, penalties, outs, plain):
        assert out.token_ids == hf_greedy_penalized(hf, prompt, n, p)
    assert any(o.token_ids != b.token_ids for o, b in zip(outs, plain))  # the penalty changed the tokens


def reference_penalized_greedy(hf, prompt, n, p: q.SamplingParams):
    """Greedy tokens with p's penalties applied to HF's logits on the host, one token at a time."""
    out = []
    for _ in range(n):
        x = hf_logits(hf, prompt + out)[-1]
        seen = np.isin(np.arange(x.size), prompt + out)
        rp = np.float32(p.repetition_penalty)
        x = np.where(seen, np.where(x < 0, x * rp, x / rp), x)
        counts = np.bincount(out, minlength=x.size).astype(np.float32)
        x = x - np.float32(p.frequency_penalty) * counts - np.float32(p.presence_penalty) * (counts > 0)
        out.append(int(np.argmax(x)))
    return out


def test_presence_frequency_penalties_and_a_mixed_batch_equal_their_references(engine, hf):
    x, y, z = random_prompts([12, 20, 6], seed=12)
    n = 2 * ENGINE["decode_steps"] + 3
    # The random model's logits are ~0.4 and its greedy tokens seldom repeat: a negative presence penalty makes a
    # token repeat until its frequency penalty outweighs it, so each step depends on the counts of the steps before.
    pf = greedy(n, ignore_eos=True, presence_penalty=-2.0, frequency_penalty=0.5)
    both = greedy(n, ignore_eos=True, presence_penalty=-1.0, frequency_penalty=0.4, repetition_penalty=1.2)
    sampled = q.SamplingParams(temperature=1.2, top_k=50, seed=3, max_tokens=n, ignore_eos=True,
                               frequency_penalty=1.0)
    plain = greedy(n, ignore_eos=True)
    ref_pf, ref_both = reference_penalized_greedy(hf, x, n, pf), reference_penalized_greedy(hf, y, n, both)
    assert alone(engine, x, pf).token_ids == ref_pf
    assert ref_pf != alone(engine, x, plain).token_ids  # the penalties changed the tokens
    solo = [alone(engine, p, s).token_ids for p, s in ((z, plain), (y, both), (z, sampled))]
    assert solo[1] == ref_both
    outs = engine.generate([z, x, y, z], [plain, pf, both, sampled])  # with and without penalties, in one batch
    assert [o.token_ids for o in outs] == [solo[0], ref_pf, solo[1], solo[2]]


def test_nan_logits_stop_only_their_request_and_generate_says_so(model, engine):
    poisoned_id = 7  # its embedding row is NaN: a prompt holding it gets NaN logits, the others are untouched
    params = dict(model.params, embed_tokens=model.params["embed_tokens"].at[poisoned_id].set(jnp.nan))
    bad_model = q.Qwen3(model.config, params, model.tokenizer, model.generation_config, model.kernels)
    llm = q.LLM(bad_model, **ENGINE)
    good, bad = [3, 1, 4, 1, 5], [3, 1, poisoned_id, 1, 5]
    ref = alone(engine, good, greedy(6, ignore_eos=True)).token_ids
    outs = llm.generate([good, bad], greedy(6, ignore_eos=True), use_tqdm=False)
    assert outs[0].token_ids == ref and outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert_idle(llm.engine)
    with pytest.raises(FloatingPointError, match="NaN or Inf logits for prompt 1 after 0 tokens"):
        q.generate(bad_model, [good, bad], max_new_tokens=4, sampling=greedy(4))
