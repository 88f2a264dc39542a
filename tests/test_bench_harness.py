"""scripts/bench_harness.py, the harness benchmark.py and benchmark_kernels.py share: timing, the measured limits,
run metadata and the report."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_harness as harness  # noqa: E402


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
