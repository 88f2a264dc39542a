"""scripts/train_demo_model.py: corpus determinism, held-out names, chat template, reproducible training, export."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_model.py"
_spec = importlib.util.spec_from_file_location("train_demo_model", _SCRIPT)
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


def _quick_args(out, *extra):
    args = T.parse_args(["--out", str(out), "--quick", "--device", "cpu", *extra])
    args.tok_sample = 500
    return args


def _words(text):
    return set(re.findall(r"[A-Za-z]+", text))


def test_corpus_is_deterministic():
    a = T.sample_examples(0, 0, 7, 50)
    assert a == T.sample_examples(0, 0, 7, 50)
    assert a != T.sample_examples(1, 0, 7, 50)
    assert a != T.sample_examples(0, 0, 8, 50)
    assert {ex.task for ex in T.sample_examples(0, 0, 0, 300)} == set(T.TASKS)
    tool = T.sample_examples(0, 0, 9, 100, task="tool")
    assert tool == T.sample_examples(0, 0, 9, 100, task="tool")
    assert {ex.task for ex in tool} == set(T.TOOL_KINDS) and all(ex.tools for ex in tool)


def test_held_out_names_never_in_training_corpus():
    held = T.sample_examples(0, 1, 0, 300, held_out=True, task="recall")
    names = set()
    for ex in held:
        facts = next(m["content"] for m in ex.messages if m["role"] == "user")
        names |= {w for w in _words(facts) if w[0].isupper() and T.is_held_out(w)}
    assert len(names) > 300  # entities and places of the held-out questions
    training = set()
    for stream, index in [(0, i) for i in range(20)] + [(2, 0)]:  # training batches and the BPE sample
        for ex in T.sample_examples(0, stream, index, 100):
            training |= _words(T.render_chat(ex.messages))
    for stream, index in [(0, 9), (0, 19), (2, 1)]:  # tool batches and the BPE sample's tool part
        for ex in T.sample_examples(0, stream, index, 100, task="tool"):
            training |= _words(T.render_chat(ex.messages, tools=ex.tools))
    assert not names & training
    held_tool = T.sample_examples(0, 1, 200, 100, held_out=True, task="tool_call")
    cities = {w for ex in held_tool for w in _words(ex.messages[-2]["content"])
              if w[0].isupper() and T.is_held_out(w)}
    assert len(cities) > 20 and not cities & training
    rng = T.Rand([0, 5])
    assert not any(T.is_held_out(T.invented_name(rng)) for _ in range(200))


def test_fast_renderer_matches_chat_template():
    for ex in T.sample_examples(3, 0, 0, 300) + T.sample_examples(3, 0, 9, 200, task="tool"):
        for msgs in (ex.messages, ex.messages[:-1]):
            for gen in (False, True):
                for thinking in (False, True):
                    assert (T.render_chat(msgs, gen, thinking, ex.tools)
                            == T.render_chat_jinja(msgs, gen, thinking, ex.tools))
    ex = next(e for e in T.sample_examples(0, 0, 0, 200) if len(e.messages) >= 4 and "<think>" in
              e.messages[-3]["content"])
    assert T.render_chat(ex.messages).count("<think>") == 1  # the earlier turn's reasoning is dropped


def test_labels_cover_exactly_the_assistant_answer(tmp_path):
    args = _quick_args(tmp_path)
    tok, max_len = T.build_tokenizer(args, log=lambda *_: None)
    exs = T.sample_examples(0, 0, 0, 16) + T.sample_examples(0, 0, 9, 16, task="tool")
    ids, labels = T.encode_examples(tok, exs, 2 * max_len)  # room for every one (the quick BPE sample is small)
    for ex, row, lab in zip(exs, ids, labels):
        trained = tok.decode(row[lab != -100].tolist(), skip_special_tokens=False)
        assert trained.endswith(ex.answer + "<|im_end|>")
        assert trained.startswith("<think>\n" if ex.enable_thinking else ex.answer)
        assert (lab[lab != -100] == row[lab != -100]).all()


@pytest.mark.slow
def test_training_is_reproducible(tmp_path):
    args = _quick_args(tmp_path, "--steps", "4", "--batch", "8", "--log-every", "4")
    tok, args.max_len = T.build_tokenizer(args, log=lambda *_: None)
    curves = []
    for _ in range(2):
        torch.manual_seed(args.seed)
        from transformers import Qwen3ForCausalLM
        model = Qwen3ForCausalLM(T.model_config(args, 512, tok))
        curves.append(T.train(model, tok, args, torch.device("cpu"), log=lambda *_: None))
    assert len(curves[0]) == 4 and all(np.isfinite(curves[0]))
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-6)


@pytest.mark.slow
def test_export_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    out = tmp_path / "demo"
    res = T.main(["--out", str(out), "--quick", "--device", "cpu", "--steps", "3", "--batch", "4", "--eval", "2"])
    assert len(res["losses"]) == 3 and set(res) >= {"recall", "recall (thinking)", "copy", "sum"}
    names = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "generation_config.json", "README.md"}
    assert names <= {f.name for f in out.iterdir()}
    assert sum(f.stat().st_size for f in out.iterdir()) < 25e6

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["num_attention_heads"] > cfg["num_key_value_heads"]
    assert cfg["num_attention_heads"] * cfg["head_dim"] != cfg["hidden_size"] and cfg["vocab_size"] % 64 == 0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False

    tok = AutoTokenizer.from_pretrained(out)
    model = Qwen3ForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.rope_parameters["rope_theta"] == 1e6
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    msgs = [{"role": "user", "content": "The capital of Aistonia is Flubarg. What is the capital of Aistonia?"}]
    for thinking in (False, True):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert text == T.render_chat(msgs, True, thinking)
    assert text.endswith("<|im_start|>assistant\n") and "<think>\n\n</think>\n\n" not in text
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.shape[1] > 10 and "<|im_start|>" in tok.convert_ids_to_tokens(ids[0].tolist())
    out_ids = model.generate(ids, max_new_tokens=4)
    assert out_ids.shape[1] > ids.shape[1]


def test_tool_use_in_qwen3_format(tmp_path):
    call = next(ex for ex in T.sample_examples(0, 0, 9, 50, task="tool") if ex.task == "tool_call")
    prompt, completion = T.prompt_and_completion(call.messages, call.enable_thinking, call.tools)
    assert "# Tools" in prompt and "<tools>\n{\"type\": \"function\"" in prompt
    assert completion.split("</think>\n\n")[-1].startswith("<tool_call>\n{\"name\": ")
    body = call.answer.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
    name = json.loads(body)["name"]
    assert name in [t["function"]["name"] for t in call.tools]
    result = next(ex for ex in T.sample_examples(0, 0, 9, 50, task="tool") if ex.task == "tool_result")
    prompt, _ = T.prompt_and_completion(result.messages, result.enable_thinking, result.tools)
    assert "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{" in prompt
    # every 10th training batch is the tool batch; the rest keep the old task mix
    args = _quick_args(tmp_path)
    tok, max_len = T.build_tokenizer(args, log=lambda *_: None)
    data = T.StepBatches(tok, 0, 8, max_len)
    tool_batch, plain_batch = data[T.TOOL_EVERY - 1][0], data[0][0]
    assert tool_batch.shape[1] > plain_batch.shape[1]
    assert "<tool_call>" in tok.decode(tool_batch[0].tolist(), skip_special_tokens=False)
