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
