#!/usr/bin/env python3
"""Benchmark qwen3-jax's engine against Hugging Face transformers on random weights at the real Qwen3 shapes.

    python scripts/benchmark.py --model 0.6B --json bench.json          # every engine and workload -> BENCHMARKS.md
    python scripts/benchmark.py --model tiny --quick --no-append        # every workload, small (CPU: about 2 minutes)
    python scripts/benchmark.py --from-json run1.json run2.json         # render saved runs as one table and append it
    python scripts/benchmark.py --engines jax-pallas --workloads decode --profile trace   # where decode time goes

Workloads (`--workloads`, all by default), greedy with EOS ignored on random prompt ids, in this order per engine:
  startup        building the engine: every prefill and decode bucket compiled (`LLM(..., precompile=True)`).
  decode         batch B x prompt P, N new tokens (`--batches 1 --prompts 128 --new-tokens 256`). JAX: tok/s = the
                 tokens delivered after every request has its first token / the seconds from then to the last one
                 (batch 1: (N-1) / (last token - first token)). Batch 1, prompt 128 is the no-regression check.
  prefill        batch 1, prompt T (`--prefill 2048`): time to first token (chunks of --max-num-batched-tokens).
  throughput     nano-vllm's benchmark (`--throughput 256,100,1024`): 256 requests whose prompt and output lengths are
                 each uniform in [100, 1024], all submitted at once, one timed run: output tok/s = output tokens / wall.
  shared-prefix  (`--shared-prefix 64,2000,100,128`) 64 requests = one 2,000-token prefix + 100 unique tokens, 128 new
                 tokens each, with the prefix cache on, then off: TTFT and output tok/s (protocol in the table notes).
Engines (bench_jax.py, bench_hf.py): jax-pallas and jax-xla (this project's `qwen3_jax.LLM` on its Pallas kernels or
on the jnp reference ops: every workload), hf-eager and hf-compile (transformers' `generate`, eager or static cache +
its torch.compile: decode and prefill), hf-cb (transformers' continuous batching: throughput). HF runs on the very
same weights (DLPack views). Each JAX engine is one LLM sized for the run's workloads (max_num_seqs = the most
requests at once, max_model_len = the longest request + decode_steps); each workload runs once untimed, then --reps
timed runs (throughput: one) on fresh prompt ids, so no run hits another's prefix cache. The JAX engines run all their
workloads first, before torch runs a kernel in the process (after that JAX's decode measured ~10% slower in the same
process), then the measured limits, then the HF engines. On a CPU the default engines are jax-xla, hf-eager and hf-cb
(jax-pallas runs in interpret mode there, minutes per request; hf-compile compiles for minutes).

How long on an H200 (estimates, 0.6B; 8B about twice): start-up compile 1-2 min per JAX engine, decode b1 and prefill
seconds, throughput ~30 s for jax-pallas and 1-3 min for hf-cb (its sdpa attention reads every request's keys for
every query), shared-prefix ~2 min (its cache-off engine compiles its steps on first use). One call may last at most
10 minutes: split by engine (or workload), each call with its own JSON, then merge them into one table:
    python scripts/benchmark.py --model 0.6B --engines jax-pallas --workloads startup,decode,throughput,shared-prefix \
        --time-budget 500 --json a.json --no-append
    python scripts/benchmark.py --model 0.6B --engines hf-eager,hf-cb --workloads decode,throughput --json b.json \
        --no-append
    python scripts/benchmark.py --from-json a.json b.json
`--time-budget S` skips what would start after S seconds. With an HF engine in the same run, the JAX engine takes
--gpu-memory-utilization 0.5 of the GPU by default (JAX's allocator keeps what it took; HF gets the rest), so split
runs give each side the whole GPU. Limits (decode and prefill rows) are measured in the same run by the harness
benchmark_kernels.py shares (bench_harness.py): decode against (weights + KV bytes read per step) / device copy
bandwidth, prefill against FLOPs / bf16 matmul FLOP/s.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: torch and JAX share the GPU

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # run from a checkout without installing; the harness beside us

import jax  # noqa: E402
import numpy as np  # noqa: E402

import qwen3_jax as q  # noqa: E402
from qwen3_jax.config import DTYPES  # noqa: E402
from qwen3_jax.weights import random_params  # noqa: E402

from bench_harness import (  # noqa: E402
    append_markdown, ceilings_text, command_line, elapsed_s, error_text, fmt, fmt_frac, limit_frac, log,
    measure_ceilings, run_meta, write_json)
from bench_hf import HFContinuousBatching, HFGenerate, hf_model_from_params  # noqa: E402
from bench_jax import JaxEngine  # noqa: E402

# The released Qwen3 dense checkpoints' config.json shapes (all: rms_norm_eps 1e-6, rope_theta 1e6, 40960 positions).
_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "tie_word_embeddings")
PRESETS = {
    "tiny": dict(zip(_SHAPE, (128, 384, 2, 4, 2, 32, 1024, False))),  # for CPU smoke tests
    "0.6B": dict(zip(_SHAPE, (1024, 3072, 28, 16, 8, 128, 151936, True))),
    "1.7B": dict(zip(_SHAPE, (2048, 6144, 28, 16, 8, 128, 151936, True))),
    "4B": dict(zip(_SHAPE, (2560, 9728, 36, 32, 8, 128, 151936, True))),
    "8B": dict(zip(_SHAPE, (4096, 12288, 36, 32, 8, 128, 151936, False))),
    "14B": dict(zip(_SHAPE, (5120, 17408, 40, 40, 8, 128, 151936, False))),
    "32B": dict(zip(_SHAPE, (5120, 25600, 64, 64, 8, 128, 151936, False))),
}
KINDS = ("startup", "decode", "prefill", "throughput", "shared-prefix")  # each engine runs them in this order
ENGINES = {  # name -> the workload kinds it runs; the order is the run order: JAX before torch, hf-compile last
    "jax-pallas": KINDS, "jax-pallas-tp": KINDS, "jax-xla": KINDS, "hf-eager": ("decode", "prefill"),
    "hf-cb": ("throughput",),
    "hf-compile": ("decode",)}
PALLAS_OPS = tuple(f.name for f in dataclasses.fields(q.Kernels) if f.name != "interpret")
NANO_VLLM_IDS = 10_000  # nano-vllm's benchmark draws prompt ids below 10,000
DEFAULTS = dict(batches=[1], prompts=[128], new_tokens=256, prefill=[2048], throughput=[256, 100, 1024],
                shared_prefix=[64, 2000, 100, 128], reps=3)
QUICK = dict(batches=[1, 8], prompts=[128], new_tokens=32, prefill=[512], throughput=[16, 16, 128],
             shared_prefix=[8, 256, 32, 16], reps=2, max_num_batched_tokens=256)


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str  # one of KINDS
    batch: int = 1  # requests submitted at once
    prompt: int = 0  # prompt tokens (throughput: the most; shared-prefix: the shared prefix)
    new_tokens: int = 1  # new tokens per request (throughput: the most)
    min_len: int = 0  # throughput: the fewest prompt and new tokens
    suffix: int = 0  # shared-prefix: each request's own tokens after the prefix
    caching: bool = True  # shared-prefix: the prefix cache on

    @property
    def name(self) -> str:
        return {"decode": f"decode b{self.batch} p{self.prompt}", "prefill": f"prefill {self.prompt}",
                "throughput": f"throughput {self.batch} req {self.min_len}-{self.prompt}",
                "shared-prefix": f"shared-prefix {self.batch}x({self.prompt}+{self.suffix}) n{self.new_tokens} "
                                 f"cache {'on' if self.caching else 'off'}",
                "startup": "startup"}[self.kind]

    @property
    def max_len(self) -> int:
        """The longest request: prompt + new tokens."""
        return 0 if self.kind == "startup" else self.prompt + self.suffix + self.new_tokens


def requests(w: Workload, vocab: int, seed: int, rep: int) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) of each request of a workload's run `rep` (0: the warm-up), the same for every engine.
    Prompt ids are fresh in every run; throughput's lengths are the same in every run. shared-prefix: the first
    request is the one that brings the prefix into the cache (1 new token), the others follow."""
    rng = np.random.default_rng([seed, KINDS.index(w.kind), w.batch, w.prompt, w.new_tokens, rep])
    if w.kind == "throughput":
        lengths = np.random.default_rng([seed, w.batch, w.min_len, w.prompt, w.new_tokens]).integers(
            w.min_len, [w.prompt, w.new_tokens], size=(w.batch, 2), endpoint=True)
        high = min(vocab, NANO_VLLM_IDS)
        return [(rng.integers(0, high, p).tolist(), int(n)) for p, n in lengths]
    if w.kind == "shared-prefix":
        prefix = rng.integers(0, vocab, w.prompt).tolist()
        return [(prefix + rng.integers(0, vocab, w.suffix).tolist(), n) for n in [1] + [w.new_tokens] * w.batch]
    return [(row.tolist(), w.new_tokens) for row in rng.integers(0, vocab, (w.batch, w.prompt))]


def warm_up_requests(w: Workload, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """The untimed run before a throughput run: its prompts (fresh ids), at most 16 new tokens each."""
    return [(p, min(n, 16)) for p, n in requests(w, vocab, seed, 0)]


# ---- model sizes, bytes and FLOPs ----------------------------------------------------------------------------
def model_config(args) -> tuple[str, q.Qwen3Config]:
    if args.config:
        path = Path(args.config)
        path = path / "config.json" if path.is_dir() else path
        config = q.Qwen3Config.from_dict(json.loads(path.read_text()), dtype=args.dtype, source=str(path))
        return path.parent.name or str(path), config
    shape = PRESETS[args.model]
    return f"Qwen3-{args.model}", q.Qwen3Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6,
                                                 max_position_embeddings=40960, dtype=args.dtype)


def itemsize(config: q.Qwen3Config) -> int:
    return np.dtype(config.jnp_dtype).itemsize


def weight_bytes_per_step(config: q.Qwen3Config) -> int:
    """Bytes of weights one decode step reads: all but an untied embedding table (only B of its rows are read)."""
    unread = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (config.num_params() - unread) * itemsize(config)


def kv_bytes(config: q.Qwen3Config, batch: int, positions: float) -> float:
    """Bytes of K and V over `positions` cached positions for `batch` rows, all layers."""
    per_position = 2 * config.num_hidden_layers * config.kv_size * itemsize(config)
    return batch * positions * per_position


def decode_bytes_per_step(config: q.Qwen3Config, batch: int, prompt: int, steps: int) -> float:
    """Fewest bytes a decode step reads: the weights + the KV cache at the mean context of `steps` steps."""
    mean_keys = prompt + (steps + 1) / 2  # decode step j (0..steps-1) attends prompt + j + 1 keys
    return weight_bytes_per_step(config) + kv_bytes(config, batch, mean_keys)


def prefill_flops(config: q.Qwen3Config, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill of `tokens` (batch 1), logits for the last token only."""
    h, l = config.hidden_size, config.num_hidden_layers
    linear = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 3 * h * config.intermediate_size
    attention = 2 * tokens * tokens * config.num_attention_heads * config.head_dim * l  # 4 T^2 Hq D / 2 (causal)
    return 2 * tokens * l * linear + attention + 2 * h * config.vocab_size


# ---- the run --------------------------------------------------------------------------------------------------
def workloads(args) -> list[Workload]:
    """In KINDS' order, but decode's other prompt lengths after prefill (a time budget cuts the last); shared-prefix
    last, cache on before off (the cache-off engine replaces the engine)."""
    want = set(args.workloads)
    decode = [[Workload("decode", b, p, args.new_tokens) for b in args.batches] for p in args.prompts]
    decode = decode if "decode" in want and decode else [[]]
    plan = [Workload("startup")] if "startup" in want else []
    plan += decode[0]
    plan += [Workload("prefill", 1, t) for t in args.prefill] if "prefill" in want else []
    plan += [w for ws in decode[1:] for w in ws]
    if "throughput" in want:
        n, lo, hi = args.throughput
        plan.append(Workload("throughput", n, hi, hi, min_len=lo))
    if "shared-prefix" in want:
        n, prefix, suffix, new = args.shared_prefix
        plan += [Workload("shared-prefix", n, prefix, new, suffix=suffix, caching=c) for c in (True, False)]
    return plan


def engine_options(args, plan: list[Workload]) -> dict:
    """The JAX engines' options: room for every workload's requests at once and its longest request."""
    work = [w for w in plan if w.kind != "startup"]
    util = args.gpu_memory_utilization
    if util is None:  # JAX's allocator keeps what it took: leave the HF engines that follow the rest
        util = 0.5 if any(e.startswith("hf-") for e in args.engines) else q.EngineOptions.gpu_memory_utilization
    return {"max_num_seqs": max((w.batch for w in work), default=1),
            "max_model_len": max((w.max_len for w in work), default=1) + args.decode_steps,
            "max_num_batched_tokens": args.max_num_batched_tokens, "decode_steps": args.decode_steps,
            "gpu_memory_utilization": util, "precompile": True}


def finish_row(row: dict, w: Workload) -> dict:
    """Rates from a row's raw times."""
    if "decode_s" in row and row["decode_s"] > 0:
        step_s = row["decode_s"] / row["decode_steps"]
        row.update(tok_per_s=w.batch / step_s, ms_per_step=step_s * 1e3)
    elif w.kind == "prefill" and row.get("ttft_s"):
        row.update(tok_per_s=w.prompt / row["ttft_s"])
    elif w.kind in ("throughput", "shared-prefix") and row.get("run_s"):
        row.update(tok_per_s=row["output_tokens"] / row["run_s"])
        if "prompt_tokens" in row:
            row["total_tok_per_s"] = (row["prompt_tokens"] + row["output_tokens"]) / row["run_s"]
    return row


def limit_row(row: dict, config: q.Qwen3Config, ceilings: dict) -> dict:
    """A row's fraction of the measured limits (decode: bytes per step / copy bandwidth; prefill: FLOPs / peak)."""
    frac = None
    if row["kind"] == "decode" and row.get("decode_s", 0) > 0:
        nbytes = decode_bytes_per_step(config, row["batch"], row["prompt"], row["decode_steps"])
        frac = limit_frac(row["decode_s"] / row["decode_steps"], ceilings, nbytes=nbytes)
    elif row["kind"] == "prefill" and row.get("ttft_s"):
        frac = limit_frac(row["ttft_s"], ceilings, flops=prefill_flops(config, row["prompt"]))
    if frac is not None:
        row["limit_frac"] = frac
    return row


def run_row(engine, w: Workload, args, vocab: int) -> dict:
    """One engine's raw numbers for one workload, on the requests every engine gets."""
    def reqs(rep):
        return requests(w, vocab, args.seed, rep)

    if w.kind == "startup":
        return engine.startup_row()
    if w.kind == "throughput":  # JaxEngine or HFContinuousBatching
        return engine.throughput(warm_up_requests(w, vocab, args.seed), reqs(1), args.temperature)
    if isinstance(engine, JaxEngine):
        runs = [reqs(rep) for rep in range(args.reps + 1)]
        if w.kind == "shared-prefix":
            return engine.shared_prefix(runs, w.caching)
        profile = None
        if args.profile is not None and w.kind == "decode":
            profile = (args.profile / f"{engine.name}-b{w.batch}-p{w.prompt}", reqs(args.reps + 1))
        return engine.decode(runs, profile)
    ids = np.array([p for p, _ in reqs(1)])
    return engine.run(w.kind, ids, w.new_tokens, args.reps, args.hf_cap_s)


def run_benchmark(args) -> dict:
    model_name, config = model_config(args)
    plan = workloads(args)
    options = engine_options(args, plan)
    result = {
        "meta": {"model": model_name, "config": dataclasses.asdict(config), **run_meta(args.command, args.commit),
                 "decode_steps": args.decode_steps, "engine_options": options,
                 "pallas_ops": args.pallas_ops or "all", "temperature": args.temperature,
                 "tensor_parallel": args.tensor_parallel,
                 "params": config.num_params(), "weight_bytes": config.num_params() * itemsize(config)},
        "rows": [],
    }
    log(f"{model_name}: {config.num_params() / 1e9:.3f} B params, {config.dtype}, on {result['meta']['gpu']}")
    t = time.perf_counter()
    params = jax.block_until_ready(random_params(config, args.seed))
    result["meta"]["init_s"] = {"jax": time.perf_counter() - t}
    engines = {}
    for name in args.engines:
        if name.startswith("jax-"):
            kernels = q.Kernels.reference() if name == "jax-xla" else q.Kernels.pallas()
            if name.startswith("jax-pallas") and args.pallas_ops is not None:  # ablation: other ops on references
                kernels = q.Kernels(**dict.fromkeys(args.pallas_ops, True), interpret=kernels.interpret)
            model = q.Qwen3(config, params, tokenizer=None, generation_config={}, kernels=kernels)
            if name == "jax-pallas-tp":  # the kernels, split over --tensor-parallel devices
                model = model.with_tensor_parallel(args.tensor_parallel)
            engines[name] = JaxEngine(name, model, options)

    # The JAX engines run first, every workload, before torch launches a kernel in this process: once it has (an HF
    # engine), JAX's decode runs ~10% slower in the same process at the same GPU kernel time (H100, 0.6B batch 1;
    # BENCHMARKS.md), which a user running JAX alone never sees. Then the limits (after the JAX rows, so their
    # buffers stay out of JAX's peak) and the HF engines, hf-compile last: it compiles for each shape, so a time
    # budget cuts it first. (JAX's allocator keeps its peak, so the HF engines run in what is left of the GPU.)
    order = [(w, e) for e in ENGINES if e in args.engines for w in plan if w.kind in ENGINES[e]]
    last_s, previous = {}, None
    for w, name in order:
        if previous is not None and previous != name and isinstance(engines.get(previous), JaxEngine):
            engines[previous].close()  # its memory to the next engine
        previous = name
        if name.startswith("hf-") and "ceilings" not in result:  # the JAX rows are done: now torch may run
            _after_jax_rows(args, config, params, result, engines)
        row = {"engine": name, "workload": w.name, "kind": w.kind, "batch": w.batch, "prompt": w.prompt,
               "requested_new_tokens": w.new_tokens}
        if w.kind == "throughput":
            row["min_len"] = w.min_len
        elif w.kind == "shared-prefix":
            row.update(suffix=w.suffix, prefix_caching=w.caching)
        result["rows"].append(row)
        if args.time_budget and elapsed_s() + last_s.get((name, w.kind), 0.0) > args.time_budget:
            row["note"] = "skipped: time budget"
            log(f"{name:10s} {w.name:18s} skipped (time budget)")
            continue
        t = time.perf_counter()
        try:
            row.update(run_row(engines[name], w, args, config.vocab_size))
            finish_row(row, w)
            if "ceilings" in result:
                limit_row(row, config, result["ceilings"])
            if name.startswith("jax-"):  # the process's peak so far (weights, KV pool, steps), GPU only
                row["device_peak_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        except Exception as e:  # one failure (an OOM, a kernel error) must not end the run
            row["error"] = error_text(e)
        finally:
            gc.collect()
            if name.startswith("hf-") and "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()  # hand torch's cached blocks back
        last_s[(name, w.kind)] = time.perf_counter() - t
        row["wall_s"] = last_s[(name, w.kind)]
        log(f"{name:10s} {w.name:18s} " + (row["error"] if "error" in row else _summary(row)))
        if args.json:
            write_json(args.json, result)
    for name, engine in engines.items():
        if isinstance(engine, JaxEngine):
            engine.close()
            if engine.startup is not None:  # also where no start-up row was asked for
                result["meta"].setdefault("startup", {})[name] = engine.startup
    if "ceilings" not in result:  # no HF engine: the limits still come after the JAX rows
        _after_jax_rows(args, config, params, result, engines)
    result["meta"]["total_s"] = elapsed_s()
    return result


def _summary(row: dict) -> str:
    if row["kind"] == "startup":
        return f"{row['executables']} step executables compiled in {row['compile_s']:.1f} s ({row['wall_s']:.1f} s)"
    text = f"{row.get('tok_per_s', 0):10,.1f} tok/s  "
    if "limit_frac" in row:
        text += f"{fmt_frac(row['limit_frac'], '5.1f')} of limit  "
    if row["kind"] == "shared-prefix":
        text += f"TTFT mean {row['ttft_mean_s'] * 1e3:.1f} ms  "
    return text + f"({row['wall_s']:.1f} s)"


def _after_jax_rows(args, config, params, result, engines) -> None:
    """After the JAX rows: JAX's peak memory, the limits, then the HF model on the JAX weights (DLPack views)."""
    result["meta"]["jax_peak_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    result["ceilings"] = ceilings = measure_ceilings(args.quick)
    log(f"ceilings: {ceilings_text(ceilings)}")
    for row in result["rows"]:  # the JAX rows so far
        limit_row(row, config, ceilings)
    if args.json:
        write_json(args.json, result)
    if not any(e.startswith("hf-") for e in args.engines):
        return
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    dynamo = torch._dynamo.config  # one compiled graph per (batch, cache length): allow more than 8
    setattr(dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 64)
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    model = hf_model_from_params(config, params, device)
    result["meta"]["init_s"]["hf"] = time.perf_counter() - t
    shared = result["meta"]["weight_bytes"] if device == "cuda" else 0  # cuda only with JAX on the GPU too
    for name in args.engines:
        if name == "hf-cb":
            engines[name] = HFContinuousBatching(name, model, device, shared)
        elif name.startswith("hf-"):
            engines[name] = HFGenerate(name, model, device, shared)
    log(f"HF model ready in {result['meta']['init_s']['hf']:.1f} s")


# ---- the table ------------------------------------------------------------------------------------------------
def _cells(*cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def _gb(nbytes) -> str:
    return fmt(nbytes / 1e9 if nbytes else None, ".1f")


def _rate(x) -> str:
    return fmt(x, ",.0f" if (x or 0) >= 100 else ".1f")


def _note(row: dict) -> str:
    return row.get("error") or row.get("note", "")


def render(results: list[dict]) -> str:
    """A markdown section for one or more runs of the same model (rows merged, ratios across them)."""
    first = results[0]["meta"]
    if any(r["meta"]["model"] != first["model"] for r in results):
        raise ValueError("--from-json: the runs are of different models")
    rows = [row for r in results for row in r["rows"]]
    plan = list(dict.fromkeys(row["workload"] for row in rows))
    rows.sort(key=lambda row: (plan.index(row["workload"]), list(ENGINES).index(row["engine"])))
    p = first["params"]
    lines = [f"## {first['model']} — {first['gpu']}, {first['date']}", ""]
    for r in results:
        m, c = r["meta"], r.get("ceilings")
        init = ", ".join(f"{k} {v:.1f} s" for k, v in m.get("init_s", {}).items())
        ops = m.get("pallas_ops", "all")
        ops = "" if ops == "all" else f"; jax-pallas kernels: {', '.join(ops)} only"
        limits = "not measured (the run stopped before the JAX rows were done)" if c is None else ceilings_text(c)
        v = m["versions"]
        lines += [f"- `{m['command']}` (commit {m['commit']}, {m['gpu']}, {m['date']}, jax {v['jax']}{ops}, "
                  f"torch {v['torch']}, transformers {v['transformers']})",
                  f"  - measured limits: {limits}; weight init: {init}; run took {m.get('total_s', 0):.0f} s"]
        if "engine_options" in m:
            lines.append("  - JAX engine options: " + ", ".join(f"{k}={v}" for k, v in m["engine_options"].items()))
    lines += [f"- {p / 1e9:.3f} B params ({first['config']['dtype']}, random weights, "
              f"{first['weight_bytes'] / 1e9:.2f} GB); HF's parameters are DLPack views of the JAX arrays, so both run "
              "on the very same weights", ""]
    by_kind = collections.defaultdict(list)
    for row in rows:
        by_kind[row.get("kind", "decode")].append(row)
    if by_kind["decode"] or by_kind["prefill"]:
        lines += _latency_table(by_kind["decode"] + by_kind["prefill"], first)
    if by_kind["throughput"]:
        lines += _throughput_table(by_kind["throughput"], first)
    if by_kind["shared-prefix"]:
        lines += _shared_prefix_table(by_kind["shared-prefix"])
    if by_kind["startup"]:
        lines += _startup_table(by_kind["startup"])
    aliased = [row for row in rows if "cache_aliased" in row]
    if aliased:
        ok = sum(row["cache_aliased"] for row in aliased)
        lines += [f"JAX steps update the KV cache in place: its buffers kept their device addresses through every step "
                  f"of {ok} of {len(aliased)} decode workloads' untimed runs" + ("" if ok == len(aliased) else
                                                                                  " (NOT all: see JSON)"), ""]
    peaks = [f"{r['meta']['jax_peak_bytes'] / 1e9:.1f} GB" for r in results if r["meta"].get("jax_peak_bytes")]
    if peaks:
        lines += [f"JAX's runtime peak of device bytes in use over its rows: {', '.join(peaks)}", ""]
    return "\n".join(lines)


def _latency_table(rows: list[dict], meta: dict) -> list[str]:
    rows.sort(key=lambda row: row["kind"] != "decode")
    k = meta.get("decode_steps", meta.get("chunk", 8))  # runs saved before the engine named it chunk
    rate = {(row["engine"], row["workload"]): row.get("tok_per_s") for row in rows}
    lines = [
        "- decode: greedy, EOS ignored, random prompt ids. JAX (the engine): tok/s = tokens delivered after every "
        f"request has its first token / the seconds from then to the last token (the engine runs {k} decode steps per "
        "device call); HF: batch x (n-1) / the seconds after the prefill. limit = (weights + KV read per step at the "
        "mean context) / copy bandwidth",
        "- prefill: batch 1, time to first token (JAX: the request's arrival to its first token, the prompt in chunks "
        "of max_num_batched_tokens); limit = FLOPs (2 x params x T + causal attention) / matmul peak",
        "- peak GB: HF = torch.cuda.max_memory_allocated + the shared weights (JAX's weights and KV pool: the start-up "
        "table); warm-up s: JAX = the workload's untimed run (its steps compiled at start-up), HF = first calls",
        "",
        _cells("engine", "workload", "tok/s", "ms/step", "TTFT ms", "% of limit", "× HF eager", "× HF compile",
               "peak GB", "warm-up s", "notes"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        tok = row.get("tok_per_s")
        ratios = []
        for ref in ("hf-eager", "hf-compile"):
            base = rate.get((ref, row["workload"]))
            ratios.append(fmt(tok / base if tok and base else None, ".2f", "×"))
        lines.append(_cells(row["engine"], row["workload"], _rate(tok), fmt(row.get("ms_per_step"), ".2f"),
                            fmt(row["ttft_s"] * 1e3 if "ttft_s" in row else None, ".1f"),
                            fmt_frac(row.get("limit_frac")), *ratios, _gb(row.get("peak_bytes")),
                            fmt(row.get("warmup_s"), ".1f"), _note(row)))
    return lines + [""]


def _throughput_table(rows: list[dict], meta: dict) -> list[str]:
    temp = meta.get("temperature", 0.0)
    sampling = "greedy" if not temp else f"sampled at temperature {temp}"
    base = {row["workload"]: row.get("tok_per_s") for row in rows if row["engine"] == "hf-cb"}
    lines = [
        "- throughput (nano-vllm's benchmark): N requests, prompt and output lengths each uniform in [min, max] "
        f"(seeded), random prompt ids (< {NANO_VLLM_IDS:,}), EOS ignored, {sampling}, all submitted at once; one timed "
        "run after an untimed one (the same lengths, other ids, <= 16 new tokens). output tok/s = output tokens / wall "
        "time; total counts the prompt tokens too. hf-cb: transformers' continuous batching with its defaults, each "
        "request its own max_new_tokens (add_request, the manager generate_batch runs)",
        "",
        _cells("engine", "workload", "output tok/s", "total tok/s", "wall s", "output tokens", "preemptions",
               "TTFT p50 s", "× hf-cb", "warm-up s", "notes"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        tok, ref = row.get("tok_per_s"), base.get(row["workload"])
        lines.append(_cells(row["engine"], row["workload"], _rate(tok), _rate(row.get("total_tok_per_s")),
                            fmt(row.get("run_s"), ".1f"), fmt(row.get("output_tokens"), ",d"),
                            fmt(row.get("preemptions"), "d"), fmt(row.get("ttft_s"), ".2f"),
                            fmt(tok / ref if tok and ref else None, ".2f", "×"), fmt(row.get("warmup_s"), ".1f"),
                            "; ".join(filter(None, [row.get("attention"), _note(row)]))))
    return lines + [""]


def _shared_prefix_table(rows: list[dict]) -> list[str]:
    def key(row):
        return row["engine"], row["workload"].rsplit(" cache ", 1)[0]

    off = {key(row): row for row in rows if not row.get("prefix_caching")}
    lines = [
        "- shared-prefix: per run, first one request carrying the prefix + its own suffix (1 new token: with the "
        "cache on, the prefix's full blocks stay cached), then the N requests (prefix + a unique suffix each, EOS "
        "ignored, greedy) submitted at once, timed from submission to the last token. TTFT = each request's first "
        "token - its arrival (RequestOutput.metrics). Median over the timed runs, each with a fresh prefix, after "
        "one untimed run. Cache off: a second engine (enable_prefix_caching=False), built after the first is "
        "dropped, its steps compiled on first use in the untimed run. TTFT × = off / on; tok/s × = on / off",
        "",
        _cells("engine", "workload", "TTFT mean ms", "TTFT p50 ms", "output tok/s", "wall s", "cached tokens/req",
               "preemptions", "TTFT ×", "tok/s ×", "warm-up s", "notes"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        ttft, p50, tok = row.get("ttft_mean_s"), row.get("ttft_p50_s"), row.get("tok_per_s")
        other = off.get(key(row)) if row.get("prefix_caching") else None
        ttft_x = tok_x = None
        if other and ttft and other.get("ttft_mean_s"):
            ttft_x = other["ttft_mean_s"] / ttft
        if other and tok and other.get("tok_per_s"):
            tok_x = tok / other["tok_per_s"]
        lines.append(_cells(row["engine"], row["workload"], fmt(ttft * 1e3 if ttft else None, ".1f"),
                            fmt(p50 * 1e3 if p50 else None, ".1f"), _rate(tok), fmt(row.get("run_s"), ".2f"),
                            fmt(row.get("cached_tokens_mean"), ".0f"), fmt(row.get("preemptions"), ".0f"),
                            fmt(ttft_x, ".1f", "×"), fmt(tok_x, ".2f", "×"), fmt(row.get("warmup_s"), ".1f"),
                            _note(row)))
    return lines + [""]


def _startup_table(rows: list[dict]) -> list[str]:
    lines = [
        "- start-up: `LLM(...)` with precompile: every prefill and decode bucket compiled (greedy and sampled), "
        "concurrently; compile s = wall time, CPU-s = summed over the compile threads; step executables = XLA "
        "compilations of prefill_step / decode_step seen by jax.monitoring",
        "",
        _cells("engine", "compile s", "step executables", "compile CPU-s", "LLM up s", "KV pool", "options", "notes"),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        o = row.get("options", {})
        opts = ", ".join(f"{k} {o[k]}" for k in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                                 "decode_steps", "block_size") if k in o)
        pool = (f"{row['kv_blocks']} blocks, {row['kv_pool_bytes'] / 2**30:.2f} GiB" if "kv_pool_bytes" in row
                else "—")
        lines.append(_cells(row["engine"], fmt(row.get("compile_s"), ".1f"), fmt(row.get("executables"), "d"),
                            fmt(row.get("compile_cpu_s"), ".1f"), fmt(row.get("build_s"), ".1f"), pool, opts,
                            _note(row)))
    return lines + [""]


# ---- command line ---------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="0.6B", help="Qwen3 size (random weights)")
    p.add_argument("--config", help="a config.json (or its directory) to benchmark instead of a preset")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weight and activation dtype")
    p.add_argument("--engines", type=_names,
                   help=f"comma list of {', '.join(ENGINES)} (default: all; on a CPU: jax-xla, hf-eager, hf-cb, as "
                        "jax-pallas runs in interpret mode and hf-compile compiles for minutes there)")
    p.add_argument("--skip-compile", action="store_true", help="drop hf-compile (it compiles for minutes)")
    p.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="split the jax-pallas-tp engine's model over N devices (given, it joins the default engines; "
                        "N=1 runs the sharded code path on one device, to set beside jax-pallas)")
    p.add_argument("--workloads", type=_names, default=list(KINDS), help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--batches", type=_ints, help=f"decode batch sizes (default {DEFAULTS['batches']})")
    p.add_argument("--prompts", type=_ints, help=f"decode prompt lengths (default {DEFAULTS['prompts']})")
    p.add_argument("--new-tokens", type=int, help=f"new tokens per decode request (default {DEFAULTS['new_tokens']})")
    p.add_argument("--prefill", type=_ints, help=f"prefill prompt lengths, batch 1 (default {DEFAULTS['prefill']})")
    p.add_argument("--throughput", type=_ints, metavar="N,MIN,MAX",
                   help="throughput: N requests, prompt and output lengths uniform in [MIN, MAX] (default "
                        f"{','.join(map(str, DEFAULTS['throughput']))}: nano-vllm's benchmark)")
    p.add_argument("--shared-prefix", type=_ints, metavar="N,PREFIX,SUFFIX,NEW",
                   help="shared-prefix: N requests of one PREFIX-token prefix + SUFFIX unique tokens, NEW new tokens "
                        f"each (default {','.join(map(str, DEFAULTS['shared_prefix']))})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="throughput's sampling temperature (0: greedy; nano-vllm's benchmark samples at 0.6)")
    p.add_argument("--decode-steps", type=int, default=q.EngineOptions.decode_steps,
                   help="JAX engine: decode tokens per device call")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help=f"JAX engine: token budget of one prefill step (default "
                        f"{q.EngineOptions.max_num_batched_tokens}; --quick: {QUICK['max_num_batched_tokens']})")
    p.add_argument("--gpu-memory-utilization", type=float,
                   help="JAX engine: fraction of the GPU for weights, KV pool and steps (default 0.5 with an HF "
                        f"engine in the run, else {q.EngineOptions.gpu_memory_utilization})")
    p.add_argument("--pallas-ops", type=_names,
                   help=f"jax-pallas runs only these ops as kernels, the rest as references (comma list of "
                        f"{', '.join(PALLAS_OPS)}; default: all; with both qkv_rope and decode_attention a decode step "
                        f"runs them as one fused kernel)")
    p.add_argument("--reps", type=int, help=f"timed runs per workload, median reported (default {DEFAULTS['reps']}; "
                                            "throughput: one)")
    p.add_argument("--hf-cap-s", type=float, default=3.0,
                   help="hf-eager/hf-compile decode: fewer new tokens where a run would take longer (0: never)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds after which remaining workloads are skipped (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + ", small ceilings (explicit flags win)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file the table is appended to")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    p.add_argument("--json", help="also write the raw numbers here (rewritten after every workload)")
    p.add_argument("--commit", help="git commit to record (default: git rev-parse of this checkout)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also trace one decode run per JAX engine and workload into DIR and summarise its GPU kernels")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="render saved runs (one model) instead of measuring")
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = q.EngineOptions.max_num_batched_tokens
    if args.pallas_ops is not None and not set(args.pallas_ops) <= set(PALLAS_OPS):
        p.error(f"--pallas-ops: unknown op(s) {sorted(set(args.pallas_ops) - set(PALLAS_OPS))}; "
                f"choose from {', '.join(PALLAS_OPS)}")
    if args.engines is None:
        args.engines = [e for e in ENGINES if e != "jax-pallas-tp" or args.tensor_parallel is not None]
        if jax.default_backend() == "cpu" and not args.from_json:
            args.engines = [e for e in args.engines if e not in ("jax-pallas", "jax-pallas-tp", "hf-compile")]
    if args.tensor_parallel is None:
        args.tensor_parallel = 1
    elif args.tensor_parallel < 1:
        p.error("--tensor-parallel must be at least 1")
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    if args.skip_compile:
        args.engines = [e for e in args.engines if e != "hf-compile"]
    bad = [w for w in args.workloads if w not in KINDS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {', '.join(KINDS)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one prefill token and at least one decode step)")
    if len(args.throughput) != 3 or not 1 <= args.throughput[1] <= args.throughput[2] or args.throughput[0] < 1:
        p.error("--throughput takes N,MIN,MAX with N >= 1 and 1 <= MIN <= MAX")
    if len(args.shared_prefix) != 4 or min(args.shared_prefix) < 1:
        p.error("--shared-prefix takes N,PREFIX,SUFFIX,NEW, each >= 1")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.command = command_line("benchmark.py", argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = [json.loads(Path(f).read_text()) for f in args.from_json]
    else:
        results = [run_benchmark(args)]
        if args.json:
            write_json(args.json, results[0])
    text = render(results)
    print(text, flush=True)
    if not args.no_append:
        append_markdown(args.out, text)
        log(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
