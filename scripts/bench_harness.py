"""The harness every benchmark script shares: timing, the device's measured limits, run metadata and the report.

Timing is wall time around `jax.block_until_ready`: `time_calls` for whole calls, `device_time` for short kernels
(chained inside one executable, so it reads GPU time rather than host dispatch). The limits are one copy bandwidth
and one matmul rate, measured with JAX the same way for every script (`measure_ceilings`): bandwidth-bound rows are
rated against the first, compute-bound rows against the second (`limit_frac`). Nothing here imports the model.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "triton", "torch", "transformers")  # versions every run records
MARKDOWN_HEAD = ("# Benchmarks\n\nWritten by `scripts/benchmark.py` (qwen3-jax against Hugging Face transformers on "
                 "random weights at the real Qwen3 shapes) and `scripts/benchmark_kernels.py` (each Pallas kernel "
                 "against its reference).\n")
_T0 = time.perf_counter()


def elapsed_s() -> float:
    """Seconds since the run started (this module's import)."""
    return time.perf_counter() - _T0


def log(msg: str) -> None:
    """A progress line on stderr, stamped with the seconds since the run started."""
    print(f"[{elapsed_s():6.1f}s] {msg}", file=sys.stderr, flush=True)


def error_text(e: BaseException, width: int = 200) -> str:
    """An exception as one short line for a row or a table cell."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:width] if text else ''}"


# ---- timing ---------------------------------------------------------------------------------------------------
def time_calls(fn: Callable, reps: int, *, warmup: int = 2, clock: Callable[[], float] = time.perf_counter) -> list:
    """Seconds of each of `reps` calls of fn() run to completion (`jax.block_until_ready` on its result), after
    `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = clock()
        jax.block_until_ready(fn())
        times.append(clock() - t)
    return times


def device_time(fn: Callable, arg_sets: list, *, samples: int, sample_s: float, max_chain: int = 16,
                donate: tuple = ()) -> dict:
    """Median seconds per call of fn, as the GPU runs it inside a larger jitted program.

    For short calls one executable chains r <= max_chain calls of fn over the rotating input sets (see `_chain`), so
    host dispatch and the sync are paid once per r calls; each of the `samples` samples runs that executable k times
    back to back, k chosen so a sample lasts about `sample_s`. `donate`: positions of inputs that fn updates in
    place and returns last, in that order (a KV cache). They are donated, as a model step donates its cache, so no
    call copies them, and each call's returned values replace them in their set (copies are donated: the caller's
    arrays stay intact)."""
    sets = [[jnp.copy(a) if i in donate else a for i, a in enumerate(s)] for s in arg_sets]
    single = jax.jit(fn, donate_argnums=donate)  # without donation, the executable the check compiled

    def call(j):  # one call on set j
        out = single(*sets[j])
        if donate:
            for i, new in zip(donate, out[len(out) - len(donate):]):
                sets[j][i] = new
        return out

    # One warm-up (and the compile, with donation), then one timed call: an over-estimate, with dispatch and sync.
    one = time_calls(functools.partial(call, 0), 1, warmup=1)[0]
    r = max(1, min(max_chain, math.ceil(sample_s / max(one, 1e-7))))
    chain = _chain(fn, r, len(sets), donate) if r > 1 else None

    def chained():  # r calls over all sets in one executable
        if not donate:
            return chain(*sets)
        held = [[None if i in donate else a for i, a in enumerate(s)] for s in sets]
        outs, states = chain(*held, states=[[s[i] for i in donate] for s in sets])
        for s, state in zip(sets, states):
            for i, new in zip(donate, state):
                s[i] = new
        return outs

    runs = [functools.partial(call, j) for j in range(len(sets))] if r == 1 else [chained]
    out = None
    for run in runs * 2:  # compile, warm-up
        out = run()
    jax.block_until_ready(out)
    k = max(1, min(1000, math.ceil(sample_s / max(time_calls(runs[0], 1, warmup=0)[0], 1e-7))))

    def sample():  # k executables back to back; one stream: the last one done means all are
        out = None
        for i in range(k):
            out = runs[i % len(runs)]()
        return out

    times = [t / (k * r) for t in time_calls(sample, samples, warmup=0)]
    return {"time_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "calls_chained": r,
            "executables_per_sample": k, "samples": len(times)}


def _chain(fn: Callable, r: int, n_sets: int, donate: tuple = ()):
    """One jitted function of all input sets that makes r calls of fn, each ordered after the one before.

    With `donate`, the sets hold None at those positions and their arrays come in `states`, donated: each call on
    a set takes what the previous call on it returned for them, and run returns (outputs, final states)."""
    def run(*sets, states=()):  # sets: n_sets tuples of fn's arguments
        outs, states = [], list(states)
        for i in range(r):
            j = i % n_sets
            args = sets[j]
            if outs:  # every output of the barrier is used (returned), so neither JAX nor XLA can drop a call
                args, outs[-1] = lax.optimization_barrier((args, outs[-1]))
            if not donate:
                outs.append(fn(*args))
                continue
            args = list(args)
            for n, x in zip(donate, states[j]):
                args[n] = x
            out = fn(*args)
            outs.append(out[:len(out) - len(donate)])
            states[j] = out[len(out) - len(donate):]
        return (outs, states) if donate else outs

    return jax.jit(run, donate_argnames="states" if donate else ())


# ---- the limits -----------------------------------------------------------------------------------------------
def measure_ceilings(quick: bool, samples: int = 15, sample_s: float = 10e-3) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s.

    Copy: `jnp.copy` of 2 GiB of bf16, which XLA runs as one device-to-device memcpy; matmul: bf16 8192^3. On a CPU
    or with `quick`: 8 MiB and 256^3. Each is the median over `samples` samples of whole calls run back to back
    (`device_time` unchained: inside one program XLA may drop a copy). A ceiling that fails is recorded as
    `copy_error` / `matmul_error`, not raised."""
    small = quick or jax.default_backend() != "gpu"
    timing = dict(samples=samples, sample_s=0.0 if small else sample_s, max_chain=1)
    ceilings = {}
    try:
        x = jnp.ones((1 << (22 if small else 30),), jnp.bfloat16)
        t = device_time(jnp.copy, [(x,)], **timing)["time_s"]
        ceilings.update(copy_bytes_per_s=2 * x.nbytes / t, copy_gib=x.nbytes / 2**30, copy_op="jnp.copy")
        del x
    except Exception as e:  # noqa: BLE001 - the tables are still worth having without a limit
        ceilings["copy_error"] = error_text(e)
    try:
        n = 256 if small else 8192
        a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
        t = device_time(jnp.matmul, [(a, b)], **timing)["time_s"]
        ceilings.update(matmul_flops_per_s=2 * n**3 / t, matmul_n=n)
        del a, b
    except Exception as e:  # noqa: BLE001
        ceilings["matmul_error"] = error_text(e)
    return ceilings


def floor_s(ceilings: dict, *, nbytes: float = 0.0, flops: float = 0.0) -> float | None:
    """Fewest seconds to move `nbytes` at the copy bandwidth and do `flops` at the matmul rate, whichever binds;
    None where a ceiling it needs was not measured."""
    floors = []
    for amount, key in ((nbytes, "copy_bytes_per_s"), (flops, "matmul_flops_per_s")):
        if amount:
            if not ceilings.get(key):
                return None
            floors.append(amount / ceilings[key])
    return max(floors, default=0.0)


def limit_frac(seconds: float, ceilings: dict, *, nbytes: float = 0.0, flops: float = 0.0) -> float | None:
    """The fraction of the measured limit that a call of `seconds` reaches (1.0: at the limit); None if unknown."""
    floor = floor_s(ceilings, nbytes=nbytes, flops=flops)
    return None if floor is None or not seconds else floor / seconds


def ceilings_text(ceilings: dict) -> str:
    """The measured limits in one line of markdown."""
    c = ceilings
    if "copy_bytes_per_s" in c:
        gib = c["copy_gib"]
        size = f"{gib:g} GiB" if gib >= 1 else f"{gib * 1024:g} MiB"
        op = f"{c['copy_op']} of " if "copy_op" in c else ""  # runs saved before the harness: torch's copy_
        copy = f"device copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s ({op}{size} of bf16, bytes read + written)"
    else:
        copy = f"device copy: {c.get('copy_error', 'not measured')}"
    mm = (f"bf16 matmul {c['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s ({c['matmul_n']}^3)"
          if "matmul_flops_per_s" in c else f"matmul: {c.get('matmul_error', 'not measured')}")
    return f"{copy}; {mm}"


# ---- the report -----------------------------------------------------------------------------------------------
def fmt(x, spec: str, unit: str = "") -> str:
    """A table cell: x formatted, or a dash for a missing value."""
    return "—" if x is None else f"{x:{spec}}{unit}"


def fmt_frac(frac: float | None, spec: str = ".0f") -> str:
    """A fraction of the limit as a percentage cell ("78%"), or a dash."""
    return fmt(None if frac is None else 100 * frac, spec, "%")


def device_name() -> str:
    """JAX's first device: its kind on a GPU ("NVIDIA H200"), else platform and kind."""
    d = jax.devices()[0]
    return d.device_kind if d.platform == "gpu" else f"{d.platform}: {d.device_kind}"


def git_commit() -> str:
    """This checkout's short commit, "-dirty" when tracked files changed; "unknown" outside git."""
    try:
        def git(*a):
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                      else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(packages=PACKAGES) -> dict:
    """Installed versions of `packages` (read from their metadata, nothing imported)."""
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"
    return {p: version(p) for p in packages}


def command_line(script: str, argv: list | None) -> str:
    """The command that ran `script`, for the report (argv None: this process's own arguments)."""
    return f"python scripts/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def run_meta(command: str, commit: str | None = None) -> dict:
    """What every run records: device, backend, date, commit (default: this checkout's), command, versions."""
    return {"gpu": device_name(), "backend": jax.default_backend(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or git_commit(), "command": command, "versions": versions()}


def write_json(path, result: dict) -> None:
    """Write a run's raw numbers (rewritten as the run goes)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def append_markdown(path, text: str) -> None:
    """Append a section to a markdown file such as BENCHMARKS.md, starting the file with its title if new."""
    path = Path(path)
    head = "" if path.is_file() else MARKDOWN_HEAD
    with path.open("a") as f:
        f.write(head + "\n" + text)
