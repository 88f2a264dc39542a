"""Sampling filters against HF's logits warpers, and the sampler's guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen3_jax.sampling import (
    SamplingParams,
    apply_penalties,
    batch_arrays,
    filter_logits,
    history_arrays,
    record_tokens,
    request_keys,
    sample,
    token_counts,
    token_logprobs,
    unsupported_generation_fields,
)


def hf_filter(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    x = torch.from_numpy(logits.copy())
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    for w in warpers:
        x = w(None, x)
    return x.numpy()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=0.6, top_k=50, top_p=0.8, min_p=0.05),
])
def test_filter_matches_hf_warpers(params):
    rng = np.random.default_rng(hash(params) % 2**32)
    logits = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    ours = np.asarray(filter_logits(jnp.asarray(logits), params.as_arrays()))
    ref = hf_filter(logits, params)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def _draws(logits, params, n=64):
    rows = logits.shape[0]
    seeds = jnp.full((rows,), params.seed or 0, jnp.uint32)
    s = batch_arrays([params] * rows, rows)
    return np.stack([np.asarray(sample(logits, request_keys(seeds, jnp.full((rows,), i, jnp.int32)), s))
                     for i in range(n)])


def test_same_seed_same_tokens_and_filtered_tokens_never_appear():
    logits = jax.random.normal(jax.random.key(1), (3, 100)) * 2
    params = SamplingParams(temperature=1.0, top_k=7, seed=3)
    a, b = _draws(logits, params), _draws(logits, params)
    np.testing.assert_array_equal(a, b)
    allowed = np.isfinite(np.asarray(filter_logits(logits, params.as_arrays())))
    for row in range(3):
        assert allowed[row, a[:, row]].all()
    assert len(np.unique(a[:, 0])) > 1  # it does sample


def test_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.key(2), (5, 1000))
    greedy = np.asarray(sample(logits, None, None))
    draws = _draws(logits, SamplingParams(temperature=0.8, top_k=1), n=8)
    assert (draws == greedy[None]).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.2}, "min_p"),
    ({"min_p": 2}, "min_p"),
    ({"seed": "x"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"temperature": float("nan")}, "temperature"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": "1.1"}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": True}, "frequency_penalty"),
])
def test_invalid_sampling_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"invalid sampling value {match}"):
        SamplingParams(**kwargs)


def test_generation_config_defaults_like_hf():
    gen = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert SamplingParams.from_generation_config(gen) == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    assert SamplingParams.from_generation_config({}).greedy
    assert SamplingParams.from_generation_config(gen, temperature=0.0, top_k=None).greedy


def test_each_row_uses_its_own_values_and_greedy_rows_take_the_argmax():
    logits = jax.random.normal(jax.random.key(4), (3, 50)) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=2, seed=1),
              SamplingParams(temperature=0.5, top_p=0.3, seed=2)]
    s = batch_arrays(params, 3)
    for row, p in enumerate(params[1:], start=1):
        one = np.asarray(filter_logits(logits[row:row + 1], p.as_arrays()))
        np.testing.assert_array_equal(np.asarray(filter_logits(logits, s))[row], one[0])
    seeds, argmax = jnp.asarray([0, 1, 2], jnp.uint32), np.asarray(jnp.argmax(logits, -1))
    for i in range(8):
        drawn = np.asarray(sample(logits, request_keys(seeds, jnp.full((3,), i, jnp.int32)), s))
        assert drawn[0] == argmax[0]
        assert drawn[1] in np.argsort(-np.asarray(logits[1]))[:2]


def test_token_logprobs_are_log_softmax():
    logits = jax.random.normal(jax.random.key(5), (2, 40)) * 4
    tokens = jnp.asarray([3, 17])
    chosen, ids, values = token_logprobs(logits, tokens, 5)
    ref = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float64)), -1).numpy()
    np.testing.assert_allclose(np.asarray(chosen), ref[[0, 1], [3, 17]], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(ids), np.argsort(-ref, -1)[:, :5])
    np.testing.assert_allclose(np.asarray(values), np.sort(ref, -1)[:, ::-1][:, :5], rtol=1e-5)


# ---- penalties ----------------------------------------------------------------------------------------------
def _penalized(logits, histories, prompt_lens, params):
    rows = len(histories)
    s = {k: jnp.asarray(v) for k, v in batch_arrays(params, rows, penalties=True).items()}
    h = history_arrays(histories, prompt_lens, rows, 64)
    seen, counts = token_counts(jnp.asarray(h["history"]), jnp.asarray(h["prompt_lens"]), logits.shape[1])
    return np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), seen, counts, s))  # jitted, as in the steps


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_hf_processor(penalty):
    rng = np.random.default_rng(int(penalty * 10))
    logits = (rng.standard_normal((3, 200)) * 3).astype(np.float32)
    logits[:, 7] = 0.0  # a zero logit, divided or multiplied alike
    ids = rng.integers(0, 200, (3, 30))
    ids[:, :3] = [7, 7, 199]  # repeats, the last id
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()
    params = [SamplingParams(repetition_penalty=penalty)] * 3
    for prompt_len in (30, 10, 0):  # prompt or output alike
        ours = _penalized(logits, ids.tolist(), [prompt_len] * 3, params)
        np.testing.assert_array_equal(ours, ref)


def test_presence_and_frequency_penalties_match_the_openai_formula_over_the_output_only():
    rng = np.random.default_rng(3)
    vocab = 50
    logits = (rng.standard_normal((3, vocab)) * 2).astype(np.float32)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=1.5),
              SamplingParams()]  # a row without penalties is left as it is
    histories = [rng.integers(0, vocab, n).tolist() for n in (20, 33, 12)]
    prompt_lens = [8, 5, 12]
    ours = _penalized(logits, histories, prompt_lens, params)
    for row, (p, h, n) in enumerate(zip(params, histories, prompt_lens)):
        x = logits[row].astype(np.float64)
        seen = np.isin(np.arange(vocab), h)
        x = np.where(seen, np.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty), x)
        counts = np.bincount(h[n:], minlength=vocab)
        x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
        np.testing.assert_allclose(ours[row], x, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours[2], logits[2])


def test_recorded_tokens_count_like_a_history_that_holds_them():
    rng = np.random.default_rng(4)
    vocab, histories, prompt_lens = 40, [rng.integers(0, 40, 9).tolist(), [3, 3]], [4, 2]
    h = history_arrays(histories, prompt_lens, 3, 16)
    seen, counts = token_counts(jnp.asarray(h["history"]), jnp.asarray(h["prompt_lens"]), vocab)
    new, live = jnp.asarray([5, 3, 9]), jnp.asarray([True, True, False])  # row 2 (padding) is not live
    seen, counts = record_tokens(seen, counts, new, live)
    h2 = history_arrays([histories[0] + [5], [3, 3, 3]], prompt_lens, 3, 16)
    seen2, counts2 = token_counts(jnp.asarray(h2["history"]), jnp.asarray(h2["prompt_lens"]), vocab)
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(seen2))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(counts2))
    assert int(counts[1, 3]) == 1 and not np.asarray(seen[2]).any()


def test_generation_config_repetition_penalty_and_unsupported_fields(caplog):
    gen = {"do_sample": False, "repetition_penalty": 1.05, "typical_p": 0.5, "length_penalty": 2.0}
    with caplog.at_level("WARNING", logger="qwen3_jax"):
        p = SamplingParams.from_generation_config(gen)
    assert p.greedy and p.repetition_penalty == 1.05 and p.penalized
    assert not caplog.records  # typical_p without do_sample and length_penalty without beams are HF no-ops
    assert SamplingParams.from_generation_config(gen, repetition_penalty=1.0).repetition_penalty == 1.0
    gen = {"do_sample": True, "typical_p": 0.9, "no_repeat_ngram_size": 3, "num_beams": 4, "length_penalty": 0.5,
           "epsilon_cutoff": 3e-4, "temperature": 0.7}
    assert {f for f, _ in unsupported_generation_fields(gen)} == {
        "typical_p", "no_repeat_ngram_size", "num_beams", "length_penalty", "epsilon_cutoff"}
    with caplog.at_level("WARNING", logger="qwen3_jax"):
        SamplingParams.from_generation_config(gen)
        SamplingParams.from_generation_config(gen)  # reported once
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5 and any("no_repeat_ngram_size=3 is ignored" in m for m in messages)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams.from_generation_config({"repetition_penalty": 0})
