"""`qwen3-jax chat`: an interactive multi-turn conversation in the terminal, streamed token by token.

`ChatSession` holds the conversation (system prompt, turns, the thinking switch) and runs each answer on the
engine's incremental interface (`add_request` / `step` / `abort_request`), so an answer can stop between any two
steps. `repl` reads lines and slash commands; Ctrl-C stops the current answer, Ctrl-D exits.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable

HELP = """commands:
  /help             this list
  /reset            forget the conversation (the system prompt stays)
  /system TEXT      set the system prompt; /system alone clears it
  /think on|off     let the model think before answering (Qwen3's enable_thinking); /think shows the setting
  /exit             leave (also /quit, /bye, or Ctrl-D)
  \"\"\"               begin or end a message of several lines
Ctrl-C stops the answer being written (it is not kept in the conversation)."""


@dataclasses.dataclass
class Answer:
    text: str
    finish_reason: str  # "stop", "length", "abort"
    tokens: int
    seconds: float  # from the request to its last token


class ChatSession:
    """A conversation with one model on an engine (`LLM(...).engine`)."""

    def __init__(self, llm, sampling, *, system: str | None = None, enable_thinking: bool | None = None):
        self.llm, self.engine, self.sampling = llm, llm.engine, sampling
        self.system = system
        self.enable_thinking = enable_thinking
        self.history: list[dict] = []
        self._ids = 0

    def messages(self, user_text: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.history + user

    def reset(self) -> None:
        self.history.clear()

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None,
              stop: Callable[[], bool] = lambda: False) -> Answer:
        """Answer `user_text`, streaming text to `on_text`; `stop()` is asked between steps and aborts the answer.
        A finished answer joins the history; an aborted one does not."""
        model = self.llm.model
        prompt = model.chat_prompt(self.messages(user_text), enable_thinking=self.enable_thinking)
        ids = model.tokenizer.encode(prompt)
        room = self.engine.options.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"the conversation is {len(ids)} tokens, the whole context "
                             f"({self.engine.options.max_model_len}); /reset to start over")
        params = dataclasses.replace(self.sampling, max_tokens=min(self.sampling.max_tokens, room))
        self._ids += 1
        request_id = f"chat-{self._ids}"
        t0 = time.perf_counter()
        self.engine.add_request(request_id, ids, params)
        sent, out = 0, None
        try:
            while True:
                if stop():
                    self.engine.abort_request(request_id)
                    text = out.text if out is not None else ""
                    return Answer(text, "abort", len(out.token_ids) if out else 0, time.perf_counter() - t0)
                for o in self.engine.step():
                    if o.request_id != request_id:
                        continue
                    out = o
                    if on_text is not None and len(o.text) > sent:
                        on_text(o.text[sent:])
                        sent = len(o.text)
                if out is not None and out.finished:
                    break
        except BaseException:
            self.engine.abort_request(request_id)
            raise
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": out.text}]
        return Answer(out.text, out.finish_reason, len(out.token_ids), time.perf_counter() - t0)


class _Interrupts:
    """While active, the first Ctrl-C only raises a flag (the answer stops at the next step, leaving the engine
    clean); a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.flag = False

    def __enter__(self):
        self.flag = False
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def _read_message(prompt: str, interactive: bool) -> str:
    """One message: a line, or the lines between two \"\"\" markers. Raises EOFError at the end of input."""
    line = input(prompt if interactive else "")
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):
        return first.rstrip()[:-3]
    lines = [first] if first else []
    while True:
        line = input("... " if interactive else "")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines)
        lines.append(line)


def repl(session: ChatSession, *, out=None, err=None, interactive: bool | None = None, verbose: bool = False) -> int:
    """Read messages and commands until /exit or end of input; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    if interactive is None:
        interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass

    def say(text: str = "", end: str = "\n", stream=None) -> None:
        print(text, end=end, file=stream or out, flush=True)

    interrupts = _Interrupts()
    while True:
        try:
            text = _read_message(">>> ", interactive)
        except EOFError:
            if interactive:
                say()
            return 0
        except KeyboardInterrupt:
            say()
            say("(Ctrl-D or /exit to leave)", stream=err)
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            if _command(session, text, say) == "exit":
                return 0
            continue
        with interrupts:
            try:
                answer = session.reply(text, on_text=lambda t: say(t, end=""), stop=lambda: interrupts.flag)
            except (ValueError, TypeError) as e:  # a conversation past the context, a template error
                say(f"error: {e}", stream=err)
                continue
        say()
        if answer.finish_reason == "abort":
            say("(stopped; this answer is not kept in the conversation)", stream=err)
        elif answer.finish_reason == "length":
            say("(the answer reached --max-new-tokens or the context length)", stream=err)
        if verbose and answer.tokens:
            say(f"({answer.tokens} tokens in {answer.seconds:.2f} s, {answer.tokens / answer.seconds:,.1f} tok/s)",
                stream=err)


def _command(session: ChatSession, line: str, say) -> str | None:
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit", "/bye"):
        return "exit"
    if name in ("/help", "/?"):
        say(HELP)
    elif name == "/reset":
        session.reset()
        say("(conversation cleared)")
    elif name == "/system":
        session.system = rest or None
        say(f"(system prompt set: {rest})" if rest else "(system prompt cleared)")
    elif name == "/think":
        if rest in ("on", "off"):
            session.enable_thinking = rest == "on"
            say(f"(thinking {rest})")
        elif not rest:
            state = {True: "on", False: "off", None: "the chat template's default"}[session.enable_thinking]
            say(f"(thinking: {state}; /think on or /think off changes it)")
        else:
            say(f"/think takes on or off, got {rest!r}")
    else:
        say(f"unknown command {name}; /help lists the commands")
    return None


def chat_main(args) -> int:
    """`qwen3-jax chat`: load the model, size the engine for one conversation, compile, then `repl`."""
    import logging

    from . import DEMO_MODEL_DIR
    from .cli import describe_sampling
    from .generate import load
    from .llm import LLM

    model_dir = args.model or DEMO_MODEL_DIR
    print(f"loading {model_dir} ...", file=sys.stderr)
    model = load(model_dir, dtype=args.dtype, kernels=args.kernels, quantize=args.quantize,
                 tensor_parallel=args.tensor_parallel, devices=args.devices)
    overrides = dict(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                     min_p=args.min_p, seed=args.seed)
    sampling = dataclasses.replace(model.default_sampling(**overrides), max_tokens=args.max_new_tokens)
    max_model_len = args.max_model_len or model.config.max_context_len
    if max_model_len > model.config.max_context_len:
        raise ValueError(f"--max-model-len {max_model_len} is beyond the model's context of "
                         f"{model.config.max_context_len} tokens (max_position_embeddings, or YaRN's factor x "
                         "original_max_position_embeddings)")
    block_size = 64
    llm = LLM(model, max_num_seqs=1, decode_steps=args.decode_steps, precompile=False, max_model_len=max_model_len,
              block_size=block_size, num_blocks=-(-max_model_len // block_size) + 1)
    # the first answer's steps compiled now (prompts up to 256 tokens; longer ones compile on first use)
    llm.engine.compile_for(1, 256, [sampling])
    logging.getLogger("qwen3_jax").setLevel(logging.WARNING)  # no compile notices inside the conversation
    session = ChatSession(llm, sampling, system=args.system, enable_thinking=args.enable_thinking)
    print(f"{model.config.num_params() / 1e6:,.1f}M parameters, {model.config.dtype}, kernels: {model.kernels.name}, "
          f"sampling: {describe_sampling(sampling)}, context {max_model_len} tokens", file=sys.stderr)
    if sys.stdin.isatty():
        print("/help for commands, Ctrl-C stops an answer, Ctrl-D exits", file=sys.stderr)
    return repl(session, verbose=args.verbose)
