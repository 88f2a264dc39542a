"""`qwen3-jax chat`: the conversation on the engine (history, /reset, /system, /think, a stopped answer), and the
REPL driven through a pseudo-terminal as a user types: a turn, commands, Ctrl-C mid-answer, Ctrl-D."""

import os
import signal
import sys
from pathlib import Path

import pytest

import qwen3_jax as q
from qwen3_jax.chat import ChatSession, _command, _read_message

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "The capital of Aistonia is Flubarg. What is the capital of Aistonia?"


@pytest.fixture(scope="module")
def session():
    model = q.load(q.DEMO_MODEL_DIR, kernels="reference")
    llm = q.LLM(model, max_num_seqs=1, decode_steps=1, precompile=False, num_blocks=17)
    return ChatSession(llm, q.SamplingParams(temperature=0, max_tokens=64), enable_thinking=False)


def test_a_turn_joins_the_history_and_reset_forgets_it(session):
    session.reset()
    pieces = []
    answer = session.reply(QUESTION, on_text=pieces.append)
    assert answer.text == "Flubarg" and "".join(pieces) == answer.text and answer.finish_reason == "stop"
    assert session.history == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Flubarg"}]
    session.system = "Be brief."
    assert session.messages("next")[0] == {"role": "system", "content": "Be brief."}
    assert session.messages("next")[-1] == {"role": "user", "content": "next"}
    session.system = None
    session.reset()
    assert session.history == [] and session.messages() == []


def test_a_stopped_answer_is_dropped_and_the_engine_stays_clean(session):
    session.reset()
    seen = []
    answer = session.reply(QUESTION, on_text=seen.append, stop=lambda: len(seen) >= 1)
    assert answer.finish_reason == "abort" and session.history == []
    assert not session.engine.has_unfinished_requests()
    assert session.reply(QUESTION).text == "Flubarg"  # the next answer is whole


def test_commands(session, capsys):
    lines = []
    say = lines.append
    assert _command(session, "/think on", say) is None and session.enable_thinking is True
    assert _command(session, "/think off", say) is None and session.enable_thinking is False
    _command(session, "/think maybe", say)
    _command(session, "/system Answer in French.", say)
    assert session.system == "Answer in French."
    _command(session, "/system", say)
    assert session.system is None
    _command(session, "/nope", say)
    assert _command(session, "/bye", say) == "exit"
    assert lines[2] == "/think takes on or off, got 'maybe'" and "unknown command /nope" in lines[-1]


def test_multi_line_messages(monkeypatch):
    lines = iter(['"""first', "second", 'third"""'])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert _read_message(">>> ", False) == "first\nsecond\nthird"


def test_repl_on_a_terminal(tmp_path):
    env = {**os.environ, "QWEN3_JAX_CACHE_DIR": str(tmp_path), "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "TERM": "dumb"}
    # A user's terminal delivers Ctrl-C to a chat whose SIGINT is the default, even where pytest runs as a
    # background job (which a shell starts with SIGINT ignored, and exec keeps ignored).
    child = pexpect.spawn(sys.executable, ["-m", "qwen3_jax", "chat", "--kernels", "reference", "--max-new-tokens",
                                           "1000", "--no-thinking"], cwd=str(ROOT), env=env, encoding="utf-8",
                          timeout=240, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact(">>> ")
        child.sendline(QUESTION)
        child.expect_exact("Flubarg")
        child.expect_exact(">>> ")
        child.sendline("/help")
        child.expect_exact("/think on|off")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.sendline("/think on")
        child.expect_exact("(thinking on)")
        child.expect_exact(">>> ")
        child.sendline("Count from 1 to 20.")  # the demo model thinks at length about this one
        child.expect_exact("<think>", timeout=120)
        child.sendintr()  # Ctrl-C: the answer stops, the chat goes on
        child.expect_exact("(stopped; this answer is not kept in the conversation)", timeout=60)
        child.expect_exact(">>> ")
        child.sendline("/think off")
        child.expect_exact(">>> ")
        child.sendline(QUESTION)
        child.expect_exact("Flubarg")
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt: a hint, not an exit
        child.expect_exact("Ctrl-D or /exit to leave")
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in (child.before or "")
