"""The engine thread: the only code that touches the (not thread-safe) `LLMEngine`.

HTTP handlers run on the asyncio loop. They hand requests and aborts to the thread through a thread-safe queue;
the thread drives `engine.step()` while there is work and delivers each `RequestOutput` to the request's
`RequestHandle` with `loop.call_soon_threadsafe`, so neither side ever blocks the other. An exception inside a step
fails every request then in the engine (which ones the step touched is not known) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("qwen3_jax.server")


class EngineError(RuntimeError):
    """The engine failed while running this request (a step raised); the request is over."""


@dataclasses.dataclass
class _Add:
    handle: "RequestHandle"
    prompt: list[int]
    params: object


class RequestHandle:
    """One engine request seen from the event loop: `accepted` resolves once the engine has taken it (or raises the
    engine's refusal); then `(request_id, RequestOutput)` items arrive in `sink` after every step that changed it,
    up to the finished one, or `(request_id, EngineError)` if the engine failed. Requests may share a sink."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, sink: asyncio.Queue):
        self.request_id = request_id
        self.accepted: asyncio.Future = loop.create_future()
        self.sink = sink

    # called on the event loop, scheduled by the engine thread
    def _accept(self, error: BaseException | None) -> None:
        if not self.accepted.done():
            if error is None:
                self.accepted.set_result(True)
            else:
                self.accepted.set_exception(error)

    def _put(self, item) -> None:
        self.sink.put_nowait((self.request_id, item))


class EngineLoop:
    """Owns an `LLMEngine` on its own thread. `submit` / `abort` from the event loop; `stats` from anywhere."""

    def __init__(self, engine, *, on_output: Callable | None = None, on_abort: Callable | None = None,
                 idle_wait_s: float = 0.05):
        self.engine = engine
        self.on_output = on_output  # on the engine thread: (RequestOutput, time.monotonic()) after each step
        self.on_abort = on_abort  # on the engine thread: (request id) when a request ends without a last output
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        # Requests submitted and taken, each counter written by one thread only (their difference: queued adds).
        self._submitted = 0
        self._taken = 0
        self.step_errors = 0
        self.snapshot = dict(engine.stats())  # refreshed by the engine thread after each step

    # ---- event-loop side --------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the engine thread; outputs are delivered on `loop`."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="qwen3-jax-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (requests still in the engine are aborted first)."""
        self._stop.set()
        self._inbox.put(None)  # wake it
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued for the engine thread plus the engine's waiting queue."""
        return self._submitted - self._taken + int(self.snapshot.get("waiting", 0))

    def submit(self, requests: list[tuple[str, list[int], object]], sink: asyncio.Queue) -> list[RequestHandle]:
        """Queue (request id, prompt ids, SamplingParams) requests, which reach the engine together (one step
        admits them all); await each `handle.accepted` to learn whether the engine took it."""
        adds = [_Add(RequestHandle(rid, self._loop, sink), prompt, params) for rid, prompt, params in requests]
        self._submitted += len(adds)
        self._inbox.put(adds)
        return [a.handle for a in adds]

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(item, list):
                for add in item:
                    self._add(add)
            elif isinstance(item, tuple):
                if self.engine.abort_request(item[1]):
                    log.debug("aborted request %s", item[1])
                if self._handles.pop(item[1], None) is not None and self.on_abort is not None:
                    self.on_abort(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, item: _Add) -> None:
        handle = item.handle
        try:
            self.engine.add_request(handle.request_id, item.prompt, item.params)
        except Exception as e:  # a request the engine refuses (too long for the pool, bad ids): the caller's 400
            self._call(handle._accept, e)
        else:
            self._handles[handle.request_id] = handle
            self._call(handle._accept, None)
        finally:
            self._taken += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished_requests()
            self._take_inbox(block=not busy)
            self.snapshot = dict(self.engine.stats())  # the waiting count includes what was just added
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                self._fail_all(e)
                continue
            for out in outputs:
                handle = self._handles.get(out.request_id)
                if out.finished:
                    self._handles.pop(out.request_id, None)
                if self.on_output is not None:
                    self.on_output(out, time.monotonic())
                if handle is not None:
                    self._call(handle._put, out)
            self.snapshot = dict(self.engine.stats())
        stopping = EngineError("the server is shutting down")
        while True:  # requests that arrived too late: refused, so their handlers do not wait forever
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            for add in item if isinstance(item, list) else ():
                self._taken += 1
                self._call(add.handle._accept, stopping)
        for rid in list(self._handles):
            self.engine.abort_request(rid)
            self._call(self._handles.pop(rid)._put, stopping)

    def _fail_all(self, error: Exception) -> None:
        """A step raised: abort every request in the engine (frees their blocks) and fail them."""
        self.step_errors += 1
        log.error("engine step failed; failing %d request(s): %r", len(self._handles), error, exc_info=error)
        for rid in list(self._handles):
            try:
                self.engine.abort_request(rid)
            except Exception:  # the engine is in a bad state: still fail the request
                log.exception("abort of %s after a step error failed", rid)
            if self.on_abort is not None:
                self.on_abort(rid)
            failure = EngineError(f"the engine failed: {type(error).__name__}: {error}")
            self._call(self._handles.pop(rid)._put, failure)
        self.snapshot = dict(self.engine.stats())
