"""scripts/benchmark_kernels.py: a --quick smoke run (interpret mode on CPU) writes checked, timed rows; and the
harness it shares with scripts/benchmark.py (scripts/bench_harness.py): timing, limits, metadata, report."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
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


# ---- the harness ----------------------------------------------------------------------------------------------
class FakeClock:
    """perf_counter stand-in: each timed call lasts the next of `durations` seconds."""

    def __init__(self, durations):
        self.durations, self.now, self.started = list(durations), 0.0, False

    def __call__(self):
        if self.started:  # the end of a call
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


def test_time_calls_warms_up_untimed_then_times_each_call_to_completion():
    calls = []

    def fn():
        calls.append(len(calls))
        return jnp.ones(4) * len(calls)

    times = harness.time_calls(fn, 3, warmup=2, clock=FakeClock([0.5, 0.125, 0.25]))
    assert len(calls) == 5 and times == [0.5, 0.125, 0.25]  # two warm-up calls, not timed
    assert min(harness.time_calls(jax.jit(lambda: jnp.arange(8.0).sum()), 3)) > 0  # a real jitted call


def test_device_time_of_whole_calls_back_to_back():
    fn = lambda x: x * 2  # noqa: E731
    r = harness.device_time(fn, [(jnp.ones(64),)], samples=3, sample_s=0.01, max_chain=1)
    assert r["calls_chained"] == 1 and r["executables_per_sample"] > 1 and r["samples"] == 3
    assert 0 < r["min_s"] <= r["time_s"] <= r["max_s"]


def test_limits_are_rooflines_against_the_measured_ceilings():
    ceilings = {"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e15}
    assert harness.floor_s(ceilings, nbytes=2e9) == pytest.approx(2e-3)
    assert harness.floor_s(ceilings, flops=1e12) == pytest.approx(1e-3)
    assert harness.floor_s(ceilings, nbytes=2e9, flops=1e12) == pytest.approx(2e-3)  # the binding one
    assert harness.limit_frac(4e-3, ceilings, nbytes=2e9) == pytest.approx(0.5)
    assert harness.limit_frac(4e-3, {"matmul_flops_per_s": 1e15}, nbytes=2e9) is None  # copy not measured
    assert harness.limit_frac(0.0, ceilings, nbytes=2e9) is None
    assert [harness.fmt_frac(f, spec) for f, spec in ((0.784, ".0f"), (0.784, "5.1f"), (None, ".0f"))] == [
        "78%", " 78.4%", "—"]
    assert (harness.fmt(1234.5, ",.0f", " tok/s"), harness.fmt(None, ".1f")) == ("1,234 tok/s", "—")


def test_ceilings_measured_on_cpu_and_described():
    ceilings = harness.measure_ceilings(quick=True, samples=3)
    assert ceilings["copy_bytes_per_s"] > 0 and ceilings["matmul_flops_per_s"] > 0, ceilings
    assert ceilings["copy_gib"] == 2**22 * 2 / 2**30 and ceilings["matmul_n"] == 256  # small on a CPU
    text = harness.ceilings_text(ceilings)
    assert text.startswith("device copy ") and "(jnp.copy of 8 MiB of bf16, " in text and "(256^3)" in text
    assert harness.ceilings_text({"copy_error": "OOM"}) == "device copy: OOM; matmul: not measured"


def test_run_meta_records_device_date_commit_command_and_versions():
    meta = harness.run_meta("python scripts/x.py --quick", commit="abc123")
    assert meta["commit"] == "abc123" and meta["command"] == "python scripts/x.py --quick"
    assert meta["backend"] == jax.default_backend() and meta["gpu"] == harness.device_name()
    assert meta["versions"]["jax"] == jax.__version__ and set(meta["versions"]) == set(harness.PACKAGES)
    assert meta["date"].endswith(" UTC")
    assert harness.run_meta("c")["commit"] == harness.git_commit() != ""
    assert harness.versions(("no-such-package-here",)) == {"no-such-package-here": "not installed"}
    assert harness.command_line("x.py", ["--only", "a b"]) == "python scripts/x.py --only 'a b'"


def test_json_and_markdown_reports(tmp_path):
    harness.write_json(tmp_path / "out" / "run.json", {"rows": [1.5]})
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == {"rows": [1.5]}
    md = tmp_path / "BENCHMARKS.md"
    harness.append_markdown(md, "## one\n")
    harness.append_markdown(md, "## two\n")
    assert md.read_text() == harness.MARKDOWN_HEAD + "\n## one\n\n## two\n"  # the title once, at the top
