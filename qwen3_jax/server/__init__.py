"""An OpenAI-compatible HTTP server on the engine, with Qwen3's reasoning and tool-call parsing.

    python -m qwen3_jax.server MODEL_DIR [--host 127.0.0.1 --port 8000 --api-key KEY ...]

`add_serve_arguments(parser)` and `serve(args)` are the command line (argument parsing imports nothing heavy);
`run_server(model, engine, config)` serves an already built engine (a benchmark's random-weight model);
`build_app(serving)` is the FastAPI app alone. Files: protocol.py (request models), parsers.py (<think> and
<tool_call>), engine_loop.py (the engine thread), serving.py / chat.py / completions.py / logprobs.py (the
endpoints), metrics.py (Prometheus), app.py (routes, auth, limits, errors).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

API_KEY_ENV = "QWEN3_JAX_API_KEY"
log = logging.getLogger("qwen3_jax.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's flags (vLLM's names) to `parser`."""
    parser.add_argument("model", help="Hugging Face Qwen3 checkpoint directory")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send (default: the model argument and its directory name)")
    g.add_argument("--max-waiting-requests", type=int, default=256,
                   help="answer 429 to new requests while this many wait for the engine")
    g.add_argument("--max-request-body-bytes", type=int, default=4 * 2**20, help="largest request body accepted")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: max-model-len - 1)")
    g.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens accepted (default: max-model-len - 1)")
    g.add_argument("--max-n", type=int, default=16, help="largest n (choices per request) accepted")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to finish requests in flight before aborting them")
    g.add_argument("--reasoning-parser", choices=["qwen3", "none"], default="qwen3",
                   help="qwen3: return <think>...</think> as reasoning_content; none: leave it in content")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level of the server and uvicorn")
    e = parser.add_argument_group("engine")
    e.add_argument("--dtype", default=None, help="override the checkpoint's dtype (bfloat16, float16, float32)")
    e.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize the linear layers' weights at load (FP8 and AWQ checkpoints load quantized as is)")
    e.add_argument("--kernels", default="auto", choices=["auto", "pallas", "reference"],
                   help="Pallas kernels (auto: on a GPU) or the pure-jnp reference ops")
    add_parallel_arguments(parser, processes=True)
    e.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    e.add_argument("--max-num-seqs", type=int, default=None, help="most sequences running at once (default 256)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one prefill step (default 2048)")
    e.add_argument("--block-size", type=int, default=None, help="positions per KV block (default 64)")
    e.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks in the pool (default: from --gpu-memory-utilization)")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of device memory for weights + KV cache (default 0.9)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse KV blocks of prompt prefixes seen before (default on)")
    e.add_argument("--decode-steps", type=int, default=None, help="decode tokens per device call (default 8)")
    e.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile every step bucket before serving (--no-precompile: on first use)")
    return parser


def device_ids(text: str) -> list[int]:
    """--devices: a comma list of device ids ('0,1,2,3')."""
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma list of device ids such as 0,1, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"device ids are >= 0, got {text!r}")
    return ids


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def add_parallel_arguments(parser: argparse.ArgumentParser, *, processes: bool = False) -> None:
    """--tensor-parallel and --devices; with `processes`, the flags of a multi-process (multi-host) run."""
    g = parser.add_argument_group("tensor parallelism")
    g.add_argument("--tensor-parallel", "-tp", type=_at_least_one, default=None, metavar="N",
                   help="split the model over N devices (in all processes; default: one device, unsplit)")
    g.add_argument("--devices", type=device_ids, default=None, metavar="IDS",
                   help="which devices, as a comma list of JAX device ids (default: the first N)")
    if not processes:
        return
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="several processes (one per host or per GPU): process 0's address, the same for all; "
                        "process 0 serves HTTP, the others follow its steps")
    g.add_argument("--num-processes", type=_at_least_one, default=None, help="processes in all (with --coordinator)")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1 (with --coordinator)")


_ENGINE_FLAGS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks",
                 "gpu_memory_utilization", "enable_prefix_caching", "decode_steps", "precompile")


def server_config(args, served_model_names):
    """The ServerConfig the flags describe."""
    from .serving import ServerConfig

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return ServerConfig(
        served_model_names=tuple(dict.fromkeys(served_model_names)), api_key=key or None,
        max_waiting_requests=args.max_waiting_requests, max_body_bytes=args.max_request_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit, max_n=args.max_n,
        reasoning_parser=args.reasoning_parser, drain_timeout_s=args.drain_timeout)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(args) -> int:
    """Load the model, build and compile the engine, and serve until SIGTERM / Ctrl-C; returns the exit code."""
    configure_logging(args.log_level)
    import time

    t0 = time.perf_counter()
    multi = _check_processes(args)
    if multi:
        from .. import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    log.info("loading %s", args.model)
    from ..engine import EngineOptions, LLMEngine
    from ..generate import load

    model = load(args.model, dtype=args.dtype, kernels=args.kernels, quantize=args.quantize,
                 tensor_parallel=args.tensor_parallel, devices=args.devices)
    log.info("loaded %s (%s, %.2f B params) in %.1f s", args.model, model.config.dtype,
             model.config.num_params() / 1e9, time.perf_counter() - t0)
    options = {k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k) is not None}
    if options.get("precompile"):
        log.info("building the engine and compiling its steps (--no-precompile skips this)")
    engine = LLMEngine(model, EngineOptions(**options))
    log.info("engine ready in %.1f s (compile %.1f s): max_model_len %d, max_num_seqs %d, %d KV blocks",
             time.perf_counter() - t0, engine.compile_s, engine.options.max_model_len, engine.options.max_num_seqs,
             engine.blocks.num_blocks)
    if multi and not distributed.is_leader():
        distributed.follow(engine)  # until process 0 stops serving
        return 0
    if multi:
        engine = distributed.LockstepEngine(engine)
    names = args.served_model_name or [args.model, Path(args.model).name]
    try:
        return run_server(model, engine, server_config(args, names), host=args.host, port=args.port,
                          log_level=args.log_level)
    finally:
        if multi:
            engine.shutdown()


def _check_processes(args) -> bool:
    """Whether this is one process of several (--coordinator), with the flags that go with it."""
    given = [f for f in ("coordinator", "num_processes", "process_id") if getattr(args, f, None) is not None]
    if not given:
        return False
    if len(given) < 3:
        raise ValueError("a multi-process run needs --coordinator, --num-processes and --process-id together")
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id} is not in 0 .. {args.num_processes - 1}")
    if args.tensor_parallel is None:
        raise ValueError("a multi-process run splits the model over every process's devices: give "
                         "--tensor-parallel (the number of devices in all processes)")
    return True


def run_server(model, engine, config, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve `engine` (built on `model`) over HTTP until SIGTERM or Ctrl-C, then drain; returns the exit code."""
    import signal

    import uvicorn

    serving = make_serving(model, engine, config)
    app = build_app(serving)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not serving.draining:
                log.info("signal %d: draining (no new requests; up to %.0f s for those in flight)", sig,
                         config.drain_timeout_s)
            serving.draining = True
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                               timeout_graceful_shutdown=max(1, round(config.drain_timeout_s)), access_log=False)
    # uvicorn re-raises the signal that stopped it under the handlers it found; no-op ones make the exit clean (0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)
    Server(uv_config).run()
    log.info("server stopped")
    return 0


def make_serving(model, engine, config):
    """The engine thread, metrics and limits around a built engine."""
    from .engine_loop import EngineLoop
    from .metrics import ServerMetrics
    from .serving import Serving

    loop = EngineLoop(engine)
    metrics = ServerMetrics(loop)
    loop.on_output, loop.on_abort = metrics.on_output, metrics.on_abort
    return Serving(model, loop, config, metrics)


def build_app(serving):
    """The FastAPI app for a `Serving` (see app.py)."""
    from .app import build_app as _build

    return _build(serving)


__all__ = ["API_KEY_ENV", "add_serve_arguments", "build_app", "make_serving", "run_server", "serve",
           "server_config"]
