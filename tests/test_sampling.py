"""Sampling filters against HF's logits warpers, and the sampler's guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen3_jax.sampling import SamplingParams, filter_logits, sample


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
    keys = jax.random.split(jax.random.key(params.seed), n)
    return np.stack([np.asarray(sample(logits, k, params.as_arrays())) for k in keys])


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
    greedy = np.asarray(sample(logits, jax.random.key(0), None))
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
])
def test_invalid_sampling_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=f"invalid sampling value {match}"):
        SamplingParams(**kwargs)


def test_generation_config_defaults_like_hf():
    gen = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert SamplingParams.from_generation_config(gen) == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    assert SamplingParams.from_generation_config({}).greedy
    assert SamplingParams.from_generation_config(gen, temperature=0.0, top_k=None).greedy
