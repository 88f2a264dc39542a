"""Generation: greedy parity with HF `generate`, ragged batches, EOS, streaming, sampling, the CLI and bad input."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen3_jax as q
from tiny_checkpoint import build_checkpoint, load_hf_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("gen"), num_attention_heads=8, num_key_value_heads=2,
                            head_dim=64, norm_weight_scale=100.0, seed=5)


@pytest.fixture(scope="module")
def model(ckpt):
    return q.load(ckpt, dtype="float32", kernels="reference")


def prompts(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.config.vocab_size, n).tolist() for n in lengths]


def test_greedy_32_tokens_identical_to_hf_generate(ckpt, model):
    hf = load_hf_model(ckpt, "float32")
    for prompt in prompts(model, [5, 23], seed=1):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        tokens, stats = q.generate_tokens(model.config, model.params, [prompt], max_new_tokens=32)
        assert tokens[0] == ref[0, len(prompt):].tolist()
        assert stats.new_tokens == 32 and stats.prompt_tokens == len(prompt)


def test_ragged_batch_equals_each_prompt_alone(model):
    batch = prompts(model, [3, 17, 9], seed=2)
    together, _ = q.generate_tokens(model.config, model.params, batch, max_new_tokens=12)
    for prompt, got in zip(batch, together):
        alone, _ = q.generate_tokens(model.config, model.params, [prompt], max_new_tokens=12)
        assert got == alone[0]


def test_stops_at_eos_per_row(model):
    batch = prompts(model, [4, 6], seed=3)
    free, _ = q.generate_tokens(model.config, model.params, batch, max_new_tokens=10)
    eos = free[0][3]  # make row 0's fourth token an EOS id
    stopped, _ = q.generate_tokens(model.config, model.params, batch, max_new_tokens=10, eos_token_ids=[eos])
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == free[1][: free[1].index(eos) + 1] if eos in free[1] else stopped[1] == free[1]


def test_streaming_text_equals_final_text(model):
    pieces = {}
    out = q.generate(model, ["Hello there", "A"], max_new_tokens=20, sampling=q.SamplingParams(temperature=0),
                     on_text=lambda row, text: pieces.setdefault(row, []).append(text), chunk=3)
    assert ["".join(pieces.get(r, [])) for r in range(2)] == out.texts
    assert out.texts[0] == model.tokenizer.decode(out.tokens[0], skip_special_tokens=True)


def test_chat_prompt_uses_the_checkpoint_template(model):
    text = model.chat_prompt("hi", enable_thinking=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    out = q.generate(model, "hi", chat=True, enable_thinking=False, max_new_tokens=3)
    assert len(out.tokens[0]) <= 3


def test_sampling_same_seed_same_tokens_and_defaults_from_generation_config(model):
    assert model.default_sampling() == q.SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    p = prompts(model, [7], seed=4)
    s = q.SamplingParams(temperature=1.0, top_k=40, seed=11)
    a, _ = q.generate_tokens(model.config, model.params, p, max_new_tokens=16, sampling=s)
    b, _ = q.generate_tokens(model.config, model.params, p, max_new_tokens=16, sampling=s)
    c, _ = q.generate_tokens(model.config, model.params, p, max_new_tokens=16,
                             sampling=q.SamplingParams(temperature=1.0, top_k=40, seed=12))
    assert a == b and a != c


def test_bad_requests_are_named(model):
    cfg, params = model.config, model.params
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        q.generate_tokens(cfg, params, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0 has token id\(s\) outside the vocabulary \[0, 512\): \[512\]"):
        q.generate_tokens(cfg, params, [[1, 512]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        q.generate_tokens(cfg, params, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt 0 has 2040 tokens; with max_new_tokens=16 that is 2056 positions, "
                                         r"beyond the model's context of 2048"):
        q.generate_tokens(cfg, params, [[1] * 2040], max_new_tokens=16)
    with pytest.raises(ValueError, match="no prompts given"):
        q.generate_tokens(cfg, params, [], max_new_tokens=4)


def test_cache_overflow_is_an_error_before_the_step(model):
    cache = q.KVCache.init(model.config, 1, 64)
    cache.check_fits(64)
    with pytest.raises(q.CacheOverflowError, match="needs 65 cache positions but the KV cache holds max_len=64"):
        cache.check_fits(65)
    with pytest.raises(q.CacheOverflowError, match="max_len=64"):
        q.generate_tokens(model.config, model.params, [[1] * 60], max_new_tokens=8, max_len=64)


def _cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_streams_text_and_timings(ckpt, capsys):
    assert _cli().main(["--model", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "8", "--greedy",
                        "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    assert "time to first token" in err and "decode" in err and "greedy" in err
    assert out.endswith("\n")


def test_cli_reports_bad_input_without_traceback(ckpt, tmp_path, capsys):
    cli = _cli()
    assert cli.main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "error: model directory not found" in capsys.readouterr().err
    assert cli.main(["--model", str(ckpt), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "invalid sampling value top_p=1.5" in capsys.readouterr().err
    assert cli.main(["--model", str(ckpt), "--prompt", "   "]) == 2
    assert "empty prompt" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 4])
def test_decode_chunk_updates_the_cache_in_place(model, chunk):
    from qwen3_jax.generate import _Steps

    cache = q.KVCache.init(model.config, 2, 64)
    steps = _Steps(model.config, model.kernels, True, chunk)
    lengths = jnp.asarray([3, 5], jnp.int32)
    args = (model.params, lengths, lengths, cache, jax.random.key(0), jnp.int32(0),
            q.SamplingParams().as_arrays())
    compiled = steps.compiled("decode", *args)
    assert compiled.memory_analysis().alias_size_in_bytes == cache.nbytes
    block, _, _ = compiled(*args)
    assert block.shape == (2, chunk)


def test_load_names_a_broken_generation_config_before_reading_weights(ckpt, tmp_path):
    import shutil

    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    (broken / "generation_config.json").write_text("{oops")
    (broken / "model.safetensors").write_bytes(b"")  # never reached
    with pytest.raises(ValueError, match="generation_config.json:? (is )?not valid JSON"):
        q.load(broken)
    with pytest.raises(ValueError, match="kernels must be 'auto', 'pallas' or 'reference'"):
        q.load(ckpt, kernels="triton")
