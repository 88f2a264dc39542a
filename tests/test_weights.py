"""Checkpoint loading: single and sharded files, tied embeddings, fusion, and every bad-input error."""

import json
import shutil

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
