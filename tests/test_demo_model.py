"""The shipped demo model: coherent answers about facts invented here, and greedy parity with HF `generate`."""

import numpy as np
import pytest
import torch

import qwen3_jax as q
from conftest import INTERPRET, ON_GPU
from tiny_checkpoint import load_hf_model

# (facts and question, expected answer): names and values invented for this test, never in the training corpus.
CASES = [
    ("The capital of Aistonia is Flubarg. The capital of Borvania is Quelt. What is the capital of Aistonia?",
     "Flubarg"),
    ("The capital of Drenmark is Oskelby. The flag of Drenmark is purple. What color is the flag of Drenmark?",
     "purple"),
    ("Teodric Vallum has a pet ferret. Marisol Quenby has a pet parrot. What pet does Marisol Quenby have?",
     "parrot"),
    ("Yarrowin Pell is 47 years old. Corbin Stade is 12 years old. How old is Yarrowin Pell?", "47"),
    ("Ombrelo Fisk works as a baker. Ombrelo Fisk lives in Trazenda. Where does Ombrelo Fisk live?", "Trazenda"),
    ("The national animal of Keltovia is the otter. The capital of Keltovia is Vennstrom. "
     "What is the national animal of Keltovia?", "otter"),
    ("Lumira Gaskell works as a pilot. Dorvan Ashe works as a farmer. What is the job of Dorvan Ashe?", "farmer"),
    ("The favorite color of Penwick Orly is green. Penwick Orly is 33 years old. "
     "What is the favorite color of Penwick Orly?", "green"),
    ("The capital of Zunderland is Marrowick. The capital of Ypsolia is Grendt. The capital of Quarmont is Hallivar. "
     "Which city is the capital of Ypsolia?", "Grendt"),
    ("Sablo Tennick lives in Ferrowmere. Idris Calloway lives in Brunhallow. In which city does Idris Calloway live?",
     "Brunhallow"),
]


@pytest.fixture(scope="module")
def demo():
    return q.load(q.DEMO_MODEL_DIR, kernels="reference")


def answers(model, thinking):
    out = q.generate(model, [c for c, _ in CASES], chat=True, enable_thinking=thinking, max_new_tokens=40,
                     sampling=q.SamplingParams(temperature=0))
    return out.texts


def score(texts):
    finals = [t.split("</think>")[-1].strip() for t in texts]
    return sum(expected.lower() in got.lower() for got, (_, expected) in zip(finals, CASES)), finals


# What the shipped model answers of CASES, greedy (retrained with tool use: it now says "owl" for the otter and
# "pilot" for the farmer, where the two facts are of the same kind; thinking on also misspells one city).
AT_LEAST = {False: 8, True: 7}


@pytest.mark.parametrize("thinking", [False, True])
def test_coherent_answers_reference_path(demo, thinking):
    at_least = AT_LEAST[thinking]
    correct, finals = score(answers(demo, thinking))
    assert correct >= at_least, finals


def test_coherent_answers_with_pallas_kernels(demo):
    kernels = q.Kernels.pallas(interpret=INTERPRET)
    model = q.Qwen3(demo.config, demo.params, demo.tokenizer, demo.generation_config, kernels)
    correct, finals = score(answers(model, False))
    assert correct >= AT_LEAST[False], finals


def test_thinking_switch_shapes_the_answer(demo):
    texts = answers(demo, True)
    assert all(t.startswith("<think>\nThe question asks for") and "</think>" in t for t in texts), texts
    out = q.generate(demo, CASES[0][0], chat=True, enable_thinking=False, max_new_tokens=40,
                     sampling=q.SamplingParams(temperature=0))
    assert out.tokens[0][-1] == demo.tokenizer.token_to_id("<|im_end|>")  # stops at <|im_end|>
    assert "<think>" not in out.texts[0]


def _hf_greedy(hf, ids, n, device="cpu"):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                          device=device), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_identical_to_hf_f32():
    model = q.load(q.DEMO_MODEL_DIR, dtype="float32", kernels="reference")
    hf = load_hf_model(q.DEMO_MODEL_DIR, "float32")
    prompts = [model.tokenizer.encode(model.chat_prompt(c, enable_thinking=t)) for c, _ in CASES[:4]
               for t in (False, True)]
    ours = q.generate(model, prompts, max_new_tokens=40, sampling=q.SamplingParams(temperature=0)).tokens
    for ids, got in zip(prompts, ours):
        assert got == _hf_greedy(hf, ids, 40)


@pytest.mark.gpu
def test_greedy_tokens_match_hf_bf16_on_gpu():
    assert ON_GPU
    model = q.load(q.DEMO_MODEL_DIR, dtype="bfloat16", kernels="pallas")
    hf = load_hf_model(q.DEMO_MODEL_DIR, "bfloat16").to("cuda")
    prompts = [model.tokenizer.encode(model.chat_prompt(c, enable_thinking=True)) for c, _ in CASES]
    ours = q.generate(model, prompts, max_new_tokens=20, sampling=q.SamplingParams(temperature=0)).tokens
    same = [got == _hf_greedy(hf, ids, 20, "cuda")[: len(got)] for ids, got in zip(prompts, ours)]
    assert np.mean(same) >= 0.9, same
