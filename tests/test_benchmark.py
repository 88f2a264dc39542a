"""scripts/benchmark.py (with bench_jax.py and bench_hf.py, the engines it drives): a CPU smoke run of every workload
on the tiny preset (our engine, HF generate, HF continuous batching), the seeded requests and the engine sizing, the
limits, the kernel profile, and the JAX -> HF weight transfer checked by logits."""

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import qwen3_jax as q

pytest.importorskip("torch")
pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("benchmark", _PATH)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark  # dataclasses look their module up there
_spec.loader.exec_module(benchmark)
import bench_jax  # noqa: E402 - on sys.path once the script is loaded, as when it runs


def _tiny(**changes):
    args = benchmark.parse_args(["--model", "tiny", "--dtype", "float32"])
    return benchmark.model_config(args)[1].replace(**changes)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_model_on_the_same_weights_gives_the_same_logits(tied):
    import torch

    from qwen3_jax.weights import random_params

    config = _tiny(tie_word_embeddings=tied)
    params = random_params(config, seed=3)
    model = benchmark.hf_model_from_params(config, params, "cpu")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 11))
    ours = []
    for row in tokens:  # one sequence at a time through a pool of its own
        meta = q.AttentionMetadata.for_prefill([[0]], [11], [11], block_size=16, num_tokens=11)
        logits, _ = q.forward(params, jnp.asarray(row, jnp.int32), jnp.arange(11, dtype=jnp.int32),
                              q.KVCache.init(config, 1, 16), meta, config=config)
        ours.append(np.asarray(logits))
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    ours = np.stack(ours)
    assert np.abs(ref).max() > 1e-3  # not a vacuous comparison
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


SMOKE = ["--model", "tiny", "--dtype", "float32", "--engines", "jax-xla,hf-eager,hf-cb", "--batches", "1",
         "--prompts", "8", "--new-tokens", "4", "--prefill", "16", "--throughput", "2,4,8",
         "--shared-prefix", "2,128,4,4", "--max-num-batched-tokens", "64", "--reps", "1", "--commit", "test"]


def test_smoke_run_of_every_workload_writes_rows_with_sane_values(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    assert benchmark.main([*SMOKE, "--json", str(out), "--out", str(md)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["engine"], r["workload"]): r for r in result["rows"]}
    shared = "shared-prefix 2x(128+4) n4 cache "
    jax_workloads = ["startup", "decode b1 p8", "prefill 16", "throughput 2 req 4-8", shared + "on", shared + "off"]
    # Run order: every JAX workload before torch runs anything (its kernels slow JAX's decode in the same process).
    assert [(r["engine"], r["workload"]) for r in result["rows"]] == (
        [("jax-xla", w) for w in jax_workloads] + [("hf-eager", "decode b1 p8"), ("hf-eager", "prefill 16"),
                                                   ("hf-cb", "throughput 2 req 4-8")])
    for row in rows.values():
        assert "error" not in row and "skipped" not in row.get("note", ""), row

    startup = rows[("jax-xla", "startup")]  # buckets: decode 1, 2 and prefill 64, each greedy and sampled
    assert startup["executables"] == 6 and startup["compile_s"] > 0 and startup["kv_pool_bytes"] > 0
    assert startup["options"]["max_num_seqs"] == 2 and startup["options"]["max_model_len"] == 128 + 4 + 4 + 8
    for engine in ("jax-xla", "hf-eager"):
        decode = rows[(engine, "decode b1 p8")]
        assert decode["new_tokens"] == 4 and decode["decode_steps"] == 3  # batch 1: every token after the first
        assert decode["tok_per_s"] == pytest.approx(3 / decode["decode_s"]) and 0 < decode["limit_frac"]
        assert rows[(engine, "prefill 16")]["ttft_s"] > 0
    assert rows[("jax-xla", "decode b1 p8")]["cache_aliased"] is True
    lengths = benchmark.requests(benchmark.workloads(benchmark.parse_args(SMOKE))[3], 1024, 0, 1)
    for engine in ("jax-xla", "hf-cb"):  # the same requests, every token asked for
        tp = rows[(engine, "throughput 2 req 4-8")]
        assert tp["output_tokens"] == sum(n for _, n in lengths)
        assert tp["prompt_tokens"] == sum(len(p) for p, _ in lengths)
        assert tp["tok_per_s"] == pytest.approx(tp["output_tokens"] / tp["run_s"])
    assert rows[("jax-xla", "throughput 2 req 4-8")]["preemptions"] == 0
    on, off = rows[("jax-xla", shared + "on")], rows[("jax-xla", shared + "off")]
    assert on["cached_tokens_mean"] == 128 and off["cached_tokens_mean"] == 0  # two whole 64-token blocks hit
    assert on["output_tokens"] == off["output_tokens"] == 2 * 4 and on["ttft_mean_s"] > 0 and off["ttft_mean_s"] > 0
    assert result["ceilings"]["copy_bytes_per_s"] > 0 and result["meta"]["commit"] == "test"

    text = md.read_text()
    assert text.startswith("# Benchmarks") and "| jax-xla | decode b1 p8 |" in text
    for table in ("| engine | workload | output tok/s |", "| engine | workload | TTFT mean ms |",
                  "| engine | compile s | step executables |"):
        assert table in text
    assert "through every step of 1 of 1 decode workloads" in text
    # Re-rendering the saved run appends a second copy of the same tables.
    assert benchmark.main(["--from-json", str(out), "--out", str(md)]) == 0
    assert md.read_text().count("| hf-cb | throughput 2 req 4-8 |") == 2


def test_requests_are_seeded_the_same_for_every_engine_and_fresh_in_every_run():
    tp = benchmark.Workload("throughput", 256, 1024, 1024, min_len=100)
    runs = [benchmark.requests(tp, 151936, 0, rep) for rep in (0, 1, 1)]
    assert runs[1] == runs[2]  # every engine gets the same requests
    lengths = [[(len(p), n) for p, n in run] for run in runs]
    assert len(runs[1]) == 256 and lengths[0] == lengths[1]  # the same lengths in the warm-up, other ids
    assert runs[0][0][0] != runs[1][0][0]
    flat = np.array(lengths[1])
    assert flat.min() >= 100 and flat.max() <= 1024 and flat.std(axis=0).min() > 200  # uniform in [100, 1024]
    assert max(t for p, _ in runs[1] for t in p) < benchmark.NANO_VLLM_IDS
    shared = benchmark.Workload("shared-prefix", 4, 64, 8, suffix=5)
    reqs = benchmark.requests(shared, 1000, 0, 1)
    assert [n for _, n in reqs] == [1, 8, 8, 8, 8]  # the request that caches the prefix, then the batch
    assert all(p[:64] == reqs[0][0][:64] and len(p) == 69 for p, _ in reqs)
    assert len({tuple(p[64:]) for p, _ in reqs}) == 5
    assert benchmark.requests(shared, 1000, 0, 2)[0][0][:64] != reqs[0][0][:64]  # a fresh prefix per run


def test_workload_plan_and_engine_sizing():
    args = benchmark.parse_args(["--batches", "1,8", "--prompts", "128,1024", "--engines", "jax-pallas"])
    plan = benchmark.workloads(args)
    assert [w.name for w in plan] == [
        "startup", "decode b1 p128", "decode b8 p128", "prefill 2048", "decode b1 p1024", "decode b8 p1024",
        "throughput 256 req 100-1024", "shared-prefix 64x(2000+100) n128 cache on",
        "shared-prefix 64x(2000+100) n128 cache off"]
    opts = benchmark.engine_options(args, plan)
    assert opts["max_num_seqs"] == 256 and opts["max_model_len"] == 2228 + 8 and opts["precompile"]
    assert opts["gpu_memory_utilization"] == q.EngineOptions.gpu_memory_utilization  # no HF engine to leave room for
    args = benchmark.parse_args(["--workloads", "decode", "--engines", "jax-pallas,hf-cb"])
    opts = benchmark.engine_options(args, benchmark.workloads(args))
    assert (opts["max_num_seqs"], opts["max_model_len"], opts["gpu_memory_utilization"]) == (1, 128 + 256 + 8, 0.5)
    quick = benchmark.parse_args(["--quick", "--reps", "5"])
    assert quick.reps == 5 and quick.batches == [1, 8] and quick.max_num_batched_tokens == 256  # explicit flags win
    for bad in (["--throughput", "4,9,8"], ["--shared-prefix", "4,0,8,8"], ["--workloads", "decode,serve"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)


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
    prof = bench_jax.kernel_profile(tmp_path, steps=2)
    assert prof["module"] == "jit_decode" and prof["modules"] == {"jit_decode": 4, "jit_prefill": 1}
    assert prof["kernels_per_step"] == 2
    assert prof["busy_us_per_step"] == pytest.approx(3.0) and prof["span_us_per_step"] == pytest.approx(5.0)
    assert prof["gap_us_per_step"] == pytest.approx(2.0)
    assert [(k["kernel"], k["per_step"], k["mean_us"]) for k in prof["top"]] == [("gemv", 1, 2.0), ("norm", 1, 1.0)]
    with pytest.raises(RuntimeError, match="no .xplane.pb trace"):
        bench_jax.kernel_profile(tmp_path / "empty", steps=1)


def test_pallas_ops_ablation_flag():
    assert benchmark.parse_args(["--pallas-ops", "rms_norm, qkv_rope"]).pallas_ops == ["rms_norm", "qkv_rope"]
    assert benchmark.parse_args([]).pallas_ops is None  # every op as a kernel
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--pallas-ops", "rms_norm,flash"])


def test_runs_saved_before_the_engine_still_render():
    meta = {"model": "Qwen3-0.6B", "gpu": "NVIDIA H100", "date": "d", "command": "c", "commit": "x", "chunk": 8,
            "versions": {"jax": "0.11.2", "torch": "2.11", "transformers": "5.17"}, "params": 6e8,
            "config": {"dtype": "bfloat16"}, "weight_bytes": 1.2e9}
    row = {"engine": "jax-pallas", "workload": "decode b1 p128", "kind": "decode", "batch": 1, "prompt": 128,
           "tok_per_s": 1160.0, "ms_per_step": 0.86, "ttft_s": 0.01, "peak_bytes": 2e9, "warmup_s": 20.0}
    text = benchmark.render([{"meta": meta, "rows": [row]}])
    assert "| jax-pallas | decode b1 p128 | 1,160 | 0.86 | 10.0 |" in text and "runs 8 decode steps" in text
