"""`generate` on the engine: greedy parity with HF `generate`, ragged batches, stops, streaming, sampling, the CLI
and bad input."""

import importlib.util
from pathlib import Path

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


GREEDY = q.SamplingParams(temperature=0, ignore_eos=True)


def gen(model, batch, max_new_tokens, sampling=GREEDY):
    out = q.generate(model, batch, max_new_tokens=max_new_tokens, sampling=sampling)
    return out.tokens, out.stats


def test_greedy_32_tokens_identical_to_hf_generate(ckpt, model):
    hf = load_hf_model(ckpt, "float32")
    for prompt in prompts(model, [5, 23], seed=1):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        tokens, stats = gen(model, [prompt], 32)
        assert tokens[0] == ref[0, len(prompt):].tolist()
        assert stats.new_tokens == 32 and stats.prompt_tokens == len(prompt)


def test_ragged_batch_equals_each_prompt_alone(model):
    batch = prompts(model, [3, 17, 9], seed=2)
    together, _ = gen(model, batch, 12)
    for prompt, got in zip(batch, together):
        alone, _ = gen(model, [prompt], 12)
        assert got == alone[0]


def test_stops_at_eos_per_row(model):
    batch = prompts(model, [4, 6], seed=3)
    free, _ = gen(model, batch, 10)
    eos = free[0][3]  # make row 0's fourth token a stop id
    stopped, _ = gen(model, batch, 10, q.SamplingParams(temperature=0, ignore_eos=True, stop_token_ids=[eos]))
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
    a, _ = gen(model, p, 16, s)
    b, _ = gen(model, p + prompts(model, [3, 9], seed=5), 16, s)  # other requests beside it change nothing
    c, _ = gen(model, p, 16, q.SamplingParams(temperature=1.0, top_k=40, seed=12))
    a, b, c = a[0], b[0], c[0]
    assert a == b and a != c


def test_stats_count_delivered_tokens(model):
    batch = prompts(model, [4, 6], seed=3)
    free, _ = gen(model, batch, 10)
    eos = free[0][2]
    tokens, stats = gen(model, batch, 10, q.SamplingParams(temperature=0, stop_token_ids=[eos]))
    assert stats.new_tokens == sum(len(t) for t in tokens) < 20
    assert stats.decode_tokens == stats.new_tokens - 2
    assert stats.prompt_tokens == 10


def test_bad_requests_are_named(model):
    with pytest.raises(ValueError, match="prompt 1 is empty: a prompt needs at least one token"):
        q.generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"token id\(s\) outside the vocabulary \[0, 512\): \[512\]"):
        q.generate(model, [[1, 512]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        q.generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt 0 has 2040 tokens; with max_new_tokens=16 that is 2056 positions, "
                                         r"beyond the model's context of 2048"):
        q.generate(model, [[1] * 2040], max_new_tokens=16)
    with pytest.raises(ValueError, match="no prompts given"):
        q.generate(model, [], max_new_tokens=4)
    assert gen(model, [[1, 2]], 2)[0][0]  # and the engine still serves


def _cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_streams_text_and_timings(ckpt, capsys):
    assert _cli().main(["--model", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "8", "--greedy",
                        "--dtype", "float32", "--no-compilation-cache"]) == 0
    out, err = capsys.readouterr()
    assert "time to first token" in err and "decode" in err and "greedy" in err
    assert out.endswith("\n")


def test_cli_reports_bad_input_without_traceback(ckpt, tmp_path, capsys):
    cli = _cli()
    assert cli.main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "error: model directory not found" in capsys.readouterr().err
    assert cli.main(["--model", str(ckpt), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "argument --top-p: must be in (0, 1], got '1.5'" in capsys.readouterr().err
    assert cli.main(["--model", str(ckpt), "--prompt", "   "]) == 2
    assert "empty prompt" in capsys.readouterr().err


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_steps_per_call_do_not_change_tokens(model, chunk):
    batch = prompts(model, [5, 11], seed=6)
    base, _ = gen(model, batch, 9)
    out = q.generate(model, batch, max_new_tokens=9, sampling=GREEDY, chunk=chunk)
    assert out.tokens == base


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
