"""scripts/benchmark_serving.py: a small CPU run on the demo model (server subprocess, HTTP client, the
LLM.generate comparison) and its report."""

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_serving.py"
_spec = importlib.util.spec_from_file_location("benchmark_serving", _SCRIPT)
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)


def test_summary_counts_chunks_as_per_token_gaps():
    r = {"start": 0.0, "status": 200, "error": None, "chunks": [(0.5, 1), (0.9, 4), (1.1, 2)]}
    row = B.summarize([r], wall=2.0, concurrency=1, args=B.parse_args(["--quick"]))
    assert row["ttft_p50_ms"] == pytest.approx(500)
    assert row["output_tok_per_s"] == pytest.approx(3.5) and row["requests_per_s"] == pytest.approx(0.5)
    assert row["itl_p50_ms"] == pytest.approx(100) and row["itl_p99_ms"] == pytest.approx(100)
    assert row["tpot_p50_ms"] == pytest.approx(600 / 6)


@pytest.mark.slow
def test_quick_run_on_the_demo_model(tmp_path):
    out = tmp_path / "serve.json"
    res = B.main(["--model", "demo", "--kernels", "reference", "--quick", "--no-precompile", "--json", str(out),
                  "--no-append", "--baseline-prompts", "1", "--num-blocks", "64"])
    assert [r["concurrency"] for r in res["rows"]] == [1, 2]
    for row in res["rows"]:
        assert row["failed"] == 0 and row["requests"] == 4
        assert row["output_tok_per_s"] > 0 and row["ttft_p50_ms"] > 0 and row["itl_p50_ms"] > 0
    base = res["baseline"]
    assert base["generate_tpot_ms"] > 0 and base["ratio"] == pytest.approx(base["server_tpot_ms"]
                                                                          / base["generate_tpot_ms"])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert "| 1 |" in B.render(res) and "LLM.generate" in B.render(res)
