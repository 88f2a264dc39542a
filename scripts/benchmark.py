#!/usr/bin/env python3
"""Benchmark qwen3-jax against Hugging Face transformers on random weights at the real Qwen3 shapes.

    python scripts/benchmark.py --model 0.6B --json bench.json          # all four engines, appends to BENCHMARKS.md
    python scripts/benchmark.py --model 8B --skip-compile --time-budget 480
    python scripts/benchmark.py --config path/to/config.json --quick --no-append
    python scripts/benchmark.py --from-json run1.json run2.json         # render saved runs and append them
    python scripts/benchmark.py --engines jax-pallas --batches 1 --prefill "" --profile trace   # where time goes

All four engines at the default workloads take about 11 minutes for 0.6B and 16 for 8B on an H100 (hf-compile
compiles once per batch size and prompt length, ~1 min each; the JAX engines compile ~20 s per workload). Where one
call may last at most 10 minutes, split it by engine and merge the two JSONs into one table:
    python scripts/benchmark.py --model 8B --engines jax-pallas,jax-xla,hf-eager --json a.json --no-append
    python scripts/benchmark.py --model 8B --engines hf-compile --json b.json --no-append
    python scripts/benchmark.py --from-json a.json b.json

Engines, side by side on the same weights (HF's parameters are zero-copy DLPack views of the JAX arrays):
jax-pallas (this project, Pallas kernels), jax-xla (this project, the jnp reference ops), hf-eager
(transformers in PyTorch eager mode, sdpa attention) and hf-compile (static cache + torch.compile of the decode
step, which transformers' `generate` does itself for a static cache; its prefill stays eager). The JAX engines
run all their workloads first, before torch runs a kernel in the process (after that, JAX's small-kernel decode
steps measured ~10% slower in the same process), then HF eager, then hf-compile.
Decode: greedy, no early stop, random prompt ids; tok/s = batch x decode steps / decode time (prefill excluded).
Prefill: batch 1, time to first token. Limits are measured in the same run, after the JAX rows, by the harness
benchmark_kernels.py shares (bench_harness.py): decode against (weights + KV bytes read per step) / device copy
bandwidth, prefill against FLOPs / bf16 matmul FLOP/s.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: torch and JAX share the GPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # run from a checkout without installing; the harness beside us

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen3_jax.config import DTYPES, Qwen3Config  # noqa: E402
from qwen3_jax.generate import DECODE_CHUNK, PAD_MULTIPLE, _Steps, generate_tokens  # noqa: E402
from qwen3_jax.kv_cache import KVCache  # noqa: E402
from qwen3_jax.ops import Kernels  # noqa: E402
from qwen3_jax.sampling import SamplingParams  # noqa: E402
from qwen3_jax.weights import _hf_shapes, random_params, weight_table  # noqa: E402

from bench_harness import (  # noqa: E402
    append_markdown, ceilings_text, command_line, elapsed_s, error_text, fmt, fmt_frac, limit_frac, log,
    measure_ceilings, run_meta, time_calls, write_json)

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
ENGINES = ("jax-pallas", "jax-xla", "hf-eager", "hf-compile")  # also the run order: JAX before torch
PALLAS_OPS = tuple(f.name for f in dataclasses.fields(Kernels) if f.name != "interpret")
GREEDY = SamplingParams.greedy_decoding()


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str  # "decode" or "prefill"
    batch: int
    prompt: int
    new_tokens: int = 1

    @property
    def name(self) -> str:
        return f"decode b{self.batch} p{self.prompt}" if self.kind == "decode" else f"prefill {self.prompt}"


# ---- model sizes, bytes and FLOPs ----------------------------------------------------------------------------
def model_config(args) -> tuple[str, Qwen3Config]:
    if args.config:
        path = Path(args.config)
        path = path / "config.json" if path.is_dir() else path
        return path.parent.name or str(path), Qwen3Config.from_dict(json.loads(path.read_text()), dtype=args.dtype,
                                                                     source=str(path))
    shape = PRESETS[args.model]
    return f"Qwen3-{args.model}", Qwen3Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6,
                                               max_position_embeddings=40960, dtype=args.dtype)


def itemsize(config: Qwen3Config) -> int:
    return np.dtype(config.jnp_dtype).itemsize


def weight_bytes_per_step(config: Qwen3Config) -> int:
    """Bytes of weights one decode step reads: all but an untied embedding table (only B of its rows are read)."""
    unread = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (config.num_params() - unread) * itemsize(config)


def kv_bytes(config: Qwen3Config, batch: int, positions: float) -> float:
    """Bytes of K and V over `positions` cached positions for `batch` rows, all layers."""
    per_position = 2 * config.num_hidden_layers * config.kv_size * itemsize(config)
    return batch * positions * per_position


def decode_bytes_per_step(config: Qwen3Config, batch: int, prompt: int, steps: int) -> float:
    """Fewest bytes a decode step reads: the weights + the KV cache at the mean context of `steps` steps."""
    mean_keys = prompt + (steps + 1) / 2  # decode step j (0..steps-1) attends prompt + j + 1 keys
    return weight_bytes_per_step(config) + kv_bytes(config, batch, mean_keys)


def prefill_flops(config: Qwen3Config, tokens: int) -> float:
    """Matmul FLOPs of a causal prefill of `tokens` (batch 1), logits for the last token only."""
    h, l = config.hidden_size, config.num_hidden_layers
    linear = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 3 * h * config.intermediate_size
    attention = 2 * tokens * tokens * config.num_attention_heads * config.head_dim * l  # 4 T^2 Hq D / 2 (causal)
    return 2 * tokens * l * linear + attention + 2 * h * config.vocab_size


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---- profile --------------------------------------------------------------------------------------------------
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


# ---- JAX engines ----------------------------------------------------------------------------------------------
class JaxEngine:
    """This project's generate_tokens, with Pallas kernels or the jnp reference ops."""

    def __init__(self, name: str, config: Qwen3Config, params: dict, kernels: Kernels, chunk: int,
                 profile_dir: Path | None = None):
        self.name, self.config, self.params, self.kernels, self.chunk = name, config, params, kernels, chunk
        self.steps = _Steps(config, kernels, GREEDY.greedy, chunk)
        self.profile_dir = profile_dir

    def _generate(self, prompts, n: int, max_len: int):
        return generate_tokens(self.config, self.params, prompts, max_new_tokens=n, sampling=GREEDY,
                               eos_token_ids=(), kernels=self.kernels, chunk=self.chunk, max_len=max_len)[1]

    def _executables(self, batch: int, prompt: int, max_len: int, decode: bool):
        """The compiled prefill (and decode) steps for these shapes, as generate_tokens built them (cache hits)."""
        padded = _round_up(prompt, PAD_MULTIPLE)
        cache = jax.eval_shape(lambda: KVCache.init(self.config, batch, max_len))
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        key, s = jax.random.key(GREEDY.seed), GREEDY.as_arrays()
        out = {"prefill": self.steps.compiled("prefill", self.params, i32(batch, padded), i32(batch, padded),
                                              cache, i32(batch), key, s)}
        if decode:
            out["decode"] = self.steps.compiled("decode", self.params, i32(batch), i32(batch), cache, key,
                                                jnp.int32(0), s)
        cache_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache))
        return out, cache_bytes

    def _memory(self, executables) -> int:
        """Planned device bytes of the larger step: arguments (params, cache) + outputs - aliased + temporaries."""
        peaks = []
        for exe in executables.values():
            m = exe.memory_analysis()
            peaks.append(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                         + m.temp_size_in_bytes)
        return max(peaks)

    def run(self, w: Workload, ids: np.ndarray, reps: int, cap_s: float) -> dict:
        prompts = ids.tolist()
        n = w.new_tokens
        steps = _round_up(n - 1, self.chunk)  # decode runs whole chunks of `chunk` steps
        max_len = _round_up(max(w.prompt + steps, _round_up(w.prompt, PAD_MULTIPLE)), PAD_MULTIPLE)
        warm = self._generate(prompts, min(n, 2), max_len)  # compiles the steps of the timed runs' shapes
        stats = [self._generate(prompts, n, max_len) for _ in range(reps)]
        n_compiled = len(self.steps._compiled)
        exes, cache_bytes = self._executables(w.batch, w.prompt, max_len, decode=n > 1)
        if len(self.steps._compiled) != n_compiled:  # the shapes above should be exactly generate_tokens' own
            log(f"  note: {self.name}: the memory/alias check compiled new executables (shape mismatch)")
        row = {"new_tokens": n, "warmup_s": warm.compile_s, "peak_bytes": self._memory(exes),
               "ttft_s": statistics.median(s.prefill_s for s in stats),
               "prefill_s_all": [s.prefill_s for s in stats]}
        if n > 1:
            decode_s = statistics.median(s.decode_s for s in stats)
            row.update(decode_s=decode_s, decode_steps=stats[0].decode_tokens // w.batch,
                       decode_s_all=[s.decode_s for s in stats])
            alias = exes["decode"].memory_analysis().alias_size_in_bytes
            row.update(alias_bytes=alias, cache_bytes=cache_bytes, cache_aliased=alias == cache_bytes)
            if self.profile_dir is not None:  # one more (untimed) run under the profiler
                trace = self.profile_dir / f"{self.name}-b{w.batch}-p{w.prompt}"
                with jax.profiler.trace(str(trace)):
                    self._generate(prompts, n, max_len)
                try:
                    row["profile"] = kernel_profile(trace, row["decode_steps"])
                    _log_profile(self.name, row["profile"])
                except RuntimeError as e:  # the timings stand without it
                    row["note"] = f"no profile: {e}"
        return row


# ---- Hugging Face engines -------------------------------------------------------------------------------------
def hf_config(config: Qwen3Config):
    """The transformers Qwen3Config for our config (sdpa attention, no EOS)."""
    from transformers import Qwen3Config as HFQwen3Config

    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type == "linear":
        rope["factor"] = config.rope_factor
    return HFQwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope, max_window_layers=config.num_hidden_layers, use_sliding_window=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
    )


def _to_torch(x: jax.Array, device: str):
    """A torch view of a JAX array on the same device (DLPack, no copy), else a copy through host memory."""
    import torch

    platform = next(iter(x.devices())).platform
    if (platform == "gpu") == (device == "cuda"):
        return torch.from_dlpack(x)
    dtype = getattr(torch, str(x.dtype))
    return torch.from_numpy(np.asarray(x.astype(jnp.float32))).to(device=device, dtype=dtype)


def hf_model_from_params(config: Qwen3Config, params: dict, device: str):
    """A transformers Qwen3ForCausalLM whose weights are the JAX params (q/k/v and gate/up unfused as views)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    cfg = hf_config(config)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    shapes = _hf_shapes(config)
    for path, (keys, _) in weight_table(config).items():
        value = params
        for part in path:
            value = value[part]
        tensor = _to_torch(value, device)
        parts = torch.split(tensor, [shapes[k][0] for k in keys], dim=0) if len(keys) > 1 else (tensor,)
        for key, part in zip(keys, parts):
            module, name = key.rsplit(".", 1)
            model.get_submodule(module)._parameters[name] = torch.nn.Parameter(part, requires_grad=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HF model tensors left without weights: {left[:5]}")
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return model.eval()


class HFEngine:
    """transformers' generate in eager mode (dynamic cache) or with a static cache and its automatic torch.compile."""

    def __init__(self, name: str, model, device: str, shared_bytes: int):
        import torch

        self.name, self.model, self.device, self.shared_bytes = name, model, device, shared_bytes
        self.static = name == "hf-compile"
        self.cuda = device == "cuda"
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _generate(self, ids, n: int) -> tuple[float, float]:
        """(time to first token, decode seconds for the other n-1 tokens) of one generate call."""
        from transformers import LogitsProcessor, LogitsProcessorList

        sync, stamp = self.sync, {}

        class FirstLogits(LogitsProcessor):  # runs right after the prefill forward: the prefill's end
            def __call__(self, input_ids, scores):
                if "t" not in stamp:
                    sync()
                    stamp["t"] = time.perf_counter()
                return scores

        extra = {}
        if self.static:  # transformers compiles the decode step itself for a static cache: one graph per shape
            from transformers import CompileConfig

            extra = {"cache_implementation": "static",
                     "compile_config": CompileConfig(fullgraph=True, dynamic=False)}
        sync()
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                  do_sample=False, logits_processor=LogitsProcessorList([FirstLogits()]), **extra)
        sync()
        t1 = time.perf_counter()
        want = (ids.shape[0], ids.shape[1] + n)
        if tuple(out.shape) != want:
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {want} (stopped early?)")
        return stamp["t"] - t0, t1 - stamp["t"]

    def _prefill(self, ids):
        """The first token of each row, on the host (so the call has finished when it returns)."""
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            return logits[:, -1].argmax(-1).cpu()

    def run(self, w: Workload, ids: np.ndarray, reps: int, cap_s: float) -> dict:
        torch = self.torch
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        row = {}
        if w.kind == "prefill":
            self.sync()
            row["warmup_s"] = time_calls(lambda: self._prefill(ids), 1, warmup=0)[0]
            times = time_calls(lambda: self._prefill(ids), reps, warmup=0)
            row.update(new_tokens=1, ttft_s=statistics.median(times), prefill_s_all=times)
        else:
            t = time.perf_counter()
            if self.static:  # compile at the full cache length, then a second call so CUDA graphs are recorded
                self._generate(ids, w.new_tokens)
                _, probe_s = self._generate(ids, min(w.new_tokens, 16))
                probe_steps = min(w.new_tokens, 16) - 1
            else:  # the first call is cold: time the second
                for _ in range(2):
                    _, probe_s = self._generate(ids, min(w.new_tokens, 8))
                probe_steps = min(w.new_tokens, 8) - 1
            row["warmup_s"] = time.perf_counter() - t
            n = w.new_tokens
            step_s = probe_s / max(probe_steps, 1)
            if cap_s and step_s * (n - 1) > cap_s:  # slow engine: fewer new tokens per timed run
                n = max(16, min(n, int(cap_s / step_s) + 1))
            runs = [self._generate(ids, n) for _ in range(reps)]
            row.update(new_tokens=n, ttft_s=statistics.median(r[0] for r in runs),
                       decode_s=statistics.median(r[1] for r in runs), decode_steps=n - 1,
                       decode_s_all=[r[1] for r in runs], prefill_s_all=[r[0] for r in runs])
            if n < w.new_tokens:
                row["note"] = f"{n} of {w.new_tokens} new tokens (slow)"
        if self.cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated() + self.shared_bytes
        return row


# ---- the run --------------------------------------------------------------------------------------------------
def workloads(args) -> list[Workload]:
    """Decode at the first prompt length, then prefill, then the other prompt lengths: a time budget cuts the last."""
    decode = [[Workload("decode", b, p, args.new_tokens) for b in args.batches] for p in args.prompts]
    prefill = [Workload("prefill", 1, t) for t in args.prefill]
    return [*(decode[0] if decode else []), *prefill, *[w for ws in decode[1:] for w in ws]]


def finish_row(row: dict, w: Workload) -> dict:
    """Rates from a row's raw times."""
    if "decode_s" in row and row["decode_s"] > 0:
        step_s = row["decode_s"] / row["decode_steps"]
        row.update(tok_per_s=w.batch / step_s, ms_per_step=step_s * 1e3)
    elif w.kind == "prefill" and row.get("ttft_s"):
        row.update(tok_per_s=w.prompt / row["ttft_s"])
    return row


def limit_row(row: dict, config: Qwen3Config, ceilings: dict) -> dict:
    """A row's fraction of the measured limits (decode: bytes per step / copy bandwidth; prefill: FLOPs / peak)."""
    frac = None
    if "decode_s" in row and row["decode_s"] > 0:
        nbytes = decode_bytes_per_step(config, row["batch"], row["prompt"], row["decode_steps"])
        frac = limit_frac(row["decode_s"] / row["decode_steps"], ceilings, nbytes=nbytes)
    elif row["kind"] == "prefill" and row.get("ttft_s"):
        frac = limit_frac(row["ttft_s"], ceilings, flops=prefill_flops(config, row["prompt"]))
    if frac is not None:
        row["limit_frac"] = frac
    return row


def run_benchmark(args) -> dict:
    import torch

    model_name, config = model_config(args)
    jax_platform = jax.devices()[0].platform
    device = "cuda" if jax_platform == "gpu" and torch.cuda.is_available() else "cpu"
    result = {
        "meta": {"model": model_name, "config": dataclasses.asdict(config), **run_meta(args.command, args.commit),
                 "chunk": args.chunk, "pallas_ops": args.pallas_ops or "all",
                 "params": config.num_params(), "weight_bytes": config.num_params() * itemsize(config)},
        "rows": [],
    }
    log(f"{model_name}: {config.num_params() / 1e9:.3f} B params, {config.dtype}, on {result['meta']['gpu']}")
    t = time.perf_counter()
    params = jax.block_until_ready(random_params(config, args.seed))
    result["meta"]["init_s"] = {"jax": time.perf_counter() - t}
    engines = {}
    for name in args.engines:
        if name == "jax-xla":
            engines[name] = JaxEngine(name, config, params, Kernels.reference(), args.chunk, args.profile)
        elif name == "jax-pallas":
            kernels = Kernels.pallas()
            if args.pallas_ops is not None:  # an ablation: the other ops on their references
                kernels = Kernels(**dict.fromkeys(args.pallas_ops, True), interpret=kernels.interpret)
            engines[name] = JaxEngine(name, config, params, kernels, args.chunk, args.profile)

    # The JAX engines run first, every workload, before torch launches a kernel in this process: once it has (an HF
    # engine), JAX's decode runs ~10% slower in the same process at the same GPU kernel time (H100, 0.6B batch 1;
    # BENCHMARKS.md), which a user running JAX alone never sees. Then the limits (after the JAX rows, so their
    # buffers stay out of JAX's peak), HF eager, and hf-compile last: it compiles for each shape, so a time budget
    # cuts it first. (JAX's allocator keeps its peak, so the HF engines run in what is left of the GPU's memory.)
    plan = workloads(args)
    order = [(w, e) for e in ENGINES if e in args.engines for w in plan]
    last_s = {}
    for w, name in order:
        if name.startswith("hf-") and "ceilings" not in result:  # the JAX rows are done: now torch may run
            _after_jax_rows(args, config, params, device, result, engines)
        row = {"engine": name, "workload": w.name, "kind": w.kind, "batch": w.batch, "prompt": w.prompt,
               "requested_new_tokens": w.new_tokens}
        result["rows"].append(row)
        if name == "hf-compile" and w.kind == "prefill":
            row["note"] = "n/a: generate compiles decode only; prefill is hf-eager's"
            continue
        if args.time_budget and elapsed_s() + last_s.get((name, w.kind), 0.0) > args.time_budget:
            row["note"] = "skipped: time budget"
            log(f"{name:10s} {w.name:18s} skipped (time budget)")
            continue
        rng = np.random.default_rng([args.seed, w.batch, w.prompt])
        ids = rng.integers(0, config.vocab_size, (w.batch, w.prompt), dtype=np.int64)
        t = time.perf_counter()
        try:
            row.update(engines[name].run(w, ids, args.reps, args.hf_cap_s))
            finish_row(row, w)
            if "ceilings" in result:
                limit_row(row, config, result["ceilings"])
        except Exception as e:  # one failure (an OOM, a kernel error) must not end the run
            row["error"] = error_text(e)
        finally:
            gc.collect()
            if device == "cuda" and name.startswith("hf-"):
                torch.cuda.empty_cache()  # hand torch's cached blocks back
        last_s[(name, w.kind)] = time.perf_counter() - t
        row["wall_s"] = last_s[(name, w.kind)]
        log(f"{name:10s} {w.name:18s} " + (row["error"] if "error" in row else
            f"{row.get('tok_per_s', 0):10,.1f} tok/s  " +
            (f"{fmt_frac(row['limit_frac'], '5.1f')} of limit  " if "limit_frac" in row else "")
            + f"({row['wall_s']:.1f} s)"))
        if args.json:
            write_json(args.json, result)
    if "ceilings" not in result:  # no HF engine: the limits still come after the JAX rows
        _after_jax_rows(args, config, params, device, result, engines)
    result["meta"]["total_s"] = elapsed_s()
    return result


def _after_jax_rows(args, config, params, device, result, engines) -> None:
    """After the JAX rows: JAX's peak memory, the limits, then the HF model on the JAX weights (DLPack views)."""
    import torch

    result["meta"]["jax_peak_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    result["ceilings"] = ceilings = measure_ceilings(args.quick)
    log(f"ceilings: {ceilings_text(ceilings)}")
    for row in result["rows"]:  # the JAX rows so far
        limit_row(row, config, ceilings)
    if args.json:
        write_json(args.json, result)
    if not any(e.startswith("hf-") for e in args.engines):
        return
    import transformers

    transformers.logging.set_verbosity_error()
    dynamo = torch._dynamo.config  # one compiled graph per (batch, cache length): allow more than 8
    setattr(dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 64)
    t = time.perf_counter()
    model = hf_model_from_params(config, params, device)
    result["meta"]["init_s"]["hf"] = time.perf_counter() - t
    shared = result["meta"]["weight_bytes"] if device == "cuda" else 0  # cuda only with JAX on the GPU too
    for name in args.engines:
        if name.startswith("hf-"):
            engines[name] = HFEngine(name, model, device, shared)
    log(f"HF model ready in {result['meta']['init_s']['hf']:.1f} s")


# ---- the table ------------------------------------------------------------------------------------------------
def render(results: list[dict]) -> str:
    """A markdown section for one or more runs of the same model (rows merged, ratios across them)."""
    first = results[0]["meta"]
    if any(r["meta"]["model"] != first["model"] for r in results):
        raise ValueError("--from-json: the runs are of different models")
    rows = [row for r in results for row in r["rows"]]
    plan = list(dict.fromkeys(row["workload"] for row in rows))
    rows.sort(key=lambda row: (plan.index(row["workload"]), ENGINES.index(row["engine"])))
    rate = {(row["engine"], row["workload"]): row.get("tok_per_s") for row in rows}
    p = first["params"]
    chunk = first.get("chunk", DECODE_CHUNK)  # runs saved before the flag existed used the default
    lines = [f"## {first['model']} — {first['gpu']}, {first['date']}", ""]
    for r in results:
        m, c = r["meta"], r.get("ceilings")
        init = ", ".join(f"{k} {v:.1f} s" for k, v in m.get("init_s", {}).items())
        ops = m.get("pallas_ops", "all")
        ops = "" if ops == "all" else f"; jax-pallas kernels: {', '.join(ops)} only"
        limits = "not measured (the run stopped before the JAX rows were done)" if c is None else ceilings_text(c)
        lines += [f"- `{m['command']}` (commit {m['commit']}, {m['gpu']}, {m['date']}, jax {m['versions']['jax']}{ops}, "
                  f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']})",
                  f"  - measured limits: {limits}; weight init: {init}; run took {m.get('total_s', 0):.0f} s"]
    lines += [
        f"- {p / 1e9:.3f} B params ({first['config']['dtype']}, random weights, {first['weight_bytes'] / 1e9:.2f} GB); "
        "HF's parameters are DLPack views of the JAX arrays, so both run on the very same weights",
        "- decode: greedy, no early stop, random prompt ids; tok/s = batch x steps / decode time (prefill "
        f"excluded; JAX runs whole chunks of {chunk} steps on the device, so n new tokens cost "
        f"ceil((n-1)/{chunk})x{chunk} steps); limit = (weights + KV read per step at the mean context) / copy "
        "bandwidth",
        "- prefill: batch 1, time to first token; limit = FLOPs (2 x params x T + causal attention) / matmul peak",
        "- peak GB: JAX = planned bytes of its largest step (params + cache + temporaries); HF = "
        "torch.cuda.max_memory_allocated + the shared weights; warm-up s: JAX compile, HF first calls",
        "",
        "| engine | workload | tok/s | ms/step | TTFT ms | % of limit | × HF eager | × HF compile | peak GB "
        "| warm-up s | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        tok = row.get("tok_per_s")
        ratios = []
        for ref in ("hf-eager", "hf-compile"):
            base = rate.get((ref, row["workload"]))
            ratios.append(fmt(tok / base if tok and base else None, ".2f", "×"))
        note = row.get("error") or row.get("note", "")
        lines.append(" | ".join([
            f"| {row['engine']}", row["workload"],
            fmt(tok, ",.0f" if (tok or 0) >= 100 else ".1f"), fmt(row.get("ms_per_step"), ".2f"),
            fmt(row["ttft_s"] * 1e3 if "ttft_s" in row else None, ".1f"),
            fmt_frac(row.get("limit_frac")), *ratios,
            fmt(row["peak_bytes"] / 1e9 if row.get("peak_bytes") else None, ".1f"),
            fmt(row.get("warmup_s"), ".1f"), note.replace("|", "/") + " |"]))
    aliased = [row for row in rows if "cache_aliased" in row]
    if aliased:
        ok = sum(row["cache_aliased"] for row in aliased)
        lines += ["", f"JAX decode steps update the KV cache in place: compiled alias bytes == cache bytes for {ok} of "
                      f"{len(aliased)} decode executables" + ("" if ok == len(aliased) else " (NOT all: see JSON)")]
    peaks = [f"{r['meta']['jax_peak_bytes'] / 1e9:.1f} GB" for r in results if r["meta"].get("jax_peak_bytes")]
    if peaks:
        lines += ["", f"JAX's runtime peak of device bytes in use over its rows: {', '.join(peaks)}"]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="0.6B", help="Qwen3 size (random weights)")
    p.add_argument("--config", help="a config.json (or its directory) to benchmark instead of a preset")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weight and activation dtype")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--skip-compile", action="store_true", help="drop hf-compile (it compiles for minutes)")
    p.add_argument("--batches", type=_ints, default=[1, 8, 64], help="decode batch sizes")
    p.add_argument("--prompts", type=_ints, default=[128, 1024], help="decode prompt lengths")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per decode run (greedy, no early stop)")
    p.add_argument("--prefill", type=_ints, default=[2048, 8192], help="prefill prompt lengths (batch 1)")
    p.add_argument("--chunk", type=int, default=DECODE_CHUNK, help="JAX decode steps per device call (generate's chunk)")
    p.add_argument("--pallas-ops", type=lambda v: [o.strip() for o in v.split(",") if o.strip()],
                   help=f"jax-pallas runs only these ops as kernels, the rest as references (comma list of "
                        f"{', '.join(PALLAS_OPS)}; default: all; with both qkv_rope and decode_attention a decode step "
                        f"runs them as one fused kernel)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per workload (median reported)")
    p.add_argument("--hf-cap-s", type=float, default=3.0,
                   help="HF decode: fewer new tokens when a run would take longer than this (0: never)")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds after which remaining workloads are skipped (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 1,8, prompt 128, 32 new tokens, "
                                                        "prefill 512, 2 reps, small ceilings")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file the table is appended to")
    p.add_argument("--no-append", action="store_true", help="print the table only")
    p.add_argument("--json", help="also write the raw numbers here (rewritten after every workload)")
    p.add_argument("--commit", help="git commit to record (default: git rev-parse of this checkout)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also trace one decode run per JAX engine and workload into DIR and summarise its GPU kernels")
    p.add_argument("--from-json", nargs="+", metavar="JSON", help="render saved runs (one model) instead of measuring")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.prompts, args.new_tokens, args.prefill, args.reps = [1, 8], [128], 32, [512], 2
    if args.pallas_ops is not None and not set(args.pallas_ops) <= set(PALLAS_OPS):
        p.error(f"--pallas-ops: unknown op(s) {sorted(set(args.pallas_ops) - set(PALLAS_OPS))}; "
                f"choose from {', '.join(PALLAS_OPS)}")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in ENGINES]
    if bad:
        p.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    if args.skip_compile:
        args.engines = [e for e in args.engines if e != "hf-compile"]
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (one prefill token and at least one decode step)")
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
