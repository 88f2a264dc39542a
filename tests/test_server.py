"""The OpenAI-compatible server as a real process on a free localhost port, driven by the `openai` client and by raw
HTTP (stdlib http.client) for malformed requests and disconnects. One server serves the whole module (an API key
set through the environment); the last test stops it with SIGTERM and checks the drain."""

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

import qwen3_jax as q

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
MAX_MODEL_LEN = 512  # attention (reference ops) costs grow with it; the retrained tokenizer fits the tools prompt
BODY_LIMIT = 65536
RECALL = "The capital of Aistonia is Flubarg. The capital of Borvania is Quelt. What is the capital of Aistonia?"
# Facts and questions the demo model answers (tests/test_demo_model.py), for the concurrent clients.
ANSWERED = [
    (RECALL, "Flubarg"),
    ("Teodric Vallum has a pet ferret. Marisol Quenby has a pet parrot. What pet does Marisol Quenby have?",
     "parrot"),
    ("Yarrowin Pell is 47 years old. Corbin Stade is 12 years old. How old is Yarrowin Pell?", "47"),
    ("Ombrelo Fisk works as a baker. Ombrelo Fisk lives in Trazenda. Where does Ombrelo Fisk live?", "Trazenda"),
    ("The capital of Drenmark is Oskelby. The flag of Drenmark is purple. What color is the flag of Drenmark?",
     "purple"),
    ("Sablo Tennick lives in Ferrowmere. Idris Calloway lives in Brunhallow. In which city does Idris Calloway live?",
     "Brunhallow"),
]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m qwen3_jax.server` on the demo model in a subprocess; stopped (SIGTERM, then kill) at close."""

    def __init__(self, *flags, env=None, timeout=180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "qwen3_jax.server", str(q.DEMO_MODEL_DIR), "--port", str(self.port),
               "--served-model-name", "demo", "--kernels", "reference", "--no-precompile", *flags]
        self.log = open(os.devnull if os.environ.get("SERVER_LOG") is None else os.environ["SERVER_LOG"], "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} during start-up: {cmd}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server did not answer /health within {timeout} s")
            time.sleep(0.5)

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, parsed JSON or text) of one raw request; `body` bytes or a JSON-able object."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            data = resp.read().decode()
            try:
                return resp.status, json.loads(data)
            except json.JSONDecodeError:
                return resp.status, data
        finally:
            conn.close()

    def metrics(self) -> dict:
        """The qwen3_jax_* samples of /metrics, by name (labels dropped, values summed)."""
        status, text = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            m = re.match(r"(qwen3_jax_\w+)(?:\{[^}]*\})? (\S+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def wait_idle(self, timeout=30.0) -> dict:
        """Metrics once no request runs or waits and no KV block is owned (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["qwen3_jax_kv_blocks_used"], m["qwen3_jax_num_requests_running"],
                    m["qwen3_jax_num_requests_waiting"]) == (0, 0, 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def close(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def warm_up(srv) -> None:
    """Compile the steps the tests use, each at its largest size, before any test runs: without precompile a step
    reuses the smallest compiled bucket that fits, so later batches compile nothing. 16 prompts of 16 tokens in
    one request fill the first prefill (256 tokens, 16 rows = max_num_seqs) and so the first decode batch."""
    prompts = [[10 + i] * 16 for i in range(16)]
    for extra in ({"temperature": 0}, {"temperature": 0, "logprobs": 1}, {"temperature": 1.0}):
        status, body = srv.request("POST", "/v1/completions", {"model": "demo", "prompt": prompts, "max_tokens": 2,
                                                              "ignore_eos": True, **extra}, auth())
        assert status == 200, body


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-num-seqs", "16", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens",
                        "256", "--num-blocks", "192", "--max-waiting-requests", "40", "--max-request-body-bytes",
                        str(BODY_LIMIT), "--max-n", "4", env={"QWEN3_JAX_API_KEY": KEY})
    try:
        warm_up(srv)
    except BaseException:
        srv.close()
        raise
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return q.Tokenizer.from_pretrained(q.DEMO_MODEL_DIR)


def chat(client, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 48)
    extra = kw.pop("extra_body", NO_THINKING)
    return client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                          extra_body=extra, **kw)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


# ---- concurrency ------------------------------------------------------------------------------------------------
def test_32_concurrent_streaming_clients(server):
    async def one(aclient, i):
        question, expected = ANSWERED[i % len(ANSWERED)]
        stream = await aclient.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], stream=True, temperature=0,
            max_tokens=48, extra_body=NO_THINKING)
        text, finish = "", None
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        return text, finish, expected

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=180)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert all(finish == "stop" and text == expected for text, finish, expected in results), results
    server.wait_idle()


# ---- OpenAI semantics -----------------------------------------------------------------------------------------------
def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_chat_answers_the_recall_question(client):
    r = chat(client, RECALL)
    choice = r.choices[0]
    assert choice.message.content == "Flubarg" and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and not choice.message.tool_calls
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens >= 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def _streamed(client, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 48)
    extra = kw.pop("extra_body", NO_THINKING)
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": content}],
                                            stream=True, stream_options={"include_usage": True}, extra_body=extra,
                                            **kw)
    content, reasoning, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            finish = c.finish_reason or finish
    return content, reasoning, finish, usage


def test_streamed_text_equals_non_streamed(client):
    for question, _ in ANSWERED[:3]:
        whole = chat(client, question)
        content, reasoning, finish, usage = _streamed(client, question)
        assert content == whole.choices[0].message.content and reasoning == ""
        assert finish == whole.choices[0].finish_reason
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_thinking_goes_to_reasoning_content(client):
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    r = chat(client, RECALL, max_tokens=80, extra_body=thinking)
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning.startswith("The question asks for") and "<think>" not in reasoning
    assert msg.content == "Flubarg"
    content, streamed_reasoning, _, _ = _streamed(client, RECALL, max_tokens=80, extra_body=thinking)
    assert (content, streamed_reasoning) == (msg.content, reasoning)


def test_completions_with_token_ids(client, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": RECALL}], enable_thinking=False)
    ids = tokenizer.encode(text)
    r = client.completions.create(model="demo", prompt=ids, max_tokens=16, temperature=0, logprobs=2,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert c.text.strip() == "Flubarg" and c.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(ids)
    token_ids = c.model_extra["token_ids"]
    assert len(token_ids) == r.usage.completion_tokens == len(c.logprobs.tokens)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    # a batch of prompts (ids and text) with n=2 seeded samples each: choices in prompt order
    r = client.completions.create(model="demo", prompt=[ids, ids[:-3]], n=2, max_tokens=8, temperature=0.8,
                                  seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="demo", prompt=[ids, ids[:-3]], n=2, max_tokens=8, temperature=0.8,
                                      seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeds derived per choice


def test_chat_logprobs(client):
    r = chat(client, RECALL, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6
    assert "".join(e.token for e in entries[:-1]) == "Flubarg"  # the last token is <|im_end|>


def test_stop_strings_and_stop_token_ids(client, tokenizer):
    r = chat(client, RECALL, stop=["barg"])
    assert r.choices[0].message.content == "Flu" and r.choices[0].finish_reason == "stop"
    content, _, finish, _ = _streamed(client, RECALL, stop="barg")
    assert (content, finish) == ("Flu", "stop")
    flub = tokenizer.encode("Flubarg")
    r = chat(client, RECALL, extra_body={**NO_THINKING, "stop_token_ids": [flub[-1]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(flub)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert a value between units.",
                                      "parameters": {"type": "object", "properties": {
                                          "value": {"type": "number"}, "from": {"type": "string"},
                                          "to": {"type": "string"}}, "required": ["value", "from", "to"]}}},
]


def test_tool_call_and_follow_up(client):
    # Needs the demo model trained with the tool-use task of scripts/train_demo_model.py.
    messages = [{"role": "user", "content": "What is the weather in Flubarg?"}]
    r = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0, max_tokens=64,
                                       extra_body=NO_THINKING)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call, = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Flubarg"}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(
                     {"city": "Flubarg", "temperature_c": 17, "condition": "cloudy"})}]
    r = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0, max_tokens=64,
                                       extra_body=NO_THINKING)
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "17" in answer and "cloudy" in answer, answer


# ---- disconnects, back-pressure -------------------------------------------------------------------------------
def _open_stream(server, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **auth()})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_disconnect_mid_stream_frees_the_blocks(server):
    body = {"model": "demo", "messages": [{"role": "user", "content": RECALL}], "stream": True, "max_tokens": 400,
            "ignore_eos": True, "temperature": 0}
    conns = [_open_stream(server, body) for _ in range(3)]
    for conn, resp in conns:
        assert resp.readline().startswith(b"data: ")  # it is generating
    assert server.metrics()["qwen3_jax_kv_blocks_used"] > 0
    for conn, resp in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    m = server.wait_idle(timeout=20)
    assert m["qwen3_jax_kv_blocks_used"] == 0 and m["qwen3_jax_num_requests_running"] == 0, m


def test_back_pressure_answers_429_beyond_the_waiting_limit(server):
    body = {"model": "demo", "prompt": "Hello", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    results = []

    def one():
        results.append(server.request("POST", "/v1/completions", body, auth()))

    threads = [threading.Thread(target=one) for _ in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 40, statuses  # 16 run, 40 wait
    busy = next(b for s, b in results if s == 429)
    assert "--max-waiting-requests" in busy["error"]["message"] and busy["error"]["type"] == "rate_limit_error"
    assert all(b["choices"][0]["finish_reason"] == "length" for s, b in results if s == 200)
    server.wait_idle()


# ---- malformed requests, limits, API key ------------------------------------------------------------------------
GOOD = {"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2}
LONG = " ".join(["Flubarg"] * 600)
MALFORMED = [  # (path, body, words the error message must contain)
    ("/v1/chat/completions", b'{"model": "demo", "messages": [', "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", "JSON object"),
    ("/v1/chat/completions", {**GOOD, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {**GOOD, "messages": []}, "messages"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {**GOOD, "n": 1.5}, "n"),
    ("/v1/chat/completions", {k: v for k, v in GOOD.items() if k != "model"}, "model"),
    ("/v1/chat/completions", {**GOOD, "model": "gpt-4"}, "gpt-4"),
    ("/v1/chat/completions", {**GOOD, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {**GOOD, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**GOOD, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**GOOD, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**GOOD, "top_k": -1}, "top_k"),
    ("/v1/chat/completions", {**GOOD, "min_p": 2}, "min_p"),
    ("/v1/chat/completions", {**GOOD, "seed": -1}, "seed"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 100000}, "--max-tokens-limit"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": 500, "messages": [{"role": "user", "content": RECALL}]},
     "maximum context length"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": LONG}]}, "--max-prompt-tokens"),
    ("/v1/chat/completions", {**GOOD, "n": 0}, "--max-n"),
    ("/v1/chat/completions", {**GOOD, "n": 5}, "--max-n"),
    ("/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 50}, "logprobs"),
    ("/v1/chat/completions", {**GOOD, "top_logprobs": 2}, "logprobs=true"),
    ("/v1/chat/completions", {**GOOD, "stop": [""]}, "stop"),
    ("/v1/chat/completions", {**GOOD, "stream_options": {"include_usage": True}}, "stream"),
    ("/v1/chat/completions", {**GOOD, "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {**GOOD, "logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/chat/completions", {**GOOD, "chat_template_kwargs": {"enable_thinking": "yes"}}, "enable_thinking"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]}, "arguments"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]},
     "--max-request-body-bytes"),
    ("/v1/completions", {"model": "demo", "prompt": [5, 99999], "max_tokens": 2}, "vocabulary"),
    ("/v1/completions", {"model": "demo", "prompt": [], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": "Hi", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"model": "demo", "prompt": "Hi", "echo": True}, "echo"),
    ("/v1/completions", {"model": "demo", "prompt": 7}, "prompt"),
]


@pytest.mark.parametrize("path, body, words", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_request_gets_400_and_the_server_keeps_serving(server, path, body, words):
    status, err = server.request("POST", path, body, auth())
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error" and words in err["error"]["message"], err
    status, ok = server.request("POST", "/v1/chat/completions", GOOD, auth())
    assert status == 200 and ok["choices"][0]["finish_reason"] in ("stop", "length"), ok


def test_penalties_pass_through_or_are_refused_by_name(server):
    supported = "presence_penalty" in {f.name for f in __import__("dataclasses").fields(q.SamplingParams)}
    status, body = server.request("POST", "/v1/chat/completions", {**GOOD, "presence_penalty": 0.5}, auth())
    if supported:
        assert status == 200, body
    else:
        assert status == 400 and "presence_penalty is not supported" in body["error"]["message"]
    assert server.request("POST", "/v1/chat/completions", {**GOOD, "presence_penalty": 0}, auth())[0] == 200


def test_api_key_required_on_v1_routes(server):
    before = server.metrics()["qwen3_jax_prompt_tokens_total"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
        for method, path, body in (("POST", "/v1/chat/completions", GOOD), ("GET", "/v1/models", None),
                                   ("POST", "/v1/completions", {"model": "demo", "prompt": "Hi"})):
            status, err = server.request(method, path, body, headers)
            assert status == 401 and err["error"]["type"] == "authentication_error", (headers, path, err)
    assert server.request("GET", "/health")[0] == 200  # outside /v1: no key needed
    server.wait_idle()
    assert server.metrics()["qwen3_jax_prompt_tokens_total"] == before  # nothing ran
    status, err = server.request("GET", "/v1/nothing", None, auth())
    assert status == 404 and "error" in err


# ---- soak and shutdown ----------------------------------------------------------------------------------------
def _soak_one(server, i):
    """One of the mixed requests; returns what happened ("ok", "400", "gone") or raises on a wrong answer."""
    question, expected = ANSWERED[i % len(ANSWERED)]
    kind = i % 10
    chat_body = {"model": "demo", "messages": [{"role": "user", "content": question}], "temperature": 0,
                 "max_tokens": 8, **NO_THINKING}
    if kind in (0, 1, 2, 3):
        status, body = server.request("POST", "/v1/chat/completions", chat_body, auth())
        assert status == 200 and body["choices"][0]["message"]["content"] == expected, body
        return "ok"
    if kind in (4, 5, 6):
        conn, resp = _open_stream(server, {**chat_body, "stream": True})
        text = resp.read().decode()
        conn.close()
        deltas = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
        assert text.endswith("data: [DONE]\n\n")
        assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"]) == expected
        return "ok"
    if kind == 7:
        status, body = server.request("POST", "/v1/completions", {"model": "demo", "prompt": question,
                                                                   "max_tokens": 6, "temperature": 0.7}, auth())
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
        return "ok"
    if kind == 8:
        conn, resp = _open_stream(server, {**chat_body, "stream": True, "max_tokens": 64, "ignore_eos": True})
        resp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        return "gone"
    path, body, _ = MALFORMED[i % len(MALFORMED)]
    status, err = server.request("POST", path, body, auth())
    assert status == 400, err
    return "400"


@pytest.mark.slow
def test_soak_mixed_requests(server):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        warm = list(pool.map(lambda i: _soak_one(server, i), range(200)))
        server.wait_idle()
        rss_warm = server.rss_bytes()
        rest = list(pool.map(lambda i: _soak_one(server, i), range(200, 1000)))
    outcomes = warm + rest
    assert outcomes.count("ok") == 800 and outcomes.count("gone") == 100 and outcomes.count("400") == 100
    m = server.wait_idle()
    assert (m["qwen3_jax_kv_blocks_used"], m["qwen3_jax_num_requests_running"]) == (0, 0), m
    growth = server.rss_bytes() - rss_warm
    assert growth < 64 * 2**20, f"server memory grew by {growth / 2**20:.0f} MiB over 800 requests"


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(server):
    # Runs last: it stops the module's server.
    conn, resp = _open_stream(server, {"model": "demo", "messages": [{"role": "user", "content": RECALL}],
                                       "stream": True, "max_tokens": 120, "ignore_eos": True, "temperature": 0})
    assert resp.readline().startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()
    conn.close()
    assert rest.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in rest  # finished, not cut
    assert server.proc.wait(60) == 0
