"""The `qwen3-jax` command run as a user runs it (subprocesses on the demo model): fast --help, the README's first
command, the persistent compilation cache, a closed pipe and Ctrl-C. Bad usage is in test_bad_inputs.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTION = ("The capital of Aistonia is Flubarg. The capital of Borvania is Quelt. What is the capital of "
            "Aistonia?")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    return {**os.environ, "QWEN3_JAX_CACHE_DIR": str(cache), "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "PYTHONUNBUFFERED": "1"}


def qwen3_jax(*args, env, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "qwen3_jax", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_help_answers_at_once_without_importing_jax(env):
    t0 = time.perf_counter()
    r = qwen3_jax("--help", env=env)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "chat", "serve", "bench"))
    assert elapsed < 4.0, f"--help took {elapsed:.1f} s"  # about 0.1 s on an idle machine; jax alone takes ~2-4 s
    r = qwen3_jax("generate", "--top-p", "2", env=env)
    assert r.returncode == 2 and "argument --top-p: must be in (0, 1]" in r.stderr
    probe = ("import sys; from qwen3_jax import cli; cli.build_parser('generate').parse_args(['generate']); "
             "cli.main(['generate', '--help']); print('jax' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.stderr.strip() == "False" and "--max-new-tokens" in r.stdout
    assert "(default: 256)" in r.stdout  # defaults shown


def test_readme_first_command_then_a_second_start_from_the_cache(env):
    cache = Path(env["QWEN3_JAX_CACHE_DIR"])
    r = subprocess.run([sys.executable, "scripts/generate.py", "--chat", "--no-thinking", "--prompt", QUESTION],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Flubarg\n"
    # "Flubarg" and <|im_end|>: 4 tokens delivered, 3 after the first (the stats count delivered tokens only)
    assert "decode 3 tok" in r.stderr and "time to first token" in r.stderr
    entries = set(os.listdir(cache))
    assert any(e.startswith("jit_decode_step") for e in entries)
    r = qwen3_jax("generate", "--chat", "--no-thinking", "--prompt", QUESTION, env=env)
    assert r.returncode == 0 and r.stdout == "Flubarg\n"
    assert {e for e in os.listdir(cache) if not e.endswith("-atime")} == {e for e in entries
                                                                         if not e.endswith("-atime")}


def _streaming(env, *args):
    p = subprocess.Popen([sys.executable, "-m", "qwen3_jax", "generate", "--prompt", "a", "--max-new-tokens", "1000",
                          "--greedy", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(5) == b"aaaaa"  # the demo model repeats it; text is streaming now
    return p


def test_closed_pipe_exits_quietly(env):
    p = _streaming(env)
    p.stdout.close()  # `| head -c 5`
    assert p.wait(timeout=120) == 141
    assert b"Traceback" not in p.stderr.read()


def test_ctrl_c_exits_quietly(env):
    p = _streaming(env)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    err = p.stderr.read()
    assert b"Traceback" not in err and b"error" not in err


def test_bench_prints_decode_speed(env):
    r = qwen3_jax("bench", "--kernels", "reference", "--prompt-len", "8", "--new-tokens", "8", "--repeat", "1",
                  env=env)
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stdout and "tok/s" in r.stdout and "time to first token" in r.stdout
