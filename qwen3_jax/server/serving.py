"""What both endpoints share: the server's limits, request -> `SamplingParams`, running a group of engine requests
(n choices, several prompts) and server-sent events. chat.py and completions.py build on it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from ..sampling import MAX_LOGPROBS, SamplingParams
from .engine_loop import EngineError, EngineLoop
from .errors import APIError, bad_request
from .metrics import ServerMetrics
from .protocol import _Sampling, check_unsupported


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Names the model answers to and the limits each request is held to (None: derived from the engine)."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_waiting_requests: int = 256  # beyond this many waiting requests, new ones get a 429
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None  # default: max_model_len - 1
    max_tokens_limit: int | None = None  # default: max_model_len - 1
    max_n: int = 16
    reasoning_parser: str = "qwen3"  # "qwen3": split <think>...</think> into reasoning_content; "none"
    drain_timeout_s: float = 30.0


class Serving:
    """The model, its engine thread, the metrics and the limits: what a handler needs."""

    def __init__(self, model, engine_loop: EngineLoop, config: ServerConfig, metrics: ServerMetrics):
        self.model, self.engine_loop, self.config, self.metrics = model, engine_loop, config, metrics
        self.tokenizer = model.tokenizer
        self.max_model_len = engine_loop.engine.options.max_model_len
        self.max_prompt_tokens = min(config.max_prompt_tokens or self.max_model_len - 1, self.max_model_len - 1)
        self.max_tokens_limit = config.max_tokens_limit or self.max_model_len - 1
        self.draining = False
        self.created = int(time.time())

    # ---- checks --------------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.config.served_model_names:
            raise APIError(400, f"the model {name!r} does not exist here; this server serves "
                                f"{', '.join(repr(n) for n in self.config.served_model_names)} (GET /v1/models)",
                           param="model", code="model_not_found")

    def check_request(self, req: _Sampling) -> None:
        """Model name, unsupported fields, n and stream_options."""
        self.check_model(req.model)
        for field, why in check_unsupported(req):
            raise bad_request(why, param=field)
        if not 1 <= req.n <= self.config.max_n:
            raise bad_request(f"n={req.n} is outside [1, {self.config.max_n}] (this server's limit on n, "
                              "--max-n)", param="n")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def check_prompt(self, ids: list[int], what: str = "the prompt") -> None:
        if not ids:
            raise bad_request(f"{what} is empty", param="prompt")
        if len(ids) > self.max_prompt_tokens:
            raise bad_request(f"{what} has {len(ids)} tokens, more than this server's limit of "
                              f"{self.max_prompt_tokens} prompt tokens (--max-prompt-tokens; max_model_len "
                              f"{self.max_model_len})", param="messages" if "messages" in what else "prompt",
                              code="context_length_exceeded")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id(s) outside the vocabulary [0, {vocab}): {bad[:5]}", param="prompt")

    def sampling_params(self, req: _Sampling, prompt_len: int, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams (unset fields from generation_config.json); 400 for bad values."""
        if max_tokens is not None:
            if max_tokens > self.max_tokens_limit:
                raise bad_request(f"max_tokens={max_tokens} is above this server's limit of {self.max_tokens_limit}"
                                  " (--max-tokens-limit)", param="max_tokens")
            if max_tokens >= 1 and prompt_len + max_tokens > self.max_model_len:
                raise bad_request(f"this model's maximum context length is {self.max_model_len} tokens; the request"
                                  f" asks for {prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} "
                                  "in the completion): shorten the prompt or lower max_tokens",
                                  param="max_tokens", code="context_length_exceeded")
        else:
            max_tokens = min(self.max_tokens_limit, self.max_model_len - prompt_len)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
        values = dict(max_tokens=max_tokens, logprobs=logprobs, ignore_eos=req.ignore_eos,
                      temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
                      presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                      repetition_penalty=req.repetition_penalty)
        if req.stop_token_ids:
            values["stop_token_ids"] = tuple(req.stop_token_ids)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise bad_request("stop strings must not be empty", param="stop")
        if stop:
            values["stop"] = tuple(stop)
            values["include_stop_str_in_output"] = req.include_stop_str_in_output
        try:
            return self.model.default_sampling(**values)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), param=_field_in(str(e))) from None

    def check_capacity(self, count: int) -> None:
        """503 while draining; 429 when too many requests already wait."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if not self.engine_loop.alive:
            raise APIError(503, "the engine thread is not running", code="engine_dead")
        waiting = self.engine_loop.num_waiting
        if waiting + count > self.config.max_waiting_requests:
            raise APIError(429, f"the server is busy: {waiting} requests are waiting, the limit is "
                                f"{self.config.max_waiting_requests} (--max-waiting-requests); retry later",
                           code="too_many_waiting_requests")

    # ---- running -------------------------------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> "Group":
        """Submit one engine request per (prompt, params); raises APIError if the engine refuses one (all are then
        aborted)."""
        self.check_capacity(len(prompts))
        group = Group(self.engine_loop, [f"{uuid.uuid4().hex}-{i}" for i in range(len(prompts))])
        handles = self.engine_loop.submit(list(zip(group.ids, prompts, params)), group.sink)
        try:
            for h in handles:
                await h.accepted
        except EngineError as e:
            group.abort()
            raise APIError(503, str(e), code="server_shutting_down") from None
        except (ValueError, TypeError) as e:  # the engine refused it (the pool is too small for the request)
            group.abort()
            raise bad_request(str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None
        except BaseException:
            group.abort()
            raise
        return group


class Group:
    """The engine requests behind one HTTP request; `index[request_id]` is the choice's position."""

    def __init__(self, engine_loop: EngineLoop, ids: list[str]):
        self.engine_loop, self.ids = engine_loop, ids
        self.index = {rid: i for i, rid in enumerate(ids)}
        self.sink: asyncio.Queue = asyncio.Queue()
        self.latest: list = [None] * len(ids)
        self.open = set(ids)

    async def updates(self) -> AsyncIterator[list[int]]:
        """Yields the indices whose output changed (all queued items taken at once) until every request finished;
        `latest[i]` holds the newest output. Raises APIError(500) if the engine failed."""
        while self.open:
            items = [await self.sink.get()]
            while not self.sink.empty():
                items.append(self.sink.get_nowait())
            changed = []
            for rid, item in items:
                if isinstance(item, BaseException):
                    self.open.clear()
                    self.abort()
                    raise APIError(500, str(item), code="engine_error")
                i = self.index[rid]
                self.latest[i] = item
                if item.finished:
                    self.open.discard(rid)
                if i not in changed:
                    changed.append(i)
            yield changed

    async def final(self) -> list:
        async for _ in self.updates():
            pass
        return self.latest

    def abort(self) -> None:
        """Abort whatever is still running (a disconnected client, a failed sibling)."""
        for rid in self.open:
            self.engine_loop.abort(rid)
        self.open = set()


async def until_disconnect(receive) -> None:
    """Returns when the client has gone (`http.disconnect`); the request body must already be read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait_unless_disconnected(coro, receive):
    """Await `coro`; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(",", ":"))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _field_in(message: str) -> str | None:
    """The field a SamplingParams error names ("invalid sampling value top_p=..." -> "top_p")."""
    prefix = "invalid sampling value "
    return message[len(prefix):].split("=")[0] if message.startswith(prefix) else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}



