"""YaRN rope scaling against transformers on tiny checkpoints (f32): logits below and far beyond the original
context, the Pallas kernels (interpret mode on CPU), greedy tokens through the engine, chunked prefill.

Two configs: factor 2 over an original context of 64 (no optional field: transformers' defaults), and factor 4 over
128 with every optional field set, in the transformers-4 layout, Qwen's shape of config (max_position_embeddings
1.25x the original length, as 40960 vs 32768).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen3_jax as q
from qwen3_jax.weights import random_params
from conftest import INTERPRET
from paged_rows import RowCache, row_cache
from pallas_kernels import qkv_rope as qr
from tiny_checkpoint import build_checkpoint, load_hf_model

CONFIGS = {
    "f2-orig64-defaults": dict(
        max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 2.0,
                         "original_max_position_embeddings": 64}),
    "f4-orig128-optional-legacy": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, norm_weight_scale=20.0, legacy_config=True,
        max_position_embeddings=160,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128, "beta_fast": 24.0, "beta_slow": 2.0,
                         "mscale": 0.9, "mscale_all_dim": 0.3, "truncate": False}),
}
LONG = 512  # positions compared with HF: 8x and 4x the original contexts


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), seed=7 + len(request.param),
                            **CONFIGS[request.param])


@pytest.fixture(scope="module")
def model(ckpt):
    return q.load(ckpt, dtype="float32", kernels="reference")


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt, "float32")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_ids(n, seed, vocab=512):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@functools.partial(jax.jit, static_argnames=("config", "kernels"))
def _forward(params, tokens, positions, cache, meta, *, config, kernels):
    return q.forward(params, tokens, positions, cache, meta, config=config, kernels=kernels)


def run(model, ids, start, rc: RowCache, kernels=q.Kernels()):
    """Tokens `ids` at positions start, start + 1, ... of a one-row cache, as one jitted step (a fraction of
    the eager `paged_rows.forward_rows`'s CPU time at these lengths) -> (logits [T, V], row cache)."""
    t = len(ids)
    if t == 1:
        meta = q.AttentionMetadata.for_decode(rc.tables, [start])
    else:
        meta = q.AttentionMetadata.for_prefill(rc.tables, [start + t], [t], block_size=rc.block_size, num_tokens=t)
    logits, cache = _forward(model.params, jnp.asarray(ids, jnp.int32), jnp.arange(start, start + t, dtype=jnp.int32),
                             rc.cache, meta, config=model.config, kernels=kernels)
    return np.asarray(logits), RowCache(cache, rc.tables)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def test_checkpoint_is_yarn_as_transformers_reads_it(model, hf):
    c = model.config
    rotary = hf.model.rotary_emb
    assert c.rope_type == "yarn" and rotary.rope_type == "yarn"
    assert c.rope_attention_scaling == rotary.attention_scaling != 1.0
    np.testing.assert_array_max_ulp(c.inv_freq(), rotary.inv_freq.numpy(), maxulp=1)


def test_f32_logits_match_hf_below_and_far_beyond_the_original_context(model, hf):
    ids = random_ids(LONG, seed=1)
    ref = hf_logits(hf, ids)
    logits, _ = run(model, ids, 0, row_cache(model.config, 1, LONG))
    orig = model.config.rope_original_max_position_embeddings
    assert rel(logits, ref) <= 1e-4
    assert rel(logits[:orig], ref[:orig]) <= 1e-4  # inside the original context
    assert rel(logits[-128:], ref[-128:]) <= 1e-4  # 3.5x (orig 128) to 8x (orig 64) the original context


@pytest.mark.parametrize("ckpt", ["f2-orig64-defaults"], indirect=True)  # interpret mode is slow on CPU
def test_pallas_kernels_match_hf_beyond_the_original_context(model, hf):
    """The kernels that apply RoPE, in interpret mode on CPU: `qkv_rope` over a prompt past the original context,
    then the fused paged decode kernel (qkv_rope + decode attention) over the cache it wrote."""
    n = model.config.rope_original_max_position_embeddings + 16
    ids = random_ids(n + 1, seed=2)
    ref = hf_logits(hf, ids)
    kernels = q.Kernels(qkv_rope=True, decode_attention=True, interpret=INTERPRET)
    prefill, rc = run(model, ids[:n], 0, row_cache(model.config, 1, n + 1), kernels)
    step, _ = run(model, ids[n:], n, rc, kernels)
    assert rel(prefill, ref[:n]) <= 1e-4
    assert rel(prefill[-16:], ref[n - 16:n]) <= 1e-4  # past the original context
    assert rel(step[0], ref[n]) <= 1e-4


def test_rope_tables_scaled_as_hf_in_bf16(model, hf):
    """bf16 RoPE with the attention factor equals HF's bit for bit: cos and sin scaled in f32, then cast (the
    kernels share `_rope_tables` with the reference)."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    c = model.config
    rng = np.random.default_rng(3)
    t, heads, d = 300, 2, c.head_dim
    x = rng.standard_normal((1, t, heads, d)).astype(np.float32)
    pos = np.arange(t)[None]
    xt = torch.from_numpy(x).to(torch.bfloat16).transpose(1, 2)  # [1, heads, T, D]
    cos, sin = hf.model.rotary_emb(xt, torch.from_numpy(pos))
    want, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    want = want.transpose(1, 2).float().numpy()
    inv_freq = jnp.asarray(c.inv_freq())
    got = qr.rope_reference(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos), inv_freq, c.rope_attention_scaling)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    unscaled = qr.rope_reference(jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos), inv_freq)
    assert not np.array_equal(np.asarray(unscaled, np.float32), want)


def engine(model, budget):
    return q.LLM(model, max_model_len=model.config.max_position_embeddings, max_num_seqs=1,
                 max_num_batched_tokens=budget, block_size=16, num_blocks=24, decode_steps=4, precompile=False)


def test_long_prompt_in_chunks_equals_one_prefill_and_hf_greedy(model, hf):
    """A prompt past the original context, prefilled in chunks of 32 tokens vs in one step: the same prompt
    log-probabilities (every position), the same greedy tokens with the same log-probabilities, and those tokens
    are HF `generate`'s."""
    c = model.config
    prompt = random_ids(c.rope_original_max_position_embeddings + 16, seed=4)
    new = min(16, c.max_position_embeddings - len(prompt))
    params = q.SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    (chunked,) = engine(model, 32).generate([prompt], params)
    (whole,) = engine(model, 256).generate([prompt], params)
    assert chunked.metrics.num_cached_tokens == whole.metrics.num_cached_tokens == 0
    assert chunked.token_ids == whole.token_ids
    assert len(chunked.prompt_logprobs) == len(whole.prompt_logprobs) == len(prompt)
    for a, b in zip(chunked.prompt_logprobs[1:] + chunked.logprobs, whole.prompt_logprobs[1:] + whole.logprobs):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert chunked.token_ids == out[0, len(prompt):].tolist()


def test_engine_context_is_yarns_factor_times_the_original_length():
    config = q.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, dtype="float32",
                           max_position_embeddings=80, rope_type="yarn", rope_factor=2.0,
                           rope_original_max_position_embeddings=64)
    model = q.Qwen3(config, random_params(config), tokenizer=None, generation_config={},
                    kernels=q.Kernels.reference())
    assert q.LLMEngine(model, block_size=16, num_blocks=16, precompile=False).options.max_model_len == 128
    with pytest.raises(ValueError, match="max_model_len=129 is beyond the model's context of 128"):
        q.LLMEngine(model, max_model_len=129, block_size=16, num_blocks=16, precompile=False)
