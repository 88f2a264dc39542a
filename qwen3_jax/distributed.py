"""Several processes (one per host, or one per GPU) running one tensor-parallel model through `jax.distributed`.

Every process loads its devices' part of the weights and runs the same engine in lock step: the same compiled
steps on the same inputs, each device computing its part, the collectives crossing hosts. Only process 0 talks to
the user (the CLI, the HTTP server) through a `LockstepEngine`; before each step it broadcasts the requests added
and aborted since the last step, so every other process (`follow`) applies them and steps too. The engine is
deterministic given those calls (scheduling, prefix cache, seeds), and every process reads the same sampled tokens
(the step outputs are replicated), so the processes' engines stay identical.

    # on every host, with its own --process-id (the same command otherwise):
    qwen3-jax serve MODEL --tensor-parallel 16 --coordinator host0:29500 --num-processes 2 --process-id 0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import jax
import numpy as np

from .engine import LLMEngine
from .sampling import SamplingParams

log = logging.getLogger("qwen3_jax")
# Bytes of the fixed broadcast that precedes every step; commands past it follow in a second broadcast.
_HEADER = 4096


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_ids=None) -> None:
    """Join the `num_processes` processes of one model (call before anything else touches jax). On CPUs the
    collectives between processes run over gloo."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be HOST:PORT (process 0's), got {coordinator_address!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_leader() -> bool:
    """Whether this process is the one that talks to the user (process 0)."""
    return jax.process_index() == 0


class LockstepEngine:
    """Process 0's handle on an `LLMEngine` run by every process: `LLMEngine`'s interface, with each `step`
    preceded by a broadcast of the requests added and aborted since the last one. While no step runs (an idle
    server), a broadcast every `heartbeat_s` seconds keeps the others' waiting collective from timing out.
    `shutdown` releases the others."""

    def __init__(self, engine: LLMEngine, heartbeat_s: float = 10.0):
        if not is_leader():
            raise RuntimeError("only process 0 drives the engine; the other processes call follow(engine)")
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self._commands: list = []
        # One broadcast-and-step at a time: every process must meet the collectives in the same order.
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = threading.Event()
        threading.Thread(target=self._heartbeat, name="qwen3-jax-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._closed.wait(self.heartbeat_s / 4):
            with self._lock:
                if not self._closed.is_set() and time.monotonic() - self._last >= self.heartbeat_s:
                    _broadcast([["idle"]])
                    self._last = time.monotonic()

    def add_request(self, request_id, prompt_token_ids, params: SamplingParams | None = None) -> str:
        rid = self.engine.add_request(request_id, prompt_token_ids, params)  # validated here first
        seq = self.engine.seqs[rid]
        # the seed it drew, so that every process samples alike
        self._commands.append(["add", rid, list(seq.prompt_token_ids),
                               dataclasses.asdict(dataclasses.replace(seq.params, seed=seq.seed))])
        return rid

    def abort_request(self, request_id) -> bool:
        aborted = self.engine.abort_request(request_id)
        if aborted:
            self._commands.append(["abort", str(request_id)])
        return aborted

    def step(self):
        with self._lock:
            commands, self._commands = self._commands, []
            _broadcast(commands)
            outputs = self.engine.step()
            self._last = time.monotonic()
        return outputs

    generate = LLMEngine.generate  # add_request / step / abort_request, through this class's

    def shutdown(self) -> None:
        """Tell the other processes to stop following (after the commands not yet sent)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            _broadcast(self._commands + [["stop"]])
            self._commands = []

    def __getattr__(self, name):  # everything else (has_unfinished_requests, seqs, stats, ...) is the engine's
        return getattr(self.engine, name)


def follow(engine: LLMEngine) -> None:
    """A process other than 0: apply process 0's requests and step with it, until it shuts down."""
    if is_leader():
        raise RuntimeError("process 0 drives the engine (LockstepEngine); follow() is for the other processes")
    log.info("process %d: following process 0's steps", jax.process_index())
    while True:
        step = True
        for command in _receive():
            if command[0] == "stop":
                log.info("process %d: process 0 shut down", jax.process_index())
                return
            if command[0] == "add":
                _, rid, prompt, params = command
                engine.add_request(rid, prompt, _sampling_params(params))
            elif command[0] == "abort":
                engine.abort_request(command[1])
            else:  # "idle": process 0 is waiting for requests
                step = False
        if step:
            engine.step()


def _sampling_params(fields: dict) -> SamplingParams:
    for name in ("stop_token_ids", "stop"):
        fields[name] = tuple(fields[name])
    return SamplingParams(**fields)


def _broadcast(commands: list) -> None:
    data = json.dumps(commands).encode()
    header = np.zeros(_HEADER, np.uint8)
    header[:8] = np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)
    head = data[:_HEADER - 8]
    header[8:8 + len(head)] = np.frombuffer(head, np.uint8)
    _one_to_all(header)
    if len(data) > _HEADER - 8:
        _one_to_all(np.frombuffer(data[_HEADER - 8:], np.uint8))


def _receive() -> list:
    header = _one_to_all(np.zeros(_HEADER, np.uint8))
    size = int(np.frombuffer(header[:8].tobytes(), np.int64)[0])
    data = header[8:8 + min(size, _HEADER - 8)].tobytes()
    if size > _HEADER - 8:
        data += _one_to_all(np.zeros(size - (_HEADER - 8), np.uint8)).tobytes()
    return json.loads(data)


def _one_to_all(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))
