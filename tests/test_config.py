"""config.json validation: what is read, what defaults as HF does, and what is refused by name."""

import json

import numpy as np
import pytest

from qwen3_jax.config import ConfigError, Qwen3Config

BASE = {
    "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "rms_norm_eps": 1e-6, "max_position_embeddings": 512, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "rope_theta": 1000000.0, "rope_scaling": None, "eos_token_id": 7,
}


def cfg(**changes):
    raw = {**BASE, **changes}
    return Qwen3Config.from_dict({k: v for k, v in raw.items() if v is not ...})


def test_reads_transformers_4_and_5_layouts():
    c4 = cfg()
    c5 = cfg(torch_dtype=..., dtype="bfloat16", rope_theta=..., rope_scaling=...,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    assert c4 == c5
    assert c4.rope_theta == 1e6 and c4.dtype == "bfloat16" and c4.eos_token_id == (7,)
    assert c4.q_size == 128 and c4.kv_size == 64


def test_head_dim_defaults_like_hf():
    assert cfg(head_dim=None).head_dim == 64 // 4


def test_dtype_override_and_kv_heads_default():
    c = Qwen3Config.from_dict({**BASE, "num_key_value_heads": None}, dtype="float32")
    assert c.dtype == "float32" and c.num_key_value_heads == 4


def test_inv_freq_matches_hf_formula():
    c = cfg()
    d = c.head_dim
    expected = 1.0 / (1e6 ** (np.arange(0, d, 2, dtype=np.float32) / d))
    np.testing.assert_array_equal(c.inv_freq(), expected.astype(np.float32))
    lin = cfg(rope_scaling={"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(lin.inv_freq(), expected / 4, rtol=1e-7)


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"model_type": "qwen3_moe"}, "model_type is 'qwen3_moe'"),
    ({"hidden_size": None}, "missing required field.*hidden_size"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, r"num_attention_heads \(6\) must be a multiple"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic'"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ({"torch_dtype": "float8"}, "unsupported dtype 'float8'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"head_dim": 33}, "head_dim must be even"),
])
def test_refused_configs_are_named(changes, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**changes)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Qwen3Config.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Qwen3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert Qwen3Config.from_pretrained(tmp_path).vocab_size == 1000
