#!/usr/bin/env python3
"""Serving benchmark in the style of vLLM's benchmark_serving: the OpenAI-compatible server driven over HTTP.

    python scripts/benchmark_serving.py --model 0.6B --concurrency 1,16,64 --json serve-0.6B.json
    python scripts/benchmark_serving.py --model 8B --concurrency 1,16,64 --json serve-8B.json
    python scripts/benchmark_serving.py --model demo --kernels reference --quick --no-append   # CPU smoke run
    python scripts/benchmark_serving.py --url http://127.0.0.1:8000 --served-model-name M --concurrency 8 --no-compare

--model 0.6B|1.7B|4B|8B|14B|32B serves random weights at that Qwen3's shapes (a server started by this script in a
subprocess, from the package's public API), `demo` the shipped demo model, a directory a checkpoint; --url uses a
server already running. Every request is a `/v1/completions` stream of --input-len random token ids, greedy,
--output-len tokens with EOS ignored. Each --concurrency level runs one untimed round (compiles what it needs),
then --num-prompts requests with at most that many in flight (--request-rate R: Poisson arrivals at R/s instead
of all at once). Reported per level: requests/s, output tok/s, TTFT p50/p99, inter-token latency (ITL) p50/p99 and
time per output token (TPOT: (last token - first token) / (tokens - 1), per request) p50. A streamed chunk of k tokens
(the engine decodes several tokens per device call) counts as k gaps of (chunk time - previous chunk time) / k.
At concurrency 1 the server's TPOT is compared with `LLM.generate` at batch 1 on the same model and prompts, run in
this process after the server has stopped (the issue's target: within 10%).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax: the server process shares the GPU

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_harness import append_markdown, command_line, fmt, log, run_meta, write_json  # noqa: E402

SHAPES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size", "tie_word_embeddings")
PRESETS = {  # the released Qwen3 dense checkpoints' shapes (as scripts/benchmark.py)
    "0.6B": (1024, 3072, 28, 16, 8, 128, 151936, True), "1.7B": (2048, 6144, 28, 16, 8, 128, 151936, True),
    "4B": (2560, 9728, 36, 32, 8, 128, 151936, True), "8B": (4096, 12288, 36, 32, 8, 128, 151936, False),
    "14B": (5120, 17408, 40, 40, 8, 128, 151936, False), "32B": (5120, 25600, 64, 64, 8, 128, 151936, False),
}


# ---- the model and the server ----------------------------------------------------------------------------------
def load_model(args):
    """The benchmarked model: random weights at a preset's shapes, the demo model, or a checkpoint directory."""
    import qwen3_jax as q
    from qwen3_jax.weights import random_params

    if args.model in PRESETS:
        config = q.Qwen3Config(**dict(zip(SHAPES, PRESETS[args.model])), rms_norm_eps=1e-6, rope_theta=1e6,
                               max_position_embeddings=40960, dtype=args.dtype or "bfloat16")
        return q.Qwen3(config, random_params(config, args.seed), tokenizer=None, generation_config={},
                       kernels=q.Kernels.resolve(args.kernels))
    path = q.DEMO_MODEL_DIR if args.model == "demo" else Path(args.model)
    return q.load(path, dtype=args.dtype, kernels=args.kernels)


def engine_options(args) -> dict:
    most = max(args.concurrency)
    opts = {"max_num_seqs": args.max_num_seqs or max(most, 1), "precompile": args.precompile,
            "max_model_len": args.input_len + args.output_len + 16}
    if args.gpu_memory_utilization is not None:
        opts["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.num_blocks is not None:
        opts["num_blocks"] = args.num_blocks
    return opts


def serve_here(args) -> int:
    """--serve: this process is the server (random weights need no checkpoint directory)."""
    import qwen3_jax as q
    from qwen3_jax.server import configure_logging, run_server
    from qwen3_jax.server.serving import ServerConfig

    configure_logging("warning")
    model = load_model(args)
    engine = q.LLMEngine(model, q.EngineOptions(**engine_options(args)))
    config = ServerConfig(served_model_names=(args.served_model_name,), max_waiting_requests=1 << 20, max_n=1)
    return run_server(model, engine, config, host="127.0.0.1", port=args.port, log_level="warning")


def start_server(args) -> subprocess.Popen:
    argv = [a for a in sys.argv[1:] if a != "--serve"] if args.argv is None else args.argv
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", *argv, "--port", str(args.port)]
    return subprocess.Popen(cmd, cwd=ROOT)


async def wait_ready(url: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} while starting")
        try:
            status, _ = await http_get(url, "/health")
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s")
        await asyncio.sleep(1.0)


# ---- a minimal asyncio HTTP/1.1 client (no dependency; its per-chunk cost stays out of the latencies) -------------
def _split_url(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    return host, int(port or 80)


async def http_get(url: str, path: str) -> tuple[int, bytes]:
    host, port = _split_url(url)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


async def stream_completion(url: str, body: dict, api_key: str | None) -> dict:
    """POST a streamed completion; returns its start time, each chunk's (time, new token count) and status."""
    host, port = _split_url(url)
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
                 f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    chunks, buf, error = [], b"", None
    while True:
        size_line = await reader.readline()  # chunked transfer encoding
        if not size_line:
            break
        size = int(size_line.strip() or b"0", 16)
        if size == 0:
            break
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        now = time.perf_counter()
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            msg = json.loads(data)
            if "error" in msg:
                error = msg["error"]["message"]
            for c in msg.get("choices", []):
                if c.get("token_ids"):
                    chunks.append((now, len(c["token_ids"])))
    writer.close()
    return {"start": t0, "chunks": chunks, "status": status, "error": error}


# ---- the workload ------------------------------------------------------------------------------------------------
def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


async def run_level(args, url: str, reqs: list[list[int]], concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    body = {"model": args.served_model_name, "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}

    async def one(p, delay):
        await asyncio.sleep(delay)
        async with sem:
            return await stream_completion(url, {**body, "prompt": p}, args.api_key)

    delays, t = [], 0.0
    rng = random.Random(args.seed)
    for _ in reqs:
        delays.append(t)
        if args.request_rate:
            t += rng.expovariate(args.request_rate)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p, d) for p, d in zip(reqs, delays)))
    wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency, args)


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summarize(results: list[dict], wall: float, concurrency: int, args) -> dict:
    ttft, itl, tpot, tokens, failed = [], [], [], 0, 0
    for r in results:
        if r["status"] != 200 or r["error"] or not r["chunks"]:
            failed += 1
            continue
        times = [t for t, _ in r["chunks"]]
        n = sum(k for _, k in r["chunks"])
        tokens += n
        ttft.append(times[0] - r["start"])
        for (t_prev, _), (t, k) in zip(r["chunks"], r["chunks"][1:]):
            itl += [(t - t_prev) / k] * k
        if n > 1:
            tpot.append((times[-1] - times[0]) / (n - r["chunks"][0][1]) if n > r["chunks"][0][1] else 0.0)
    return {"concurrency": concurrency, "request_rate": args.request_rate, "requests": len(results),
            "failed": failed, "wall_s": wall, "requests_per_s": (len(results) - failed) / wall,
            "output_tok_per_s": tokens / wall, "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p99_ms": _ms(_pct(ttft, 99)),
            "itl_p50_ms": _ms(_pct(itl, 50)), "itl_p99_ms": _ms(_pct(itl, 99)), "tpot_p50_ms": _ms(_pct(tpot, 50))}


def _ms(x):
    return None if x is None else x * 1e3


def generate_baseline(args, reqs: list[list[int]]) -> dict:
    """`LLM.generate` at batch 1 on the same model and prompts: median (last - first token) / (tokens - 1)."""
    import qwen3_jax as q

    llm = q.LLM(load_model(args), **{**engine_options(args), "max_num_seqs": 1})
    params = q.SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    per_token = []
    for i, p in enumerate([reqs[0]] + reqs[:args.baseline_prompts]):  # the first run warms up
        seen = []
        llm.generate([p], params, use_tqdm=False,
                     on_output=lambda _, out: seen.append((time.perf_counter(), len(out.token_ids))))
        (t_first, n_first), (t_last, n_last) = seen[0], seen[-1]
        if i > 0 and n_last > n_first:
            per_token.append((t_last - t_first) / (n_last - n_first))
    return {"generate_tpot_ms": statistics.median(per_token) * 1e3, "runs": len(per_token)}


# ---- report ------------------------------------------------------------------------------------------------------
def render(result: dict) -> str:
    meta = result["meta"]
    lines = [f"## Serving: {meta['model']}, {meta['input_len']} prompt / {meta['output_len']} output tokens, "
             f"{meta['gpu']} ({meta['date']})", "",
             f"`{meta['command']}` (commit {meta['commit']}); streamed `/v1/completions`, greedy, EOS ignored.", "",
             "| concurrency | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TPOT p50 (ms) "
             "| failed |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['concurrency']} | {fmt(r['requests_per_s'], '.2f')} | {fmt(r['output_tok_per_s'], ',.0f')} "
                     f"| {fmt(r['ttft_p50_ms'], '.1f')} / {fmt(r['ttft_p99_ms'], '.1f')} "
                     f"| {fmt(r['itl_p50_ms'], '.2f')} / {fmt(r['itl_p99_ms'], '.2f')} "
                     f"| {fmt(r['tpot_p50_ms'], '.2f')} | {r['failed']} |")
    base = result.get("baseline")
    if base:
        lines += ["", f"Concurrency 1 against `LLM.generate` at batch 1 (same model and prompts): server TPOT "
                      f"{fmt(base['server_tpot_ms'], '.2f')} ms, generate {fmt(base['generate_tpot_ms'], '.2f')} ms: "
                      f"{fmt(base['ratio'], '.3f')}x (target <= 1.10)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="0.6B",
                   help="0.6B|1.7B|4B|8B|14B|32B (random weights), demo, or a checkpoint directory")
    p.add_argument("--url", default=None, help="benchmark a server already running here instead of starting one")
    p.add_argument("--served-model-name", default="bench", help="model name sent in requests")
    p.add_argument("--api-key", default=None, help="API key of the server at --url")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated levels of requests in flight")
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--num-prompts", type=int, default=None, help="timed requests per level (default 4 x concurrency, "
                                                                 "at least 16)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request (EOS ignored)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and random weights")
    p.add_argument("--dtype", default=None, help="weights dtype (random weights: bfloat16)")
    p.add_argument("--kernels", default="auto", choices=["auto", "pallas", "reference"], help="server ops")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (default: the top concurrency)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool blocks (default: from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="device memory fraction for the engine")
    p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step bucket at server start-up")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="at concurrency 1, compare with LLM.generate at batch 1 (not with --url)")
    p.add_argument("--baseline-prompts", type=int, default=3, help="timed LLM.generate runs for the comparison")
    p.add_argument("--port", type=int, default=None, help="port of the started server (default: a free one)")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for the server")
    p.add_argument("--quick", action="store_true", help="tiny run: concurrency 1,2, 4 prompts, 16 in / 8 out")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="append the table here")
    p.add_argument("--no-append", action="store_true", help="do not append to --markdown")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: be the server process
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.concurrency, args.input_len, args.output_len = "1,2", 16, 8
        args.num_prompts = args.num_prompts or 4
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    if args.port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    return args


def main(argv=None) -> dict:
    """Run the benchmark; returns the result (meta, rows, baseline)."""
    args = parse_args(argv)
    if args.serve:
        sys.exit(serve_here(args))
    proc = None if args.url else start_server(args)
    url = args.url or f"http://127.0.0.1:{args.port}"
    rows = []
    try:
        asyncio.run(wait_ready(url, proc, args.startup_timeout))
        log(f"server ready at {url}")
        vocab = PRESETS[args.model][6] if args.model in PRESETS else None
        if vocab is None:
            import qwen3_jax as q
            path = q.DEMO_MODEL_DIR if args.model == "demo" else Path(args.model)
            vocab = q.Qwen3Config.from_pretrained(path).vocab_size if args.url is None else 1000
        for level in args.concurrency:
            n = args.num_prompts or max(16, 4 * level)
            asyncio.run(run_level(args, url, prompts(level, args.input_len, vocab, args.seed + 1000 + level),
                                  level))  # untimed: compiles what this level needs
            row = asyncio.run(run_level(args, url, prompts(n, args.input_len, vocab, args.seed + level), level))
            rows.append(row)
            log(f"concurrency {level}: {row['requests_per_s']:.2f} req/s, {row['output_tok_per_s']:,.0f} tok/s, "
                f"TTFT p50 {fmt(row['ttft_p50_ms'], '.1f')} ms, ITL p50 {fmt(row['itl_p50_ms'], '.2f')} ms, "
                f"TPOT p50 {fmt(row['tpot_p50_ms'], '.2f')} ms, {row['failed']} failed")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    result = {"meta": {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
                       **run_meta(command_line("benchmark_serving.py", args.argv))}, "rows": rows}
    one = next((r for r in rows if r["concurrency"] == 1), None)
    if args.compare and args.url is None and one is not None and one["tpot_p50_ms"]:
        base = generate_baseline(args, prompts(args.baseline_prompts, args.input_len, vocab, args.seed + 1))
        base["server_tpot_ms"] = one["tpot_p50_ms"]
        base["ratio"] = one["tpot_p50_ms"] / base["generate_tpot_ms"]
        result["baseline"] = base
        log(f"concurrency 1: server TPOT {one['tpot_p50_ms']:.2f} ms vs LLM.generate "
            f"{base['generate_tpot_ms']:.2f} ms ({base['ratio']:.3f}x)")
    if args.json:
        write_json(args.json, result)
    text = render(result)
    print(text)
    if not args.no_append:
        append_markdown(args.markdown, text)
    return result


if __name__ == "__main__":
    main()
