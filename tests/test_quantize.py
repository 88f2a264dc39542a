"""int8 / int4 quantization at load: error bounds, the quantized linear's dispatch (Pallas kernel and XLA), the
model on quantized weights against HF on the same dequantized weights, and the demo model's coherence."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen3_jax as q
from conftest import INTERPRET
from qwen3_jax import ops
from qwen3_jax import quantize as qz
from qwen3_jax.weights import random_params
from test_demo_model import AT_LEAST, answers, score
from test_weights import f32_logits_against_hf
from tiny_checkpoint import build_checkpoint


def awkward_weight(n=24, k=300, seed=0):
    """Normal weights with outliers, an all-zero row and an all-positive row; K not a multiple of 128."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    w[1, 5] = 0.9
    w[2] = 0.0
    w[3] = np.abs(w[3]) + 0.01
    return jnp.asarray(w, jnp.bfloat16)


def test_int8_error_within_half_a_step():
    w = awkward_weight()
    qw = qz.quantize(w, "int8")
    assert qw.qweight.dtype == jnp.int8 and qw.scales.dtype == jnp.bfloat16 and qw.shape == w.shape
    wf = np.asarray(w, np.float32)
    s = np.asarray(qw.scales, np.float32)[:, None]
    assert (s >= np.abs(wf).max(1, keepdims=True) / 127).all()  # the grid covers each row
    err = np.abs(np.asarray(qw.dequantize()) - wf)
    assert (err <= s / 2 * (1 + 1e-6)).all()
    assert (np.asarray(qw.dequantize())[2] == 0).all()


def test_int4_error_within_half_a_step():
    w = awkward_weight()
    qw = qz.quantize(w, "int4")
    assert qw.qweight.shape == (24, 3 * 64) and qw.scales.shape == (24, 3) and qw.zeros.dtype == jnp.uint8
    wf = np.pad(np.asarray(w, np.float32), ((0, 0), (0, 84))).reshape(24, 3, 128)
    s = np.asarray(qw.scales, np.float32)[:, :, None]
    z = np.asarray(qw.zeros)
    assert z.max() <= 15
    deq = np.pad(np.asarray(qw.dequantize()), ((0, 0), (0, 84))).reshape(24, 3, 128)
    assert (np.abs(deq - wf) <= s / 2 * (1 + 1e-6)).all()
    assert (deq[2] == 0).all() and (deq[:, 2, 44:] == 0).all()  # zero rows and padding stay exactly 0


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_linear_dispatch_kernel_and_xla_agree(fmt):
    w = awkward_weight(n=40, k=256)
    if fmt == "fp8":
        scale = jnp.full((1, 2), 0.9 / 448, jnp.float32)
        qw = qz.from_fp8(jnp.asarray(np.asarray(w, np.float32) / (0.9 / 448), jnp.float8_e4m3fn), scale, (128, 128))
    else:
        qw = qz.quantize(w, fmt)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 256)), jnp.float32)
    want = np.asarray(x) @ np.asarray(qw.dequantize()).T
    kernel = ops.linear(x, qw, q.Kernels(quant_matmul=True, interpret=INTERPRET))
    xla = ops.linear(x, qw, q.Kernels())
    np.testing.assert_allclose(np.asarray(kernel), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(xla), want, rtol=1e-5, atol=1e-6)
    wide = jnp.ones((ops.QUANT_KERNEL_MAX_ROWS[fmt] + 1, 256), jnp.float32)  # past the threshold: XLA, no kernel
    assert "pallas_call" not in str(jax.make_jaxpr(lambda a: ops.linear(a, qw, q.Kernels.pallas(True)))(wide))
    assert "pallas_call" in str(jax.make_jaxpr(lambda a: ops.linear(a, qw, q.Kernels.pallas(True)))(x))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, hidden_size=128,
                            intermediate_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            norm_weight_scale=30.0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_model_on_quantized_weights_matches_hf_on_dequantized(tied, mode):
    model = q.load(tied, dtype="float32", kernels="reference", quantize=mode)  # the kernel: test_quant_matmul
    p = model.params
    assert isinstance(p["embed_tokens"], qz.TiedEmbedding)  # lookup in f32, lm_head matmul quantized
    assert all(isinstance(p["layers"][1][n], qz.QuantizedWeight) for n in ("qkv_proj", "o_proj", "gate_up_proj",
                                                                           "down_proj"))
    assert p["layers"][0]["q_norm"].dtype == jnp.float32  # norms untouched
    f32_logits_against_hf(tied, model)


def test_modules_to_not_convert_and_random_params(tied):
    skip = ("lm_head", "mlp.down_proj", "model.layers.0.self_attn.k_proj")
    model = q.load(tied, quantize="int8", modules_to_not_convert=skip)
    p = model.params
    assert not isinstance(p["embed_tokens"], qz.TiedEmbedding)
    assert not isinstance(p["layers"][1]["down_proj"], qz.QuantizedWeight)
    assert not isinstance(p["layers"][0]["qkv_proj"], qz.QuantizedWeight)  # fused with an unconverted k_proj
    assert isinstance(p["layers"][1]["qkv_proj"], qz.QuantizedWeight)
    with pytest.raises(ValueError, match="quantize must be one of"):
        q.load(tied, quantize="int2")
    params = random_params(model.config, quantize="int4")
    assert isinstance(params["embed_tokens"], qz.TiedEmbedding) and params["layers"][0]["qkv_proj"].fmt == "int4"
    assert qz.params_nbytes(params) < 0.6 * qz.params_nbytes(random_params(model.config))


# Held-out recall (names the demo model never saw), as scripts/train_demo_model.py evaluates it, on our engine.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def held_out_recall(model, n):
    from train_demo_model import TASKS, sample_examples

    exs = sample_examples(0, 1, TASKS.index("recall") * 2, n, held_out=True, task="recall")
    prompts = [model.tokenizer.encode(model.chat_prompt(ex.messages[:-1], enable_thinking=False)) for ex in exs]
    out = q.generate(model, prompts, max_new_tokens=40, sampling=q.SamplingParams(temperature=0))
    return sum(t.split("</think>")[-1].replace("<|im_end|>", "").strip() == ex.answer
               for t, ex in zip(out.texts, exs))


BF16_HELD_OUT_RECALL_OF_32 = 31


@pytest.mark.parametrize("mode, at_least", [("int8", AT_LEAST[False]), ("int4", AT_LEAST[False])])
def test_demo_model_stays_coherent(mode, at_least):
    model = q.load(q.DEMO_MODEL_DIR, kernels="reference", quantize=mode)
    correct, finals = score(answers(model, False))
    assert correct >= at_least, finals
    if mode == "int8":  # as many of these 32 held-out questions as bf16 answers (31: measured, greedy, seed 0)
        assert held_out_recall(model, 32) >= BF16_HELD_OUT_RECALL_OF_32
