"""Several processes (one per host, or one per GPU) running one tensor-parallel model through `jax.distributed`.

Every process loads its devices' part of the weights and runs the same engine in lock step: the same compiled
steps on the same inputs, each device computing its part, the collectives crossing hosts. Only process 0 talks to
the user (the CLI, the HTTP server) through a `LockstepEngine`; before each step it publishes the requests added
and aborted since the last step in jax.distributed's key-value store (host to host: no device collective to
order against the steps'), and every other process (`follow`) reads them, applies them and steps too. The engine
is deterministic given those calls (scheduling, prefix cache, seeds), and every process reads the same sampled
tokens (the step outputs are replicated), so the processes' engines stay identical.

    # on every host, with its own --process-id (the same command otherwise):
    qwen3-jax serve MODEL --tensor-parallel 16 --coordinator host0:29500 --num-processes 2 --process-id 0
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import jax

from .engine import LLMEngine
from .sampling import SamplingParams

log = logging.getLogger("qwen3_jax")
_KEY = "qwen3_jax/step/{}"  # the key-value store's key of step n's commands
_KEEP = 256  # steps whose keys stay in the store (the processes are never more than a few steps apart)
_WAIT_MS = 60_000  # a follower's wait per read; it waits again while process 0 is idle


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
    preceded by publishing the requests added and aborted since the last one. `shutdown` releases the others."""

    def __init__(self, engine: LLMEngine):
        if not is_leader():
            raise RuntimeError("only process 0 drives the engine; the other processes call follow(engine)")
        self.engine = engine
        self._client = _store()
        self._commands: list = []
        self._steps = 0
        self._closed = False

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
        self._publish(self._commands)
        return self.engine.step()

    generate = LLMEngine.generate  # add_request / step / abort_request, through this class's

    def shutdown(self) -> None:
        """Tell the other processes to stop following (after the commands not yet sent)."""
        if not self._closed:
            self._closed = True
            self._publish(self._commands + [["stop"]])

    def _publish(self, commands: list) -> None:
        self._client.key_value_set(_KEY.format(self._steps), json.dumps(commands))
        if self._steps >= _KEEP:
            self._client.key_value_delete(_KEY.format(self._steps - _KEEP))
        self._steps += 1
        self._commands = []

    def __getattr__(self, name):  # everything else (has_unfinished_requests, seqs, stats, ...) is the engine's
        return getattr(self.engine, name)


def follow(engine: LLMEngine) -> None:
    """A process other than 0: apply process 0's requests and step with it, until it shuts down."""
    if is_leader():
        raise RuntimeError("process 0 drives the engine (LockstepEngine); follow() is for the other processes")
    log.info("process %d: following process 0's steps", jax.process_index())
    client = _store()
    for step in itertools.count():
        for command in json.loads(_wait_for(client, _KEY.format(step))):
            if command[0] == "stop":
                log.info("process %d: process 0 shut down", jax.process_index())
                return
            if command[0] == "add":
                _, rid, prompt, params = command
                engine.add_request(rid, prompt, _sampling_params(params))
            else:
                engine.abort_request(command[1])
        engine.step()


def _wait_for(client, key: str) -> str:
    """The value of `key` once process 0 has set it (however long it stays idle)."""
    while True:
        try:
            return client.blocking_key_value_get(key, _WAIT_MS)
        except jax.errors.JaxRuntimeError as e:
            if "DEADLINE_EXCEEDED" not in str(e):
                raise


def _store():
    """jax.distributed's key-value store (its client has no public accessor in jax 0.11)."""
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: call qwen3_jax.distributed.initialize(...) first")
    return client


def _sampling_params(fields: dict) -> SamplingParams:
    for name in ("stop_token_ids", "stop"):
        fields[name] = tuple(fields[name])
    return SamplingParams(**fields)
