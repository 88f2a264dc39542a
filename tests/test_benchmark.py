"""scripts/benchmark.py: a CPU smoke run on the tiny preset, and the JAX -> HF weight transfer checked by logits."""

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark  # dataclasses look their module up there
_spec.loader.exec_module(benchmark)


def _tiny(**changes):
    args = benchmark.parse_args(["--model", "tiny", "--dtype", "float32"])
    return benchmark.model_config(args)[1].replace(**changes)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_model_on_the_same_weights_gives_the_same_logits(tied):
    import torch

    from qwen3_jax.kv_cache import KVCache
    from qwen3_jax.model import forward
    from qwen3_jax.weights import random_params

    config = _tiny(tie_word_embeddings=tied)
    params = random_params(config, seed=3)
    model = benchmark.hf_model_from_params(config, params, "cpu")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    positions = np.broadcast_to(np.arange(11, dtype=np.int32), (2, 11))
    ours, _ = forward(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions),
                      KVCache.init(config, 2, 64), config=config)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(ours)
    assert np.abs(ref).max() > 1e-3  # not a vacuous comparison
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_smoke_run_writes_rows_with_sane_values(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "BENCHMARKS.md"
    assert benchmark.main(["--model", "tiny", "--engines", "jax-xla,hf-eager", "--batches", "1", "--prompts", "8",
                           "--new-tokens", "4", "--prefill", "16", "--reps", "1", "--json", str(out),
                           "--out", str(md), "--commit", "test"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["engine"], r["workload"]): r for r in result["rows"]}
    assert set(rows) == {(e, w) for e in ("jax-xla", "hf-eager") for w in ("decode b1 p8", "prefill 16")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["tok_per_s"] > 0 and 0 < row["limit_frac"] and row["ttft_s"] > 0
    for engine, steps in (("jax-xla", 8), ("hf-eager", 3)):  # JAX decodes whole chunks of 8 steps
        decode = rows[(engine, "decode b1 p8")]
        assert decode["new_tokens"] == 4 and decode["decode_steps"] == steps
        assert decode["tok_per_s"] == pytest.approx(steps / decode["decode_s"])
    assert rows[("jax-xla", "decode b1 p8")]["cache_bytes"] > 0
    # Run order: every JAX workload before torch runs anything (its kernels slow JAX's decode in the same process).
    assert [r["engine"] for r in result["rows"]] == ["jax-xla"] * 2 + ["hf-eager"] * 2
    assert result["ceilings"]["copy_bytes_per_s"] > 0 and result["ceilings"]["matmul_flops_per_s"] > 0
    assert result["meta"]["commit"] == "test" and result["meta"]["model"] == "Qwen3-tiny"
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "| jax-xla | decode b1 p8 |" in text

    # Re-rendering the saved run appends a second copy of the same table.
    assert benchmark.main(["--from-json", str(out), "--out", str(md)]) == 0
    assert md.read_text().count("| hf-eager | prefill 16 |") == 2


def test_limits_count_bytes_and_flops():
    config = benchmark.model_config(benchmark.parse_args(["--model", "8B"]))[1]
    assert config.num_params() == pytest.approx(8.19e9, rel=0.01)  # Qwen3-8B
    # untied: a decode step reads every weight but the embedding table
    assert benchmark.weight_bytes_per_step(config) == 2 * (config.num_params() - 151936 * 4096)
    assert benchmark.kv_bytes(config, 1, 1) == 36 * 2 * 8 * 128 * 2
    t = 2048
    linear = 2 * t * 36 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 12288)
    assert benchmark.prefill_flops(config, t) == linear + 2 * t * t * 32 * 128 * 36 + 2 * 4096 * 151936
    # step j of n attends prompt + j + 1 keys: a decode row is rated at the mean, against the harness's copy ceiling
    step_bytes = benchmark.weight_bytes_per_step(config) + benchmark.kv_bytes(config, 8, 128 + 2.5)
    assert benchmark.decode_bytes_per_step(config, 8, 128, 4) == step_bytes
    ceilings = {"copy_bytes_per_s": 4e12, "matmul_flops_per_s": 8e14}
    decode = {"kind": "decode", "batch": 8, "prompt": 128, "decode_s": 0.02, "decode_steps": 4}
    assert benchmark.limit_row(dict(decode), config, ceilings)["limit_frac"] == pytest.approx(step_bytes / 4e12 / 0.005)
    prefill = {"kind": "prefill", "batch": 1, "prompt": t, "ttft_s": 0.1}
    assert benchmark.limit_row(prefill, config, ceilings)["limit_frac"] == pytest.approx(
        benchmark.prefill_flops(config, t) / 8e14 / 0.1)
    assert "limit_frac" not in benchmark.limit_row(dict(decode), config, {})  # no ceiling, no fraction


def _event(metadata_id, start_us, dur_us, module):
    return (f'events {{ metadata_id: {metadata_id} offset_ps: {int(start_us * 1e6)} duration_ps: {int(dur_us * 1e6)} '
            f'stats {{ metadata_id: 1 str_value: "{module}" }} }}')


def test_kernel_profile_counts_kernels_busy_time_and_gaps_per_step(tmp_path):
    from jax.profiler import ProfileData

    # Two decode steps of (gemv 2 us, gap 1 us, norm 1 us), 6 us apart; one prefill kernel; an "XLA Ops" line
    # (the same work seen as HLO ops, which must not be counted twice) and a host plane, both ignored.
    decode = [_event(1, 0, 2, "jit_decode"), _event(2, 3, 1, "jit_decode"),
              _event(1, 6, 2, "jit_decode"), _event(2, 9, 1, "jit_decode")]
    text = f'''
    planes {{ id: 1 name: "/device:GPU:0"
      lines {{ id: 1 name: "Stream #13(Compute)" {" ".join(decode)} {_event(1, 20, 50, "jit_prefill")} }}
      lines {{ id: 2 name: "XLA Ops" {_event(1, 0, 10, "jit_decode")} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "gemv" }} }}
      event_metadata {{ key: 2 value {{ id: 2 name: "norm" }} }}
      stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_module" }} }} }}
    planes {{ id: 2 name: "/host:CPU" lines {{ id: 1 name: "Stream #1" {_event(1, 0, 99, "jit_decode")} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "host" }} }}
      stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_module" }} }} }}
    '''
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    (run / "vm.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
    prof = benchmark.kernel_profile(tmp_path, steps=2)
    assert prof["module"] == "jit_decode" and prof["modules"] == {"jit_decode": 4, "jit_prefill": 1}
    assert prof["kernels_per_step"] == 2
    assert prof["busy_us_per_step"] == pytest.approx(3.0) and prof["span_us_per_step"] == pytest.approx(5.0)
    assert prof["gap_us_per_step"] == pytest.approx(2.0)
    assert [(k["kernel"], k["per_step"], k["mean_us"]) for k in prof["top"]] == [("gemv", 1, 2.0), ("norm", 1, 1.0)]
    with pytest.raises(RuntimeError, match="no .xplane.pb trace"):
        benchmark.kernel_profile(tmp_path / "empty", steps=1)


def test_pallas_ops_ablation_flag():
    assert benchmark.parse_args(["--pallas-ops", "rms_norm, qkv_rope"]).pallas_ops == ["rms_norm", "qkv_rope"]
    assert benchmark.parse_args([]).pallas_ops is None  # every op as a kernel
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--pallas-ops", "rms_norm,flash"])
