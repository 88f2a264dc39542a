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
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope scaling type 'longrope' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling type 'llama3' is not supported"),
    ({"rope_scaling": {"rope_type": "ntk", "factor": 2.0}}, "rope scaling type 'ntk' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 64}},
     "yarn rope scaling needs 'factor'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fats": 16}}, "field.*beta_fats not understood"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "yarn rope scaling field 'factor' must be >= 1"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "yarn rope scaling field 'factor' must be a positive"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}},
     "yarn rope scaling field 'attention_factor' must be a positive number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}}, "field 'beta_fast' must be a number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}}, "field 'truncate' must be true or"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
     "'original_max_position_embeddings' must be a positive integer"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_theta": ..., "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "both rope_parameters and rope_scaling are set"),
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


# ---- YaRN ----------------------------------------------------------------------------------------------------
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen's documented recipe
YARN_CASES = {
    "qwen-recipe": dict(max_position_embeddings=40960, head_dim=128, rope_scaling=QWEN_YARN),
    "factor2-all-optional": dict(rope_theta=..., rope_scaling=..., rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 128,
        "beta_fast": 16, "beta_slow": 2, "truncate": False, "attention_factor": 1.25}),
    "mscale-pair": dict(rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 4, "mscale": 1.0,
                                                     "mscale_all_dim": 0.5, "original_max_position_embeddings": 64}),
    "mscale-alone-ignored": dict(rope_scaling={"type": "yarn", "factor": 3.0, "mscale": 2.0}),  # orig: max_pos
    "null-factor": dict(rope_scaling={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128}),
    "null-truncate": dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 96,
                                        "truncate": None, "beta_fast": 0}),
    "top-level-original": dict(original_max_position_embeddings=100, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
}


def hf_yarn(raw):
    """transformers' own YaRN: (inv_freq, attention_scaling) from its config class and rope initialisation."""
    from transformers import Qwen3Config as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig.from_dict(json.loads(json.dumps(raw)))
    inv, scaling = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf)
    return inv.numpy(), scaling


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_inv_freq_and_attention_factor_match_transformers(case):
    raw = {k: v for k, v in {**BASE, **YARN_CASES[case]}.items() if v is not ...}
    ours = Qwen3Config.from_dict(raw)
    inv, scaling = hf_yarn(raw)
    assert ours.rope_type == "yarn"
    assert ours.rope_attention_scaling == scaling  # the same float64 arithmetic
    # float32 op for op; numpy's and torch's float32 pow may differ in the last bit of one frequency
    np.testing.assert_array_max_ulp(ours.inv_freq(), inv, maxulp=1)
    default = cfg(**{k: v for k, v in YARN_CASES[case].items() if k in ("head_dim",)})
    assert not np.allclose(ours.inv_freq(), default.inv_freq())  # YaRN did change the frequencies


def test_yarn_defaults_as_transformers():
    c = cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert (c.rope_original_max_position_embeddings, c.rope_beta_fast, c.rope_beta_slow, c.rope_truncate) == \
        (None, None, None, True)
    assert c.rope_attention_scaling == pytest.approx(0.1 * np.log(4.0) + 1.0)
    null_factor = cfg(rope_scaling={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128})
    assert null_factor.rope_factor == 512 / 128
    assert cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0, "truncate": None}).rope_truncate is False
    c = cfg(original_max_position_embeddings=100, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                                "original_max_position_embeddings": 64})
    assert c.rope_original_max_position_embeddings == 100  # transformers 5 lets the top-level field win
    assert cfg().rope_attention_scaling == 1.0 and cfg(rope_scaling={"type": "linear", "factor": 4.0}) \
        .rope_attention_scaling == 1.0


def test_yarn_reads_both_layouts_and_round_trips():
    c4 = cfg(rope_scaling=QWEN_YARN)
    c5 = cfg(rope_theta=..., rope_scaling=..., rope_parameters={**QWEN_YARN, "rope_theta": 1e6})
    assert c4 == c5 and hash(c4) == hash(c5)  # hashable: the config is a static jit argument
    both_same = cfg(rope_theta=..., rope_scaling={**QWEN_YARN, "rope_theta": 1e6},
                    rope_parameters={**QWEN_YARN, "rope_theta": 1e6})
    assert both_same == c4
    full = YARN_CASES["factor2-all-optional"]["rope_parameters"]
    for c in (c4, cfg(rope_theta=..., rope_scaling=..., rope_parameters=full)):
        again = cfg(rope_theta=..., rope_scaling=..., rope_parameters=c.rope_parameters())
        assert again == c.replace(rope_original_max_position_embeddings=c.rope_original_max_position_embeddings
                                  or c.max_position_embeddings)
    assert cfg(rope_theta=..., rope_scaling=..., rope_parameters=full).rope_parameters() == full


def test_max_context_len():
    assert cfg().max_context_len == 512  # max_position_embeddings
    assert cfg(rope_scaling={"type": "linear", "factor": 4.0}).max_context_len == 512
    # Qwen's recipe: max_position_embeddings stays 40960, YaRN reaches factor * original = 131072
    assert cfg(max_position_embeddings=40960, rope_scaling=QWEN_YARN).max_context_len == 131072
    assert cfg(max_position_embeddings=40960, rope_scaling={**QWEN_YARN, "factor": 2.0}).max_context_len == 65536
    # never less than max_position_embeddings, and the original length defaults to it
    assert cfg(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}) \
        .max_context_len == 512
    assert cfg(rope_scaling={"rope_type": "yarn", "factor": 2.0}).max_context_len == 1024
