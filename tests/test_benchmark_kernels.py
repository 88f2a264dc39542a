"""scripts/benchmark_kernels.py: a --quick smoke run (interpret mode on CPU) writes checked, timed rows; failing cases
become rows; short calls are chained. The harness it shares with benchmark.py: tests/test_bench_harness.py."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_kernels.py"
_spec = importlib.util.spec_from_file_location("benchmark_kernels", _PATH)
benchmark_kernels = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_kernels"] = benchmark_kernels  # dataclasses look their module up there
_spec.loader.exec_module(benchmark_kernels)
import bench_harness as harness  # noqa: E402 - on sys.path once the script is loaded, as when it runs


@pytest.mark.slow
def test_quick_run_checks_and_times_every_kernel(tmp_path):
    out, md = tmp_path / "kernels.json", tmp_path / "BENCHMARKS.md"
    assert benchmark_kernels.main(["--quick", "--json", str(out), "--append", str(md)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    families = [r["family"] for r in rows]
    assert list(dict.fromkeys(families)) == list(benchmark_kernels.KERNELS)  # all four, in table order
    for row in rows:
        name = f"{row['kernel']} {row['shape']}"
        assert row["ok"], f"{name}: {row.get('error')}"
        assert row["rel_err"] <= benchmark_kernels.TOLERANCE, name  # False for NaN too
        assert math.isfinite(row["ours_s"]) and row["ours_s"] > 0, name
        assert math.isfinite(row["reference_s"]) and row["reference_s"] > 0, name
        for entry in row["sweep"]:  # every variant that ran was checked before it was timed
            assert "error" not in entry and entry["ok"], f"{name} [{entry['settings']}]"
    assert any(len(r["sweep"]) > 2 for r in rows)  # the decode sweep's second round ran
    assert result["limits"]["copy_bytes_per_s"] > 0

    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and "## Kernels — " in text
    assert result["meta"]["command"] in text
    header = "| kernel | shape | ours | reference (XLA) | cuDNN | metric (GB/s or TFLOP/s) | % of limit | speedup |"
    table = text[text.index(header):].strip().splitlines()
    assert len(table) == 2 + len(rows)


def test_a_failing_case_becomes_a_row_not_a_crash():
    def broken(blk):
        raise RuntimeError("no such kernel")

    case = benchmark_kernels.Case(
        "broken", "tiny", make=lambda key: (benchmark_kernels.jax.random.normal(key, (4, 4)),), ours=broken,
        reference=lambda x: x * 2, blocks=[None], label=lambda b: "default", nbytes=64)
    ctx = benchmark_kernels.Ctx(interpret=True, samples=1, sample_s=0.0, deadline=math.inf, seed=0, on_gpu=False)
    row = benchmark_kernels.run_case(case, ctx, {})
    assert row["ok"] is False and "no such kernel" in row["error"]
    assert "FAIL" in benchmark_kernels.render({"meta": {"gpu": "cpu", "date": "d", "command": "c", "commit": "x",
                                                        "interpret": True, "samples": 1,
                                                        "versions": {"jax": "", "jaxlib": "", "triton": ""}},
                                               "limits": {}, "rows": [row]})


def test_short_calls_are_chained_in_one_executable():
    sets = [(jnp.full((256,), i + 1.0),) for i in range(3)]
    # sample_s is far above one call (even on a loaded machine), so the chain length is max_chain, not timing.
    ctx = benchmark_kernels.Ctx(interpret=True, samples=3, sample_s=2.0, deadline=math.inf, seed=0, on_gpu=False,
                                max_chain=5)
    fn = lambda x: jnp.sin(x) * 2  # noqa: E731
    r = benchmark_kernels.bench(fn, sets, ctx)
    assert r["calls_chained"] == 5 and r["samples"] == 3
    assert 0 < r["min_s"] <= r["time_s"] <= r["max_s"] < 0.02
    # All five calls survive compilation: none is dead code or merged with another.
    hlo = harness._chain(fn, 5, len(sets)).lower(*sets).compile().as_text()
    assert hlo.count(" sine(") == 5
