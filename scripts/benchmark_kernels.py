#!/usr/bin/env python3
"""Kernel-level speed table: each Pallas kernel against its jnp reference (XLA) and, for attention, cuDNN.

    python scripts/benchmark_kernels.py --json kernels.json --append BENCHMARKS.md   # H100/H200, about 2 min
    python scripts/benchmark_kernels.py --only decode_attention --only attention      # a subset
    python scripts/benchmark_kernels.py --quick                                        # tiny shapes, interpret mode

Every kernel variant is first checked against its `*_reference` on fresh random inputs (relative error
<= 1e-2, NaN fails), then timed; a sweep reports its best variant. The limits are measured in the same run, as
benchmark.py measures them (bench_harness.py): a device copy (bytes read + written) and a bf16 8192^3 matmul.
Bandwidth-bound rows report bytes / time as a fraction of the copy, compute-bound rows FLOP/s as a fraction of the
matmul. Timing (the harness's `device_time`): jit, warm-up, then the median of --samples samples. Short calls are
chained, up to 16 in one executable, each ordered after the last by an optimization barrier (no fusion across
calls, none dropped), over input sets rotated so a round touches twice the 50 MB L2: the per-call time is GPU
time, as inside a jitted model step, not host dispatch. The whole default run takes about 2 minutes on an H100,
compiles included.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: allocate what each case needs

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # run from a checkout without installing; the harness beside us

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_harness import (  # noqa: E402
    append_markdown, ceilings_text, command_line, device_time, error_text, fmt_frac, limit_frac, log,
    measure_ceilings, run_meta, write_json)
from pallas_kernels import attention as attn  # noqa: E402
from pallas_kernels import decode_attention as dec  # noqa: E402
from pallas_kernels import qkv_rope as qr  # noqa: E402
from pallas_kernels import rms_norm as rn  # noqa: E402

KERNELS = ("rms_norm", "qkv_rope", "decode_attention", "attention")  # table order
RUN_ORDER = ("rms_norm", "qkv_rope", "attention", "decode_attention")  # the time budget cuts the last sweeps first
TOLERANCE = 1e-2  # relative error of a bf16 output against its reference
ROTATE_BYTES = 100e6  # rotate input sets until a round of calls touches twice the 50 MB L2
NUM_SMS = 132  # H100 SXM and H200: the decode sweep aims its split counts at them
BF16 = jnp.bfloat16


@dataclasses.dataclass
class Case:
    """One table row: inputs, the kernel for a given block, its reference, and what to count."""

    kernel: str
    shape: str
    make: Callable  # PRNG key -> tuple of input arrays
    ours: Callable  # block -> function of the inputs
    reference: Callable  # function of the inputs -> what `ours` returns
    blocks: list  # variants to sweep, the wrapper's default first
    label: Callable  # block -> short settings string
    nbytes: float  # fewest bytes the op must move
    flops: float = 0.0
    metric: str = "GB/s"  # GB/s, TB/s, TFLOP/s, or "auto": whichever floor binds
    cudnn: tuple | None = None  # (prepare(*inputs) -> cuDNN inputs, function of those -> output like ours)
    refine: Callable | None = None  # best block -> further blocks to try
    donate: tuple = ()  # inputs updated in place and returned last, in order (a KV cache): donated when timed


@dataclasses.dataclass
class Ctx:
    interpret: bool
    samples: int
    sample_s: float  # aim for samples at least this long (k calls each)
    deadline: float  # perf_counter after which sweeps stop at their first variant
    seed: int
    on_gpu: bool
    max_sets: int = 8  # input sets to rotate through, at most
    max_chain: int = 16  # calls chained in one timed executable, at most


# ---- timing and checking --------------------------------------------------------------------------------------
def bench(fn, arg_sets, ctx: Ctx, donate: tuple = ()) -> dict:
    """Median seconds per call of fn as the GPU runs it in a jitted program: the harness's `device_time` with this
    run's sampling (see there for `donate`)."""
    return device_time(fn, arg_sets, samples=ctx.samples, sample_s=ctx.sample_s, max_chain=ctx.max_chain,
                       donate=donate)


def rel_err(out, want) -> float:
    """max over outputs of ||out - want|| / ||want|| in f32; NaN if any shape differs or anything is not finite."""
    outs, wants = jax.tree.leaves(out), jax.tree.leaves(want)
    if len(outs) != len(wants) or any(o.shape != w.shape for o, w in zip(outs, wants)):
        return float("nan")
    errs = [float(e) for e in _rel_errs(outs, wants)]
    return max(errs) if all(math.isfinite(e) for e in errs) else float("nan")


@jax.jit
def _rel_errs(outs, wants):
    f32 = jnp.float32
    return [jnp.linalg.norm((o.astype(f32) - w.astype(f32)).ravel()) / jnp.linalg.norm(w.astype(f32).ravel())
            for o, w in zip(outs, wants)]


def _first_call(fn, args) -> tuple:
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def run_case(case: Case, ctx: Ctx, limits: dict) -> dict:
    """Check and time every block variant, the reference and cuDNN; the row keeps the fastest correct variant."""
    row = {"kernel": case.kernel, "family": case.kernel.split()[0], "shape": case.shape, "sweep": []}
    t_case = time.perf_counter()
    try:
        key = jax.random.fold_in(jax.random.key(ctx.seed), zlib.crc32(f"{case.kernel} {case.shape}".encode()))
        check_key, key = jax.random.split(key)
        make = jax.jit(case.make)  # one compile instead of an eager dispatch per random op
        check_in = jax.block_until_ready(make(check_key))  # checks only: timing draws its own sets
        set_bytes = sum(a.nbytes for a in check_in)
        n_sets = 1 if set_bytes >= ROTATE_BYTES else min(ctx.max_sets, math.ceil(ROTATE_BYTES / set_bytes))
        sets = [jax.block_until_ready(make(k)) for k in jax.random.split(key, n_sets)]
        row["input_sets"] = n_sets
        want, row["reference_compile_s"] = _first_call(jax.jit(case.reference), check_in)

        blocks, tried, refine = list(case.blocks), {}, case.refine  # tried: label -> block
        while blocks:
            blk = blocks.pop(0)
            if case.label(blk) in tried:
                continue
            tried[case.label(blk)] = blk
            entry = {"settings": case.label(blk)}
            row["sweep"].append(entry)
            if row["sweep"][1:] and time.perf_counter() > ctx.deadline:
                entry["skipped"] = "time budget"
            else:
                try:
                    fn = case.ours(blk)
                    out, entry["compile_s"] = _first_call(jax.jit(fn), check_in)
                    entry["rel_err"] = rel_err(out, want)
                    del out
                    entry["ok"] = entry["rel_err"] <= TOLERANCE  # False for NaN
                    if entry["ok"]:
                        entry.update(bench(fn, sets, ctx, case.donate))
                except Exception as e:  # noqa: BLE001 - a variant that fails is a sweep entry, not a crash
                    entry["error"] = error_text(e)
                log(f"  {case.kernel} {case.shape} [{entry['settings']}] " + _entry_text(entry))
            best = _best(row["sweep"])
            if not blocks and refine is not None and best is not None:
                blocks, refine = list(refine(tried[best["settings"]])), None  # a second round around the best

        best = _best(row["sweep"])
        if best is not None:
            row.update(ours_s=best["time_s"], settings=best["settings"], rel_err=best["rel_err"], ok=True)
        else:
            first = row["sweep"][0]
            row["ok"] = False
            row["error"] = first.get("error") or f"wrong result: rel. error {first.get('rel_err', float('nan')):.1e}"

        try:
            row["reference_s"] = bench(case.reference, sets, ctx, case.donate)["time_s"]
        except Exception as e:  # noqa: BLE001
            row["reference_error"] = error_text(e)
        if case.cudnn is not None:
            _run_cudnn(case, row, check_in, sets, want, ctx)
        del want, check_in, sets
        _finish(row, case, limits)
    except Exception as e:  # noqa: BLE001 - one failure (an OOM, a kernel error) must not end the run
        row.update(ok=False, error=error_text(e))
    row["wall_s"] = time.perf_counter() - t_case
    return row


def _best(sweep: list) -> dict | None:
    timed = [e for e in sweep if e.get("ok") and "time_s" in e]
    return min(timed, key=lambda e: e["time_s"]) if timed else None


def _entry_text(entry: dict) -> str:
    if "skipped" in entry:
        return "skipped: " + entry["skipped"]
    if "error" in entry:
        return entry["error"]
    text = f"rel. error {entry['rel_err']:.1e}, compile+first call {entry['compile_s']:.1f} s"
    return text + (f", {_fmt_time(entry['time_s'])}" if "time_s" in entry else "  FAILED CHECK")


def _run_cudnn(case: Case, row: dict, check_in, sets, want, ctx: Ctx) -> None:
    if not ctx.on_gpu:
        row["cudnn_note"] = "needs a GPU"
        return
    prepare, call = case.cudnn
    try:
        prepare = jax.jit(prepare)  # the [B, T, N, D] layout is made here, outside the timed call
        c_check = jax.block_until_ready(prepare(*check_in))
        out, _ = _first_call(jax.jit(call), c_check)
        row["cudnn_rel_err"] = rel_err(out, want)
        del out, c_check
        c_sets = [jax.block_until_ready(prepare(*s)) for s in sets]
        row["cudnn_s"] = bench(call, c_sets, ctx)["time_s"]
    except Exception as e:  # noqa: BLE001
        row["cudnn_error"] = error_text(e)


def _finish(row: dict, case: Case, limits: dict) -> None:
    """Rates, fractions of the measured limits, and speedups from the row's times."""
    row.update(nbytes=case.nbytes, flops=case.flops)
    t = row.get("ours_s")
    if not t:
        return
    kind = case.metric
    if kind == "auto":
        compute, memory = limit_frac(t, limits, flops=case.flops), limit_frac(t, limits, nbytes=case.nbytes)
        kind = "TFLOP/s" if compute and memory and compute > memory else "GB/s"
    if kind == "TFLOP/s":
        row.update(metric=case.flops / t / 1e12, metric_unit=kind, limit_frac=limit_frac(t, limits, flops=case.flops))
    else:
        scale = 1e12 if kind == "TB/s" else 1e9
        row.update(metric=case.nbytes / t / scale, metric_unit=kind,
                   limit_frac=limit_frac(t, limits, nbytes=case.nbytes))
    if row.get("reference_s"):
        row["speedup_vs_reference"] = row["reference_s"] / t
    if row.get("cudnn_s"):
        row["speedup_vs_cudnn"] = row["cudnn_s"] / t


# ---- the cases ------------------------------------------------------------------------------------------------
def _normal(key, shape, scale=1.0, offset=0.0):
    return (offset + scale * jax.random.normal(key, shape, jnp.float32)).astype(BF16)


def _inv_freq(d):
    return 1.0 / 1e6 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2], RoPE at Qwen3's rope_theta 1e6


def rms_norm_cases(quick: bool, interpret: bool):
    n, h = (64, 256) if quick else (8192, 4096)
    eps = 1e-6
    default = rn.default_block(h)
    blocks = [default, rn.RmsNormBlock(block_rows=2, num_warps=4)] if quick else [
        default, *(rn.RmsNormBlock(block_rows=r, num_warps=w) for r, w in ((1, 4), (1, 16), (2, 16), (4, 16)))]

    def label(b):
        return f"rows={b.block_rows} w={b.num_warps}" + (" (default)" if b == default else "")

    def ours(blk):
        return lambda x, w, *r: rn.rms_norm(x, w, eps=eps, residual=r[0] if r else None, block=blk,
                                            interpret=interpret)

    def reference(x, w, *r):
        return rn.rms_norm_reference(x, w, eps=eps, residual=r[0] if r else None)

    for residual in (True, False):
        def make(key, residual=residual):
            kx, kr, kw = jax.random.split(key, 3)
            x, w = _normal(kx, (n, h)), _normal(kw, (h,), 0.1, 1.0)  # [N, H], [H]
            return (x, w, _normal(kr, (n, h))) if residual else (x, w)

        # read x (+ residual) + weight, write normed (+ sum)
        nbytes = (4 if residual else 2) * n * h * 2 + h * 2
        yield Case("rms_norm + residual" if residual else "rms_norm", f"{n}×{h} bf16", make, ours, reference,
                   blocks, label, nbytes)


def qkv_rope_cases(quick: bool, interpret: bool):
    hq, kv, d, s = (4, 2, 32, 64) if quick else (32, 8, 128, 4096)  # s: cache slots
    shapes = [(2, 1), (1, 16)] if quick else [(1, 1), (8, 1), (64, 1), (1, 2048)]
    static = dict(num_heads=hq, num_kv_heads=kv, head_dim=d, eps=1e-6)
    default = qr.QkvRopeBlock()

    def label(b):
        return f"bt={b.block_tokens} w={b.num_warps}" + (" (default)" if b == default else "")

    def ours(blk):
        return lambda *a: qr.qkv_rope(*a[:5], **static, k_cache=a[5], v_cache=a[6], block=blk, interpret=interpret)

    def reference(*a):
        return qr.qkv_rope_reference(*a[:5], **static, k_cache=a[5], v_cache=a[6])

    for b, t in shapes:
        def make(key, b=b, t=t):
            kx, kq, kk, kp = jax.random.split(key, 4)
            qkv = _normal(kx, (b, t, (hq + 2 * kv) * d))  # [B, T, (Hq + 2KV) * D], the projection
            start = jax.random.randint(kp, (b, 1), 0, s - t + 1)  # each row continues at its own position
            # Zero caches [B, KV, S, D] (as a fresh cache): the check's relative error sees the written slots alone.
            k_cache, v_cache = jnp.zeros((b, kv, s, d), BF16), jnp.zeros((b, kv, s, d), BF16)
            return (qkv, _normal(kq, (d,), 0.1, 1.0), _normal(kk, (d,), 0.1, 1.0), _inv_freq(d),
                    (start + jnp.arange(t)).astype(jnp.int32), k_cache, v_cache)

        if quick:
            blocks = [default]
        elif t == 1:  # one token per program: fewer warps may do
            blocks = [default, *(qr.QkvRopeBlock(num_warps=w) for w in (1, 2))]
        else:
            blocks = [default, *(qr.QkvRopeBlock(block_tokens=n, num_warps=w) for n, w in ((16, 4), (64, 8)))]
        yield Case("qkv_rope", f"{'decode' if t == 1 else 'prefill'} B={b} T={t}, {hq}/{kv}×{d}, cache S={s}",
                   make, ours, reference, blocks, label, nbytes=2 * 2 * b * t * (hq + 2 * kv) * d, donate=(5, 6))


def decode_attention_cases(quick: bool, interpret: bool):
    hq, kv, d = (8, 2, 64) if quick else (32, 8, 128)
    shapes = [(2, 128)] if quick else [(8, 8192), (1, 32768), (64, 2048), (1, 512)]
    default = dec.Block()
    blocks = [default, dec.Block(block_k=32, num_warps=8)] if quick else [
        default, *(dec.Block(block_k=bk, num_warps=w) for bk in (64, 128) for w in (4, 8)),
        dec.Block(block_k=256, num_warps=8, num_stages=1)]

    def label(b):
        return (f"bk={b.block_k} splits={b.num_splits or 'auto'} w={b.num_warps} st={b.num_stages}"
                + (" (default)" if b == default else ""))

    def ours(blk):
        return lambda q, k, v, n: dec.decode_attention(q, k, v, n, block=blk, interpret=interpret)

    def cudnn_layout(q, k, v, n):
        return q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, 1, Hq, D], [B, S, KV, D] x2

    def cudnn(q, k, v):  # every row is full (lengths == S): no mask needed
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")[:, 0]

    for b, s in shapes:
        def make(key, b=b, s=s):
            kq, kk, kv_ = jax.random.split(key, 3)
            return (_normal(kq, (b, hq, d)), _normal(kk, (b, kv, s, d)), _normal(kv_, (b, kv, s, d)),
                    jnp.full((b,), s, jnp.int32))  # q [B, Hq, D], k/v [B, KV, S, D], lengths [B]

        def refine(best, b=b, s=s):  # the best tile with splits for about 1 and 4 programs per SM (auto: 2)
            want = [2] if quick else [_cdiv(p * NUM_SMS, b * kv) for p in (1, 4)]
            return [dataclasses.replace(best, num_splits=min(n, _cdiv(s, best.block_k))) for n in want]

        yield Case("decode_attention", f"B={b} S={s}, {hq}/{kv}×{d}", make, ours, dec.decode_attention_reference,
                   blocks, label, nbytes=2 * b * kv * s * d * 2 + 2 * b * hq * d * 2, metric="TB/s",
                   cudnn=(cudnn_layout, cudnn), refine=refine)
    yield from decode_attention_qkv_cases(quick, interpret, shapes, blocks[:1 if quick else 3], label)


def decode_attention_qkv_cases(quick: bool, interpret: bool, shapes, blocks, label):
    """The model's decode step: the QKV epilogue fused into flash-decoding (q/k norm + RoPE, the step's k/v into the
    donated caches, attention over the whole cache), against its reference (qkv_rope_reference + the decode
    reference). Compare with the decode_attention and qkv_rope decode rows for what the fusion saves."""
    hq, kv, d = (8, 2, 64) if quick else (32, 8, 128)
    static = dict(num_heads=hq, num_kv_heads=kv, head_dim=d, eps=1e-6)

    def ours(blk):
        return lambda *a: dec.decode_attention_qkv(*a, **static, block=blk, interpret=interpret)

    def reference(*a):
        return dec.decode_attention_qkv_reference(*a, **static)

    for b, s in shapes:
        def make(key, b=b, s=s):
            kx, kq, kk, kc, kv_ = jax.random.split(key, 5)
            return (_normal(kx, (b, 1, (hq + 2 * kv) * d)), _normal(kq, (d,), 0.1, 1.0), _normal(kk, (d,), 0.1, 1.0),
                    _inv_freq(d), jnp.full((b, 1), s - 1, jnp.int32),  # the token takes the last slot: S keys
                    _normal(kc, (b, kv, s, d)), _normal(kv_, (b, kv, s, d)))

        yield Case("decode_attention", f"fused QKV epilogue, B={b} S={s}, {hq}/{kv}×{d}", make, ours, reference,
                   blocks, label, nbytes=2 * b * kv * s * d * 2 + 2 * b * (2 * hq + 2 * kv) * d, metric="TB/s",
                   donate=(5, 6))


def attention_cases(quick: bool, interpret: bool):
    b, t, hq, kv, d = (1, 64, 8, 2, 64) if quick else (1, 4096, 32, 8, 128)
    default = attn.Block()
    blocks = [default, attn.Block(block_k=32, num_stages=2)] if quick else [
        default, attn.Block(block_q=16, num_warps=4), attn.Block(block_q=64, num_stages=2),
        attn.Block(block_k=128, num_stages=2)]

    def refine(best):  # around the best tiling: other pipeline depths and key tiles
        return [] if quick else [*(dataclasses.replace(best, num_stages=n) for n in (2, 4)),
                                 *(dataclasses.replace(best, block_k=n) for n in (32, 128))]

    def label(blk):
        return (f"bq={blk.block_q or 'auto'} bk={blk.block_k} w={blk.num_warps} st={blk.num_stages}"
                + (" (default)" if blk == default else ""))

    def ours(blk):
        return lambda q, k, v, s: attn.attention(q, k, v, s, block=blk, interpret=interpret)

    def make(key):
        kq, kk, kv_ = jax.random.split(key, 3)
        return (_normal(kq, (b, t, hq, d)), _normal(kk, (b, kv, t, d)), _normal(kv_, (b, kv, t, d)),
                jnp.zeros((b,), jnp.int32))  # q [B, T, Hq, D], k/v [B, KV, T, D], q_start [B]

    def cudnn_layout(q, k, v, s):
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # k/v [B, T, KV, D]: GQA by head count

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    yield Case("attention", f"B={b} T={t} causal, {hq}/{kv}×{d}", make, ours, attn.attention_reference, blocks,
               label, nbytes=2 * (2 * b * t * hq * d + 2 * b * kv * t * d), flops=4 * b * t * t * hq * d / 2,
               metric="TFLOP/s", cudnn=(cudnn_layout, cudnn), refine=refine)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


CASES = {"rms_norm": rms_norm_cases, "qkv_rope": qkv_rope_cases, "decode_attention": decode_attention_cases,
         "attention": attention_cases}


# ---- the table ------------------------------------------------------------------------------------------------
def _fmt_time(s) -> str:
    if s is None:
        return "—"
    return f"{s * 1e6:.1f} µs" if s < 1e-5 else f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _cell(text: str, width: int = 90) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _sweep_text(entry: dict, best: bool) -> str:
    if "skipped" in entry:
        return f"{entry['settings']} skipped"
    if "error" in entry:
        return f"{entry['settings']} {_cell(entry['error'], 60)}"
    if not entry.get("ok"):
        return f"{entry['settings']} WRONG (rel. error {entry['rel_err']:.1e})"
    return f"{entry['settings']} {_fmt_time(entry['time_s'])}" + (" **best**" if best else "")


def _row_cells(row: dict) -> list[str]:
    kernel = row["kernel"] + (f" [{row['settings']}]" if row.get("settings") else "")
    if not row.get("ok"):
        return [kernel, row["shape"], "FAIL: " + _cell(row.get("error", "?")), _fmt_time(row.get("reference_s")),
                _fmt_time(row.get("cudnn_s")), "—", "—", "—"]
    ref = _fmt_time(row["reference_s"]) if "reference_s" in row else _cell(row.get("reference_error", "—"), 40)
    if "cudnn_s" in row:
        cudnn = _fmt_time(row["cudnn_s"])
        if not row["cudnn_rel_err"] <= TOLERANCE:
            cudnn += f" (rel. error {row['cudnn_rel_err']:.1e}!)"
    else:
        cudnn = _cell(row["cudnn_error"], 40) if "cudnn_error" in row else "—"
    unit = row.get("metric_unit")
    metric = "—" if unit is None else f"{row['metric']:.2f} TB/s" if unit == "TB/s" else \
        f"{row['metric']:,.0f} GB/s" if unit == "GB/s" else f"{row['metric']:.0f} TFLOP/s"
    speed = [f"{row[k]:.2f}× {name}" for k, name in (("speedup_vs_reference", "XLA"), ("speedup_vs_cudnn", "cuDNN"))
             if row.get(k)]
    return [kernel, row["shape"], _fmt_time(row["ours_s"]), ref, cudnn, metric, fmt_frac(row.get("limit_frac")),
            ", ".join(speed) or "—"]


def render(result: dict) -> str:
    """The markdown section: how it was run, the limits, the sweeps, then the table."""
    m, lim = result["meta"], result["limits"]
    v = m["versions"]
    lines = [
        f"## Kernels — {m['gpu']}, {m['date']}", "",
        f"- `{m['command']}` (commit {m['commit']}, jax {v['jax']}, jaxlib {v['jaxlib']}, triton {v['triton']}"
        + (", Pallas in interpret mode" if m["interpret"] else "") + f"; run took {m.get('total_s', 0):.0f} s)",
        f"- measured limits (medians, same run): {ceilings_text(lim)}",
        "- ours: the Pallas kernel (Triton lowering), fastest correct variant of its sweep, settings in brackets; "
        "reference (XLA): the module's `*_reference` under jit; cuDNN: `jax.nn.dot_product_attention(implementation"
        "=\"cudnn\")` on q/k/v already in [B, T, N, D] (the transpose is not timed)",
        f"- every variant was checked against the reference on fresh random bf16 inputs before timing (relative error "
        f"<= {TOLERANCE:g}, NaN fails); time per call = median of {m['samples']} samples; short calls run chained, "
        "up to 16 in one executable (each ordered after the last by an optimization barrier) over input sets "
        "rotated past the L2, so host dispatch is not timed: GPU time as inside a jitted model step",
        "- % of limit: GB/s and TB/s rows = fewest bytes (inputs read once, outputs written once) / time / copy "
        "bandwidth; TFLOP/s rows = FLOP/s / matmul (attention: causal FLOPs 4·T²·Hq·D/2); qkv_rope is the "
        "projection's epilogue (q/k norm + RoPE, k/v written into a zeroed cache, donated as in the model; the "
        "reference writes it with dynamic_update_slice): bytes = qkv read + q, k, v written",
    ]
    swept = [r for r in result["rows"] if len(r.get("sweep", [])) > 1]
    if swept:
        lines.append("- sweeps:")
        for r in swept:
            best = r.get("settings") if r.get("ok") else None
            lines.append(f"  - {r['kernel']} {r['shape']}: "
                         + "; ".join(_sweep_text(e, e["settings"] == best) for e in r["sweep"]))
    lines += ["", "| kernel | shape | ours | reference (XLA) | cuDNN | metric (GB/s or TFLOP/s) | % of limit "
                  "| speedup |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=KERNELS, help="run only this kernel family (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, two variants per sweep, 2 samples: a smoke run (works on CPU, interpret mode)")
    p.add_argument("--json", help="write the raw numbers here (rewritten after every case)")
    p.add_argument("--append", type=Path, metavar="MARKDOWN",
                   help="append the section to this file, e.g. BENCHMARKS.md")
    p.add_argument("--samples", type=int,
                   help="timed samples per variant, median reported (default 15; 2 with --quick)")
    p.add_argument("--time-budget", type=float, default=140.0,
                   help="seconds after which each sweep runs only its first (default) variant (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--commit", help="git commit to record (default: git rev-parse of this checkout, -dirty if changed)")
    args = p.parse_args(argv)
    args.samples = args.samples or (2 if args.quick else 15)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    args.command = command_line("benchmark_kernels.py", argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.quick:
        log("warning: no GPU, so the kernels run in interpret mode: full shapes take very long (use --quick)")
    ctx = Ctx(interpret=not on_gpu, samples=args.samples, sample_s=0.0 if args.quick else 2e-3,
              deadline=t0 + args.time_budget if args.time_budget else math.inf, seed=args.seed, on_gpu=on_gpu,
              max_sets=2 if args.quick else 8)
    result = {
        "meta": {**run_meta(args.command, args.commit), "interpret": ctx.interpret, "samples": args.samples,
                 "tolerance": TOLERANCE},
        "limits": {}, "rows": [],
    }
    log(f"{result['meta']['gpu']} ({result['meta']['backend']}), interpret={ctx.interpret}")
    result["limits"] = limits = measure_ceilings(args.quick)
    log(f"limits: {ceilings_text(limits)}")
    for name in RUN_ORDER:
        if args.only and name not in args.only:
            continue
        for case in CASES[name](args.quick, ctx.interpret):
            row = run_case(case, ctx, limits)
            result["rows"].append(row)
            log(f"{row['kernel']} {row['shape']}: " + " | ".join(_row_cells(row)[2:]) + f"  ({row['wall_s']:.1f} s)")
            if args.json:
                write_json(args.json, result)
    result["meta"]["total_s"] = time.perf_counter() - t0
    result["rows"].sort(key=lambda r: KERNELS.index(r["family"]))  # stable: shapes keep their order
    text = render(result)
    if args.json:
        write_json(args.json, result)
    if args.append:
        append_markdown(args.append, text)
        log(f"appended to {args.append}")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
