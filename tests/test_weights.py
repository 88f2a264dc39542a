"""Checkpoint loading: single and sharded files, tied embeddings, fusion, and every bad-input error."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3_jax.config import Qwen3Config
from qwen3_jax.weights import WeightsError, load_params
from tiny_checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("single"), tie_word_embeddings=True)


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_load_fuses_and_matches_hf_tensors(sharded):
    assert (sharded / "model.safetensors.index.json").is_file()
    config = Qwen3Config.from_pretrained(sharded)
    params = load_params(sharded, config)
    hf = {}
    for f in sorted(sharded.glob("*.safetensors")):
        hf.update(load_file(f))
    layer = params["layers"][1]
    a = "model.layers.1.self_attn."
    expected_qkv = torch.cat([hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]])
    np.testing.assert_array_equal(np.asarray(layer["qkv_proj"]), expected_qkv.numpy())
    m = "model.layers.1.mlp."
    np.testing.assert_array_equal(np.asarray(layer["gate_up_proj"]),
                                  torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]).numpy())
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), hf["lm_head.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(layer["k_norm"]), hf[a + "k_norm.weight"].numpy())


def test_tied_embeddings_have_no_lm_head_and_dtype_casts(single):
    config = Qwen3Config.from_pretrained(single, dtype="bfloat16")
    params = load_params(single, config)
    assert "lm_head" not in params
    assert params["embed_tokens"].dtype == np.dtype("bfloat16")
    hf = load_file(single / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]),
                                  hf["model.embed_tokens.weight"].to(torch.bfloat16).float().numpy()
                                  .astype("bfloat16"))


def test_missing_shard_is_named(sharded, tmp_path):
    ckpt = _copy(sharded, tmp_path)
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: .*{shard.name}"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def _rewrite_single(ckpt, change):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(single, tmp_path):
    ckpt = _copy(single, tmp_path)
    _rewrite_single(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(WeightsError, match=r"missing from the checkpoint: model\.layers\.1\.self_attn\.k_norm"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def test_unexpected_tensor_is_named(single, tmp_path):
    ckpt = _copy(single, tmp_path)
    _rewrite_single(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor.*q_proj\.bias.*model\.safetensors"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def test_wrong_shape_is_named(single, tmp_path):
    ckpt = _copy(single, tmp_path)
    key = "model.layers.0.mlp.down_proj.weight"
    _rewrite_single(ckpt, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
                                           r"has shape \(64, 127\), config expects \(64, 128\)"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def test_corrupt_and_truncated_files_are_named(single, tmp_path):
    ckpt = _copy(single, tmp_path)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors: cannot read safetensors file"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="model.safetensors: cannot read safetensors file"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def test_bad_index_and_no_weights(sharded, tmp_path):
    ckpt = _copy(sharded, tmp_path)
    (ckpt / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(WeightsError, match="not a valid safetensors index"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))
    for f in ckpt.glob("model*"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="only PyTorch pickle weights"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def test_config_mismatch_with_weights_is_caught(single, tmp_path):
    ckpt = _copy(single, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"gate_proj\.weight' has shape \(128, 64\), config expects \(96, 64\)"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


# ---- stored dtypes and quantized checkpoints (FP8, AWQ) ---------------------------------------------------------

def test_integer_tensor_in_float_checkpoint_is_named(single, tmp_path):
    ckpt = _copy(single, tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite_single(ckpt, lambda t: t.update({key: t[key].to(torch.int8)}))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' is "
                                           r"stored as I8, but in this checkpoint without a quantization_config it "
                                           r"must be BF16 or F16 or F32"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def _set_quant_config(ckpt, qc):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = qc
    (ckpt / "config.json").write_text(json.dumps(cfg))


QWEN_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
QWEN_AWQ = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq", "version": "gemm",
            "zero_point": True}


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "gptq", "bits": 4}, r"quant_method 'gptq' is not supported"),
    ({**QWEN_FP8, "activation_scheme": "static"}, r"quantization_config\.activation_scheme = 'static'"),
    ({**QWEN_FP8, "weight_block_size": None}, r"quantization_config\.weight_block_size = None"),
    ({**QWEN_FP8, "scale_fmt": "ue8m0"}, r"quantization_config\.scale_fmt = 'ue8m0'"),
    ({**QWEN_FP8, "kv_cache_scheme": "fp8"}, r"field\(s\) kv_cache_scheme not understood"),
    ({**QWEN_AWQ, "bits": 8}, r"quantization_config\.bits = 8"),
    ({**QWEN_AWQ, "version": "gemv"}, r"quantization_config\.version = 'gemv'"),
    ({**QWEN_AWQ, "zero_point": False}, r"quantization_config\.zero_point = False"),
])
def test_unsupported_quantization_configs_are_refused_by_name(single, tmp_path, qc, message):
    ckpt = _copy(single, tmp_path)
    _set_quant_config(ckpt, qc)
    with pytest.raises(WeightsError, match=r"config\.json: .*" + message):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


# Dimensions on 128 boundaries, so FP8 blocks and AWQ groups tile every linear weight (vocab too: 512).
QUANT_DIMS = dict(hidden_size=256, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                  num_hidden_layers=2, norm_weight_scale=30.0)


def write_fp8(src, dst, scale_dtype=torch.float32):
    """Qwen's FP8 layout, as its released checkpoints store it: every q/k/v/o/gate/up/down_proj weight as
    float8_e4m3fn with `weight_scale_inv` [ceil(N/128), ceil(K/128)] (max |w| / 448 per block); embeddings, norms
    and lm_head unquantized."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for key in [k for k in tensors if k.endswith("_proj.weight")]:
        w = tensors[key].float()
        n, k = w.shape
        blocks = w.reshape(n // 128, 128, k // 128, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [N/128, K/128]
        scale = scale.to(scale_dtype)
        q = (blocks / scale.float()[:, None, :, None]).clamp(-448, 448).reshape(n, k).to(torch.float8_e4m3fn)
        tensors[key] = q
        tensors[key[: -len("weight")] + "weight_scale_inv"] = scale
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    _set_quant_config(dst, QWEN_FP8)
    return dst


def awq_pack(intweight):
    """AutoAWQ's WQLinear_GEMM packing of int values [rows, cols] into int32 [rows, cols / 8]: column c's nibble
    i (bits 4i..4i+3) holds value column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i] (written independently of the loader)."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int32) << (i * 4)
    return packed


def awq_dequantize(qweight, qzeros, scales, group_size):
    """AutoAWQ's `dequantize_gemm` (unpack_awq, reverse_awq_order, (iweight - izeros) * scales in fp16) -> [K, N]."""
    shifts = torch.arange(0, 32, 4)
    iweight = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8).view(
        qweight.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8).view(
        qzeros.shape[0], -1)
    reverse = torch.arange(iweight.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iweight, izeros = iweight[:, reverse] & 0xF, izeros[:, reverse] & 0xF
    return (iweight - izeros.repeat_interleave(group_size, dim=0)) * scales.repeat_interleave(group_size, dim=0)


def write_awq(src, dst, group_size=128):
    """AutoAWQ GEMM layout (as Qwen's -AWQ checkpoints): per linear `qweight` int32 [K, N/8], `qzeros` int32
    [K/g, N/8], `scales` fp16 [K/g, N] of an asymmetric 4-bit min/max quantization; no `.weight`; fp16 config."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for key in [k for k in tensors if k.endswith("_proj.weight")]:
        w = tensors.pop(key).float().t()  # [K, N]
        k, n = w.shape
        g = w.reshape(k // group_size, group_size, n)
        lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-5).half()  # [K/g, N]
        zeros = (-lo / scales.float()).round().clamp(0, 15)
        q = (g / scales.float()[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(k, n)
        module = key[: -len(".weight")]
        tensors[module + ".qweight"] = awq_pack(q.to(torch.int32))
        tensors[module + ".qzeros"] = awq_pack(zeros.to(torch.int32))
        tensors[module + ".scales"] = scales
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg))
    _set_quant_config(dst, {**QWEN_AWQ, "group_size": group_size})
    return dst


@pytest.fixture(scope="module")
def bf16_quant_dims(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qdims"), dtype="bfloat16", **QUANT_DIMS)


def hf_with_params(ckpt, params, config):
    """transformers' f32 Qwen3ForCausalLM with our (dequantized, fused) params split back into HF tensors."""
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM

    from qwen3_jax.quantize import TiedEmbedding, dequantize_params
    from qwen3_jax.weights import hf_shapes, weight_table

    hf_config = HFConfig.from_pretrained(ckpt)
    hf_config.quantization_config = None
    del hf_config.quantization_config
    tied_head = params["embed_tokens"].head if isinstance(params["embed_tokens"], TiedEmbedding) else None
    if tied_head is not None:  # our lm_head is a quantized copy of the table: HF gets it as its own tensor
        hf_config.tie_word_embeddings = False
    model = Qwen3ForCausalLM(hf_config).float().eval()
    plain = dequantize_params(params, np.float32)
    shapes, state = hf_shapes(config), {}
    for path, (keys, _) in weight_table(config).items():
        value = plain
        for part in path:
            value = value[part]
        value = torch.from_numpy(np.array(value, np.float32))
        state.update(zip(keys, torch.split(value, [shapes[k][0] for k in keys])))
    if tied_head is not None:
        state["lm_head.weight"] = torch.from_numpy(np.array(tied_head.dequantize(), np.float32))
    elif config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def f32_logits_against_hf(ckpt, model):
    from paged_rows import forward_rows, row_cache

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    pos = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
    ours, _ = forward_rows(model.params, ids, pos, row_cache(model.config, 2, 9), config=model.config,
                           kernels=model.kernels)
    hf = hf_with_params(ckpt, model.params, model.config)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    err = np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)
    assert err < 1e-5, err


def test_fp8_checkpoint_reads_as_transformers_dequantizes(bf16_quant_dims, tmp_path):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    import qwen3_jax as q
    from qwen3_jax.quantize import QuantizedWeight

    ckpt = write_fp8(bf16_quant_dims, tmp_path / "fp8")
    model = q.load(ckpt, dtype="float32", kernels="reference")
    layer = model.params["layers"][1]
    assert isinstance(layer["qkv_proj"], QuantizedWeight) and layer["qkv_proj"].fmt == "fp8"
    assert layer["qkv_proj"].qweight.dtype == jnp.float8_e4m3fn and not isinstance(model.params["lm_head"],
                                                                                      QuantizedWeight)
    hf = load_file(ckpt / "model.safetensors")
    deq = Fp8Dequantize(None)._dequantize_one  # transformers' own reading of the format (its CPU load path)
    a = "model.layers.1.self_attn."
    want = torch.cat([deq(hf[a + p + ".weight"], hf[a + p + ".weight_scale_inv"], torch.float32)
                      for p in ("q_proj", "k_proj", "v_proj")])
    np.testing.assert_array_equal(np.asarray(layer["qkv_proj"].dequantize()), want.numpy())
    m = "model.layers.1.mlp.down_proj"
    np.testing.assert_array_equal(np.asarray(layer["down_proj"].dequantize()),
                                  deq(hf[m + ".weight"], hf[m + ".weight_scale_inv"], torch.float32).numpy())
    f32_logits_against_hf(ckpt, model)


def test_fp8_bf16_scales_and_dtype_errors(bf16_quant_dims, tmp_path):
    ckpt = write_fp8(bf16_quant_dims, tmp_path / "fp8", scale_dtype=torch.bfloat16)
    params = load_params(ckpt, Qwen3Config.from_pretrained(ckpt))
    assert params["layers"][0]["o_proj"].fmt == "fp8"
    with pytest.raises(WeightsError, match="already quantized \\(fp8\\)"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt), quantize="int8")
    key = "model.layers.0.mlp.gate_proj.weight"
    _rewrite_single(ckpt, lambda t: t.update({key: t[key].to(torch.bfloat16)}))
    with pytest.raises(WeightsError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' is stored as BF16, "
                                           r"but in this fp8 checkpoint it must be F8_E4M3"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))
    _rewrite_single(ckpt, lambda t: t.pop("model.layers.0.mlp.gate_proj.weight_scale_inv"))
    with pytest.raises(WeightsError, match=r"missing from the checkpoint: model\.layers\.0\.mlp\.gate_proj\."
                                           r"weight_scale_inv"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))


def test_awq_hand_computed_packing():
    from qwen3_jax.quantize import from_awq

    # 8 output channels, one group of 32 inputs. Row 0 packs nibbles 0..7 (bits 4i hold i): AWQ's order puts
    # nibble i in channel [0, 2, 4, 6, 1, 3, 5, 7][i], so channels 0..7 read 0, 4, 1, 5, 2, 6, 3, 7.
    qweight = np.zeros((32, 1), np.int32)
    qweight[0, 0] = 0x76543210
    qweight[1, 0] = 0x0000000F  # row 1: channel 0 is 15, the rest 0
    qzeros = np.full((1, 1), 0x88888888 - (1 << 32), np.int32)  # every zero point 8 (as a signed int32)
    scales = np.full((1, 8), 0.5, np.float16)
    w = np.asarray(from_awq(qweight, qzeros, scales, group_size=32).dequantize())  # [N=8, K=32]
    np.testing.assert_array_equal(w[:, 0], [-4.0, -2.0, -3.5, -1.5, -3.0, -1.0, -2.5, -0.5])
    np.testing.assert_array_equal(w[:, 1], [3.5] + [-4.0] * 7)
    np.testing.assert_array_equal(w[:, 2:], -4.0)


def test_awq_checkpoint_reads_as_autoawq_dequantizes(bf16_quant_dims, tmp_path):
    import qwen3_jax as q
    from qwen3_jax.quantize import QuantizedWeight

    ckpt = write_awq(bf16_quant_dims, tmp_path / "awq")
    model = q.load(ckpt, dtype="float32", kernels="reference")
    layer = model.params["layers"][0]
    assert isinstance(layer["gate_up_proj"], QuantizedWeight) and layer["gate_up_proj"].fmt == "int4"
    assert layer["gate_up_proj"].scales.dtype == jnp.float16  # AWQ's fp16 scales kept as stored
    hf = load_file(ckpt / "model.safetensors")
    m = "model.layers.0.mlp."
    want = torch.cat([awq_dequantize(hf[m + p + ".qweight"], hf[m + p + ".qzeros"], hf[m + p + ".scales"], 128).t()
                      for p in ("gate_proj", "up_proj")])
    # AutoAWQ multiplies in fp16; our f32 product (q - z) * s is exact, so it rounds to exactly AutoAWQ's value
    np.testing.assert_array_equal(np.asarray(layer["gate_up_proj"].dequantize()).astype(np.float16), want.numpy())
    f32_logits_against_hf(ckpt, model)
    key = "model.layers.1.self_attn.o_proj.qzeros"
    _rewrite_single(ckpt, lambda t: t.update({key: t[key].to(torch.int16)}))
    with pytest.raises(WeightsError, match=r"tensor 'model\.layers\.1\.self_attn\.o_proj\.qzeros' is stored as I16, "
                                           r"but in this awq checkpoint it must be I32"):
        load_params(ckpt, Qwen3Config.from_pretrained(ckpt))
