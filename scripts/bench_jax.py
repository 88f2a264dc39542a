"""This project's engine as scripts/benchmark.py drives it: one `qwen3_jax.LLM` per engine kind, and the GPU kernels
of a profiled decode run.

`JaxEngine` builds the LLM at its first workload with every step bucket compiled (its start-up row), then runs
request lists the caller draws (the same ones the HF engines get): `decode` (decode and prefill rows), `throughput`
and `shared_prefix`. Each takes the untimed run first, then the timed ones. Only public names of the package are
used: the KV pool's in-place update is checked through the device addresses of `llm.engine.cache`, and the steps
compiled at start-up are counted through jax.monitoring's compile events.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
import statistics
import time
from pathlib import Path

import jax

import qwen3_jax as q

from bench_harness import log

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event for each XLA compilation


# ---- the kernel profile ----------------------------------------------------------------------------------------------
def kernel_profile(trace_dir: Path, steps: int, top: int = 12) -> dict:
    """GPU kernels of a `jax.profiler` trace holding `steps` decode steps: per step, count and busy time per kernel.

    Kernels are grouped by name on the device's stream lines; `gap_us` is the step's wall time on the device
    (first kernel start to last kernel end, per step) minus its busy time: launch and dependency latency."""
    from jax.profiler import ProfileData

    files = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise RuntimeError(f"no .xplane.pb trace under {trace_dir}")
    data = ProfileData.from_file(str(files[-1]))
    events = []  # (start_ns, duration_ns, name, module)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for e in line.events:
                stats = dict(e.stats)
                events.append((e.start_ns, e.duration_ns, e.name, str(stats.get("hlo_module", "?"))))
    if not events:
        raise RuntimeError(f"the trace in {files[-1]} holds no GPU kernels (no CUPTI?)")
    by_module: dict[str, list] = {}
    for ev in events:
        by_module.setdefault(ev[3], []).append(ev)
    decode = max(by_module, key=lambda m: len(by_module[m]))  # decode steps launch by far the most kernels
    evs = sorted(by_module[decode])
    per_kernel: dict[str, list[float]] = {}
    for _, dur, name, _ in evs:
        per_kernel.setdefault(name, []).append(dur / 1e3)
    busy_us = sum(e[1] for e in evs) / 1e3
    span_us = (evs[-1][0] + evs[-1][1] - evs[0][0]) / 1e3
    rows = sorted(((sum(d), len(d), name) for name, d in per_kernel.items()), reverse=True)
    return {
        "module": decode, "steps": steps, "kernels_per_step": len(evs) / steps, "busy_us_per_step": busy_us / steps,
        "span_us_per_step": span_us / steps, "gap_us_per_step": (span_us - busy_us) / steps,
        "modules": {m: len(v) for m, v in by_module.items()},
        "top": [{"kernel": name[:90], "per_step": n / steps, "us_per_step": total / steps, "mean_us": total / n}
                for total, n, name in rows[:top]],
    }


def _log_profile(name: str, prof: dict) -> None:
    log(f"  profile {name}: {prof['kernels_per_step']:.0f} kernels/step, busy {prof['busy_us_per_step']:.0f} us + "
        f"gaps {prof['gap_us_per_step']:.0f} us = {prof['span_us_per_step']:.0f} us per step "
        f"(module {prof['module']}; all modules: {prof['modules']})")
    for k in prof["top"]:
        log(f"    {k['us_per_step']:8.1f} us/step  {k['per_step']:5.1f}x  {k['mean_us']:7.2f} us  {k['kernel']}")


# ---- the engine ---------------------------------------------------------------------------------------------
def greedy(max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> q.SamplingParams:
    """EOS ignored: every request runs to max_tokens."""
    return q.SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed)


def cache_pointers(llm: q.LLM) -> tuple:
    """Device addresses of the engine's KV pool buffers: unchanged across a step iff the step updated it in place."""
    return tuple(s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(llm.engine.cache)
                 for s in x.addressable_shards)  # each device's part of a split pool


class JaxEngine:
    """This project's engine (`qwen3_jax.LLM`) on Pallas kernels or the jnp reference ops: one LLM for every workload
    of the run, built at its first workload with all step buckets compiled."""

    def __init__(self, name: str, model: q.Qwen3, options: dict):
        self.name, self.model, self.options = name, model, options
        self.llm: q.LLM | None = None
        self.startup: dict | None = None  # what the first build did

    def build(self, **changes) -> tuple[q.LLM, dict]:
        """A new LLM with the run's options (and `changes`), and what its start-up did."""
        compiled = collections.Counter()

        def count(event, seconds, **kw):  # every XLA compilation, by function (the steps: jit(*_step))
            if event == COMPILE_EVENT:
                compiled[str(kw.get("fun_name", "?"))] += 1

        jax.monitoring.register_event_duration_secs_listener(count)
        try:
            t = time.perf_counter()
            llm = q.LLM(self.model, **{**self.options, **changes})
            build_s = time.perf_counter() - t
        finally:
            jax.monitoring.unregister_event_duration_listener(count)
        eng = llm.engine
        return llm, {"compile_s": eng.compile_s, "compile_cpu_s": eng.steps.compile_seconds, "build_s": build_s,
                     "executables": sum(n for f, n in compiled.items() if f.endswith("_step)")),
                     "compiled": dict(compiled), "kv_pool_bytes": eng.cache.nbytes,
                     "kv_blocks": eng.stats()["blocks_total"], "options": dataclasses.asdict(eng.options)}

    def start(self) -> q.LLM:
        if self.llm is None:
            self.llm, info = self.build()
            self.startup = self.startup or info
            log(f"  {self.name}: engine up in {info['build_s']:.1f} s ({info['executables']} step executables "
                f"compiled in {info['compile_s']:.1f} s; KV pool {info['kv_blocks']} blocks, "
                f"{info['kv_pool_bytes'] / 2**30:.2f} GiB)")
        return self.llm

    def close(self) -> None:
        """Drop the LLM (its KV pool and compiled steps) so the next engine has the memory."""
        self.llm = None
        gc.collect()

    def startup_row(self) -> dict:
        self.start()
        return {**self.startup, "warmup_s": self.startup["build_s"]}

    # ---- decode and prefill ----
    def decode(self, runs: list[list], profile: tuple[Path, list] | None = None) -> dict:
        """Batches of same-length requests: runs[0] untimed (it also checks the KV pool's in-place update), the rest
        timed. A row of the median TTFT and, with more than one new token, the decode rate. `profile`: (trace
        directory, requests) of one more run under the profiler."""
        llm = self.start()
        batch, n = len(runs[0]), runs[0][0][1]
        t = time.perf_counter()
        warm = self._generate(llm, runs[0], check_cache=True)
        row = {"new_tokens": n, "warmup_s": time.perf_counter() - t}
        timed = [self._generate(llm, reqs) for reqs in runs[1:]]
        row.update(ttft_s=statistics.median(r["ttft_s"] for r in timed), prefill_s_all=[r["ttft_s"] for r in timed])
        decoded = [r for r in timed if r["tokens"]]  # (none: every row decoded before the last one's first token)
        if decoded:
            steps = statistics.median(r["tokens"] / batch for r in decoded)  # decode steps of every row
            step_s = statistics.median(r["decode_s"] * batch / r["tokens"] for r in decoded)
            row.update(decode_s=step_s * steps, decode_steps=steps, decode_s_all=[r["decode_s"] for r in timed],
                       cache_bytes=llm.engine.cache.nbytes, cache_aliased=warm["aliased"])
            if profile is not None:
                row.update(self._profile(llm, *profile))
        elif n > 1:
            row["note"] = "no decode window: every request decoded before the last one had its first token"
        compiled = sum(r["compile_s"] for r in timed)
        if compiled:
            row["note"] = f"{compiled:.1f} s of compiling inside the timed runs"
        return row

    @staticmethod
    def _generate(llm: q.LLM, reqs: list, *, check_cache: bool = False) -> dict:
        """One run of same-length requests: mean TTFT, and the decode window from the moment every request has its
        first token to the last token (the tokens delivered in it, its seconds). `check_cache` (it waits for each
        step, so only untimed): whether the KV pool kept its buffers through every step."""
        prompts, n = [p for p, _ in reqs], reqs[0][1]
        first, count, events, seen = [None] * len(prompts), [0] * len(prompts), [], set()

        def on_output(i, out):
            now = time.monotonic()
            got = len(out.token_ids)
            if first[i] is None and got:
                first[i] = now
            events.append((now, got - count[i]))
            count[i] = got
            if check_cache and i == 0:
                seen.add(cache_pointers(llm))

        if check_cache:
            seen.add(cache_pointers(llm))
        compile0 = llm.engine.steps.compile_seconds
        outs = llm.generate(prompts, greedy(n), use_tqdm=False, on_output=on_output)
        if check_cache:
            seen.add(cache_pointers(llm))
        short = [len(o.token_ids) for o in outs if len(o.token_ids) != n]
        if short:
            raise RuntimeError(f"a request stopped after {short[0]} of {n} tokens")
        start, end = max(first), max(t for t, _ in events)
        return {"ttft_s": statistics.mean(o.metrics.time_to_first_token for o in outs),
                "decode_s": end - start, "tokens": sum(d for t, d in events if t > start),
                "compile_s": llm.engine.steps.compile_seconds - compile0, "aliased": len(seen) == 1}

    def _profile(self, llm: q.LLM, trace: Path, reqs: list) -> dict:
        """One more (untimed) decode run under the profiler: its GPU kernels per decode step."""
        with jax.profiler.trace(str(trace)):
            self._generate(llm, reqs)
        k = llm.engine.options.decode_steps
        steps = math.ceil((reqs[0][1] - 1) / k) * k  # the device runs whole calls of decode_steps
        try:
            prof = kernel_profile(trace, steps)
        except RuntimeError as e:  # the timings stand without it
            return {"note": f"no profile: {e}"}
        _log_profile(self.name, prof)
        return {"profile": prof}

    # ---- throughput ----
    def throughput(self, warm: list, timed: list, temperature: float = 0.0) -> dict:
        """Serve `warm` (untimed), then `timed`: every request submitted at once, timed until the last finishes."""
        llm = self.start()

        def params(reqs):
            return [greedy(n, temperature, seed=i if temperature else None) for i, (_, n) in enumerate(reqs)]

        t = time.perf_counter()
        llm.generate([p for p, _ in warm], params(warm), use_tqdm=False)
        row = {"warmup_s": time.perf_counter() - t}
        compile0, preempted = llm.engine.steps.compile_seconds, llm.engine.stats()["preemptions"]
        t = time.perf_counter()
        outs = llm.generate([p for p, _ in timed], params(timed), use_tqdm=False)
        row["run_s"] = time.perf_counter() - t
        got = [len(o.token_ids) for o in outs]
        if got != [n for _, n in timed]:
            raise RuntimeError("a request stopped before its max_tokens")
        row.update(output_tokens=sum(got), prompt_tokens=sum(len(p) for p, _ in timed),
                   preemptions=llm.engine.stats()["preemptions"] - preempted,
                   ttft_s=statistics.median(o.metrics.time_to_first_token for o in outs))
        if llm.engine.steps.compile_seconds > compile0:
            row["note"] = f"{llm.engine.steps.compile_seconds - compile0:.1f} s of compiling inside the timed run"
        return row

    # ---- shared prefix ----
    def shared_prefix(self, runs: list[list], caching: bool) -> dict:
        """Per run: its first request alone (1 new token; with the cache on, it leaves the prefix's blocks cached),
        then the others submitted at once, timed. runs[0] untimed. Cache off: a second LLM, built after the first is
        dropped, its steps compiled on first use (in the untimed run, which has the timed runs' shapes)."""
        if caching:
            llm, row = self.start(), {}
        else:
            self.close()
            llm, info = self.build(enable_prefix_caching=False, precompile=False)
            row = {"engine_build_s": info["build_s"]}
        try:
            t = time.perf_counter()
            self._shared_run(llm, runs[0])
            row["warmup_s"] = time.perf_counter() - t
            timed = [self._shared_run(llm, reqs) for reqs in runs[1:]]
        finally:
            del llm
            gc.collect()
        for key in timed[0]:
            row[key] = statistics.median(r[key] for r in timed)
        row.update(ttft_s=row["ttft_mean_s"], ttft_mean_s_all=[r["ttft_mean_s"] for r in timed],
                   run_s_all=[r["run_s"] for r in timed])
        if row["compile_s"]:
            row["note"] = f"{row['compile_s']:.1f} s of compiling inside the timed runs"
        return row

    @staticmethod
    def _shared_run(llm: q.LLM, reqs: list) -> dict:
        (prefix_prompt, _), batch = reqs[0], reqs[1:]
        llm.generate([prefix_prompt], greedy(1), use_tqdm=False)
        compile0, preempted = llm.engine.steps.compile_seconds, llm.engine.stats()["preemptions"]
        t = time.perf_counter()
        outs = llm.generate([p for p, _ in batch], greedy(batch[0][1]), use_tqdm=False)
        run_s = time.perf_counter() - t
        ttft = [o.metrics.time_to_first_token for o in outs]
        return {"ttft_mean_s": statistics.mean(ttft), "ttft_p50_s": statistics.median(ttft), "run_s": run_s,
                "output_tokens": sum(len(o.token_ids) for o in outs),
                "cached_tokens_mean": statistics.mean(o.metrics.num_cached_tokens for o in outs),
                "preemptions": llm.engine.stats()["preemptions"] - preempted,
                "compile_s": llm.engine.steps.compile_seconds - compile0}
