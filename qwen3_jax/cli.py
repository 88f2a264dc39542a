"""The `qwen3-jax` command: generate, chat, serve, bench (also `python -m qwen3_jax`).

Arguments are parsed and checked before jax is imported, so `--help` and usage errors answer at once. Exit status:
0 done, 1 a failed run, 2 bad usage, 130 interrupted (Ctrl-C), 141 output pipe closed (`| head`). Errors are one
line, `qwen3-jax: error: ...`; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from . import DEMO_MODEL_DIR

PROG = "qwen3-jax"
DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # config.DTYPES, named here so parsing needs no jax
KERNEL_CHOICES = ("auto", "pallas", "reference")


class UsageError(Exception):
    """Bad usage found after parsing (a missing model directory, unreadable stdin, a bad sampling value): exit 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in --help, except where there is none to show (unset flags, switches)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ---- argument types. The sampling ranges repeat SamplingParams' (which checks them again, after jax loads) so
# that a bad value is answered at once; tests/test_cli.py checks that the two agree.
def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _in_range(parse, low, high, *, low_open=False, what=""):
    def check(text: str):
        value = parse(text)
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value
    return check


def _directory(text: str) -> Path:
    return Path(text).expanduser()


# ---- the parser ---------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--debug", action="store_true", help="show full tracebacks (and the library's debug log)")
    cache = g.add_mutually_exclusive_group()
    cache.add_argument("--compilation-cache", metavar="DIR", type=_directory,
                       help="JAX's persistent compilation cache directory, so a later run of the same model and "
                            "shapes skips compiling (default: $QWEN3_JAX_CACHE_DIR, else "
                            "~/.cache/qwen3-jax/jax-cache)")
    cache.add_argument("--no-compilation-cache", action="store_true", help="compile everything afresh, keep nothing")


def _model_options(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    help_text = ("checkpoint directory (config.json, *.safetensors, tokenizer.json) "
                 f"(default: the demo model in {DEMO_MODEL_DIR})")
    if positional:
        p.add_argument("model", nargs="?", type=_directory, metavar="MODEL_DIR", help=help_text)
    else:
        p.add_argument("--model", type=_directory, metavar="DIR", help=help_text)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="Pallas kernels or the jnp reference ops (auto: kernels on a GPU)")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="quantize the linear layers' weights at load (FP8 and AWQ checkpoints load quantized as they "
                        "are)")
    from .server import add_parallel_arguments  # (argparse only: the server's heavy modules load when it runs)

    add_parallel_arguments(p)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    g.add_argument("--temperature", type=_in_range(_finite_float, 0, None, what="must be a number >= 0"),
                   help="sampling temperature, >= 0 (0: greedy)")
    g.add_argument("--top-k", type=_in_range(_int, 0, 2**31 - 1, what="must be an integer in [0, 2**31)"),
                   help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=_in_range(_finite_float, 0, 1, low_open=True, what="must be in (0, 1]"),
                   help="nucleus sampling mass in (0, 1] (1: off)")
    g.add_argument("--min-p", type=_in_range(_finite_float, 0, 1, what="must be in [0, 1]"),
                   help="drop tokens below min_p x the top probability (0: off)")
    g.add_argument("--seed", type=_in_range(_int, 0, 2**32 - 1, what="must be an integer in [0, 2**32)"), default=0,
                   help="random seed for sampling, in [0, 2**32)")
    g.add_argument("--repetition-penalty", type=_in_range(_finite_float, 0, None, low_open=True,
                                                           what="must be a number > 0"),
                   help="HF's repetition penalty over the prompt and output tokens, > 0 (1: off; > 1 discourages "
                        "repeats)")
    g.add_argument("--presence-penalty", type=_in_range(_finite_float, -2, 2, what="must be in [-2, 2]"),
                   help="OpenAI's presence penalty, in [-2, 2]: subtracted once from each token already in the "
                        "output (0: off)")
    g.add_argument("--frequency-penalty", type=_in_range(_finite_float, -2, 2, what="must be in [-2, 2]"),
                   help="OpenAI's frequency penalty, in [-2, 2]: subtracted per occurrence in the output (0: off)")


def _thinking_options(p: argparse.ArgumentParser, what: str) -> None:
    think = p.add_mutually_exclusive_group()
    think.add_argument("--thinking", dest="enable_thinking", action="store_const", const=True,
                       help=f"{what}let the model think first (Qwen3's enable_thinking=True; the template's default)")
    think.add_argument("--no-thinking", dest="enable_thinking", action="store_const", const=False,
                       help=f"{what}skip the thinking block (enable_thinking=False)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `qwen3-jax` parser. `command` is the subcommand about to run: only `serve` imports its module to add its
    arguments."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Qwen3 checkpoints in JAX: generate text, chat, serve an OpenAI-compatible API, measure speed.",
        epilog=f"examples:\n  {PROG} generate --chat --prompt \"What is the capital of Aistonia? ...\"\n"
               f"  {PROG} chat ~/models/Qwen3-0.6B\n  {PROG} serve ~/models/Qwen3-0.6B\n"
               f"  {PROG} bench --model ~/models/Qwen3-0.6B\n\n`{PROG} COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", formatter_class=_Formatter, help="generate text for prompts (or stdin)",
                       description="Generate text from a prompt with a Hugging Face Qwen3 checkpoint directory.",
                       epilog=f"examples:\n  {PROG} generate --chat --no-thinking --prompt \"The capital of "
                              f"Aistonia is Flubarg. What is the capital of Aistonia?\"\n  echo \"Once upon a time\" "
                              f"| {PROG} generate --model ~/models/Qwen3-0.6B --max-new-tokens 64")
    _model_options(g)
    g.add_argument("--prompt", action="append",
                   help="prompt text; repeat for a batch (default: read from stdin, when it is not a terminal)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    _thinking_options(g, "with --chat: ")
    g.add_argument("--max-new-tokens", type=_positive_int, default=256, help="most tokens to generate per prompt")
    _sampling_options(g)
    g.add_argument("--no-stream", action="store_true", help="print the text at the end instead of streaming")
    g.add_argument("--decode-steps", type=_positive_int,
                   help="decode tokens per device call (default: 1 when streaming one prompt, so text arrives "
                        "token by token; 8 otherwise)")
    _common(g)

    c = sub.add_parser("chat", formatter_class=_Formatter, help="interactive multi-turn chat",
                       description="Chat with a model in the terminal, the answer streaming token by token. "
                                   "/help lists the commands (/reset, /system, /think); Ctrl-C stops an answer, "
                                   "Ctrl-D exits.",
                       epilog=f"example:\n  {PROG} chat ~/models/Qwen3-0.6B --system \"Answer briefly.\"")
    _model_options(c, positional=True)
    c.add_argument("--system", help="system prompt for the conversation")
    _thinking_options(c, "")
    c.add_argument("--max-new-tokens", type=_positive_int, default=4096, help="most tokens per answer")
    c.add_argument("--max-model-len", type=_positive_int,
                   help="longest conversation in tokens; sizes the KV cache (default: the model's context)")
    _sampling_options(c)
    c.add_argument("--decode-steps", type=_positive_int, default=1,
                   help="decode tokens per device call (1: text arrives token by token)")
    c.add_argument("--verbose", action="store_true", help="print tokens and tokens per second after each answer")
    _common(c)

    s = sub.add_parser("serve", formatter_class=_Formatter, help="OpenAI-compatible HTTP server",
                       description="Serve a model over an OpenAI-compatible HTTP API.")
    if command == "serve":
        try:
            from .server import add_serve_arguments
        except ImportError as e:
            s.set_defaults(_serve_missing=str(e))
        else:
            add_serve_arguments(s)
    _common(s)

    b = sub.add_parser("bench", formatter_class=_Formatter, help="measure decode speed",
                       description="Measure time to first token and decode speed through qwen3_jax.LLM on random "
                                   "prompt ids (greedy, EOS ignored). scripts/benchmark.py compares engines and "
                                   "workloads at real Qwen3 shapes.",
                       epilog=f"example:\n  {PROG} bench --model ~/models/Qwen3-0.6B --batch 1 --prompt-len 128")
    _model_options(b)
    b.add_argument("--batch", type=_positive_int, default=1, help="requests decoded together")
    b.add_argument("--prompt-len", type=_positive_int, default=128, help="prompt tokens per request")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="tokens generated per request")
    b.add_argument("--decode-steps", type=_positive_int, default=8, help="decode tokens per device call")
    b.add_argument("--repeat", type=_positive_int, default=3, help="timed runs after one warm-up (median shown)")
    _common(b)
    for p in (g, c, s, b):
        p.set_defaults(subparser=p)  # for errors found after parsing, in the subcommand's usage
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen3-jax")
    except PackageNotFoundError:
        return "(not installed)"


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


# ---- checks that need no jax --------------------------------------------------------------------------------
def _check_args(args) -> None:
    sub = args.subparser
    if getattr(args, "greedy", False):
        given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                ("--top-p", args.top_p), ("--min-p", args.min_p)) if v is not None]
        if given:
            sub.error(f"--greedy conflicts with {', '.join(given)} (greedy decoding takes the most likely token; "
                      "drop --greedy to sample)")
    if args.command == "generate":
        if args.enable_thinking is not None and not args.chat:
            flag = "--thinking" if args.enable_thinking else "--no-thinking"
            sub.error(f"{flag} needs --chat (thinking is a switch of the chat template)")
        if args.prompt is not None and not any(p.strip() for p in args.prompt):
            sub.error("argument --prompt: empty prompt")
        empty = [i for i, p in enumerate(args.prompt or []) if not p.strip()]
        if empty:
            sub.error(f"argument --prompt: prompt {empty[0]} of {len(args.prompt)} is empty")
    if hasattr(args, "model"):
        _check_model_dir(Path(args.model or DEMO_MODEL_DIR).expanduser())


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"model directory not found: {path}")
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory: give a Hugging Face checkpoint directory (config.json, "
                         "*.safetensors, tokenizer.json)")
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise UsageError(f"{path / name} not found: a Qwen3 checkpoint directory needs {name}")


def _read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: give --prompt TEXT, or pipe text on stdin "
                         f"(for a conversation: {PROG} chat)")
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise UsageError("empty prompt on stdin (give --prompt TEXT or pipe text)")
    return [text]


# ---- jax from here on ---------------------------------------------------------------------------------------
def _setup(args, *, progress_log: bool = True) -> None:
    """The progress log on stderr and the compilation cache (imports jax)."""
    log = logging.getLogger("qwen3_jax")
    if progress_log:  # our progress lines on stderr; other libraries stay quiet
        log.setLevel(logging.DEBUG if args.debug else logging.INFO)
        if not log.handlers:
            log.addHandler(logging.StreamHandler(sys.stderr))
    from .generate import enable_compilation_cache

    if args.no_compilation_cache:
        return
    import jax

    if args.compilation_cache is None and jax.config.jax_compilation_cache_dir:
        return  # JAX_COMPILATION_CACHE_DIR set by the user: theirs
    try:
        enable_compilation_cache(args.compilation_cache)
    except OSError as e:
        if args.compilation_cache is not None:
            raise UsageError(f"--compilation-cache {args.compilation_cache}: {e.strerror or e}") from None
        log.warning("%s: no persistent compilation cache (%s); --no-compilation-cache silences this",
                    PROG, e.strerror or e)


def _sampling(args, model=None):
    """The sampling flags as SamplingParams over the checkpoint's defaults; without `model`, only checked."""
    from .sampling import SamplingParams

    overrides = dict(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                     min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
                     presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    if model is None:
        try:
            SamplingParams(**{k: v for k, v in overrides.items() if v is not None})
        except ValueError as e:
            raise UsageError(str(e)) from None
        return None
    return model.default_sampling(**overrides)


def describe_sampling(s) -> str:
    text = ("greedy" if s.greedy else
            f"temperature={s.temperature} top_k={s.top_k} top_p={s.top_p} min_p={s.min_p} seed={s.seed}")
    penalties = [f"{n}={getattr(s, n)}" for n, off in (("repetition_penalty", 1), ("presence_penalty", 0),
                                                       ("frequency_penalty", 0)) if getattr(s, n) != off]
    return " ".join([text] + penalties)


def _check_prompts(args, model_dir: Path, prompts: list[str]) -> None:
    """With the small files only (config, tokenizer, chat template), before gigabytes of weights: each prompt
    renders and fits the model's context with --max-new-tokens."""
    from .config import Qwen3Config
    from .tokenizer import Tokenizer

    context = Qwen3Config.from_pretrained(model_dir).max_context_len
    tok = Tokenizer.from_pretrained(model_dir)
    for row, p in enumerate(prompts):
        if args.chat:
            p = tok.apply_chat_template([{"role": "user", "content": p}], enable_thinking=args.enable_thinking)
        n = len(tok.encode(p))
        if n + args.max_new_tokens > context:
            which = f"prompt {row}" if len(prompts) > 1 else "the prompt"
            raise UsageError(f"{which} has {n} tokens; with --max-new-tokens {args.max_new_tokens} that is "
                             f"{n + args.max_new_tokens}, beyond the model's context of {context} tokens "
                             "(max_position_embeddings, or YaRN's factor x original_max_position_embeddings)")


class _CtrlC:
    """SIGINT raises KeyboardInterrupt as usual and is remembered: one that Python swallowed (raised inside a
    garbage-collection callback) is raised again at the next streamed text; a second Ctrl-C exits at once."""

    def __enter__(self):
        self.seen = False
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum, frame):
        if self.seen:
            os._exit(130)
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def run_generate(args) -> int:
    with _CtrlC() as ctrl_c:
        return _generate(args, ctrl_c)


def _generate(args, ctrl_c: _CtrlC) -> int:
    prompts = _read_prompts(args)
    _setup(args)
    _sampling(args)
    model_dir = args.model or DEMO_MODEL_DIR
    _check_prompts(args, model_dir, prompts)
    from .generate import generate, load

    print(f"loading {model_dir} ...", file=sys.stderr)
    model = load(model_dir, dtype=args.dtype, kernels=args.kernels, quantize=args.quantize,
                 tensor_parallel=args.tensor_parallel, devices=args.devices)
    sampling = _sampling(args, model)
    print(f"{model.config.num_params() / 1e6:,.1f}M parameters, {model.config.dtype}, kernels: "
          f"{model.kernels.name}, sampling: {describe_sampling(sampling)}", file=sys.stderr)
    stream = not args.no_stream and len(prompts) == 1
    chunk = args.decode_steps or (1 if stream else None)

    def on_text(row, text):
        ctrl_c.check()
        if stream:
            print(text, end="", flush=True)

    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, chat=args.chat,
                   enable_thinking=args.enable_thinking, on_text=on_text, chunk=chunk)
    if stream:
        print(flush=True)
    else:
        for i, text in enumerate(out.texts):
            print(f"--- [{i}] {text}" if len(prompts) > 1 else text, flush=True)
    print(out.stats.summary(), file=sys.stderr)
    return 0


def run_chat(args) -> int:
    _setup(args)
    _sampling(args)
    from .tokenizer import Tokenizer

    # the chat template renders (from the small tokenizer files) before the weights load
    Tokenizer.from_pretrained(args.model or DEMO_MODEL_DIR).apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], enable_thinking=args.enable_thinking)
    from .chat import chat_main

    return chat_main(args)


def run_serve(args) -> int:
    if getattr(args, "_serve_missing", None):
        raise RuntimeError(f"the server is not available in this installation ({args._serve_missing})")
    _setup(args, progress_log=False)  # the server configures its own logging
    from .server import serve

    return serve(args) or 0


def run_bench(args) -> int:
    _setup(args)
    import numpy as np

    from .llm import LLM
    from .sampling import SamplingParams

    model_dir = args.model or DEMO_MODEL_DIR
    total = args.prompt_len + args.new_tokens
    block_size = 64
    llm = LLM(model_dir, dtype=args.dtype, kernels=args.kernels, quantize=args.quantize,
              tensor_parallel=args.tensor_parallel, devices=args.devices, max_num_seqs=args.batch,
              decode_steps=args.decode_steps, precompile=False, max_model_len=total,
              num_blocks=args.batch * -(-total // block_size), block_size=block_size)
    vocab = llm.model.config.vocab_size
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.new_tokens)
    rng = np.random.default_rng(0)
    print(f"{model_dir}: {llm.model.config.num_params() / 1e6:,.1f}M parameters, {llm.model.config.dtype}, "
          f"kernels: {llm.model.kernels.name}; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
          f"tokens, decode_steps {args.decode_steps}", file=sys.stderr)
    ttft, rates = [], []
    for rep in range(args.repeat + 1):  # the first run compiles; fresh prompts each run miss the prefix cache
        prompts = rng.integers(0, vocab, (args.batch, args.prompt_len)).tolist()
        t0 = time.monotonic()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        first = max(o.metrics.first_token_time for o in outs)
        last = max(o.metrics.finished_time for o in outs)
        tokens = sum(len(o.token_ids) - 1 for o in outs)
        if rep == 0:
            print(f"warm-up (compiling): {last - t0:.1f} s", file=sys.stderr)
            continue
        ttft.append(first - t0)
        rates.append(tokens / (last - first) if last > first else float("nan"))
    print(f"time to first token {np.median(ttft) * 1e3:,.1f} ms | decode {np.median(rates):,.1f} tok/s "
          f"(batch {args.batch}: {np.median(rates) / args.batch:,.1f} tok/s per request; median of {args.repeat})")
    return 0


COMMANDS = {"generate": run_generate, "chat": run_chat, "serve": run_serve, "bench": run_bench}


# ---- main ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else 2
    try:
        try:
            _check_args(args)
            return COMMANDS[args.command](args)
        except SystemExit as e:  # sub.error(...) in the checks
            return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        _newline_on_terminal()
        return 130
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (`| head`): nothing more to say, and nothing at exit either
        return 141
    except UsageError as e:
        if args.debug:
            raise
        _error(str(e))
        return 2
    except Exception as e:  # noqa: BLE001 (the one place every failure becomes a one-line message)
        if args.debug:
            raise
        _error(_one_line(e))
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    known = isinstance(e, (ValueError, TypeError, OSError, LookupError))  # ours and the file system's: self-explaining
    lines = text.splitlines()
    text = lines[0] if lines else type(e).__name__
    if not known or len(lines) > 1:
        text = f"{type(e).__name__}: {text}" if not known else text
        text += " (--debug shows the full error)"
    return text


def _error(message: str) -> None:
    try:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass


def _newline_on_terminal() -> None:
    try:
        if sys.stdout.isatty():
            print(flush=True)
    except (BrokenPipeError, ValueError, OSError):
        pass


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
