"""The inference engine: continuous batching over the paged KV cache, driven one `step()` at a time.

`LLMEngine` owns the pool, the block manager, the scheduler and the compiled steps. `add_request` queues a token
prompt, `step` runs one prefill or decode step and returns the requests that progressed, `abort_request` frees a
request at once. Decode steps run several tokens on the device per call; while the batch stays the same, the next
decode call is queued before the previous one's tokens are read, so the device never waits for the host.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

import jax
import numpy as np

from .block_manager import BlockManager
from .kv_cache import AttentionMetadata, CacheOverflowError, KVCache, blocks_for_memory
from .options import EngineOptions, buckets, engine_options
from .outputs import CompletionOutput, OutputText, RequestMetrics, RequestOutput
from .parallel import local_config
from .sampling import SamplingParams, batch_arrays, history_arrays
from .scheduler import DecodeBatch, PrefillBatch, Scheduler, Sequence, Status
from .steps import StepCompiler, StepOptions, decode_arg_shapes, prefill_arg_shapes

log = logging.getLogger("qwen3_jax")


@dataclasses.dataclass
class _PendingPrefill:
    """A prefill step queued on the device whose sampled tokens the host has not read yet."""

    batch: PrefillBatch
    outputs: dict  # device arrays
    starts: list[int]  # each sequence's num_computed_tokens before this step
    completes: list[bool]  # whether this step's chunk completes the sequence's prompt (its first token is due)
    preemptions: list[int]  # each sequence's preemption count at dispatch: a preempted one's chunk is void
    targets: np.ndarray  # [N] each token's successor (prompt log-probabilities)


@dataclasses.dataclass
class _InFlight:
    """A decode call queued on the device whose tokens the host has not read yet."""

    batch: DecodeBatch
    outputs: dict  # device arrays [B, K, ...]
    positions: np.ndarray  # [B] the position each row was fed at
    counts: np.ndarray  # [B] output tokens each row had at dispatch
    stops: np.ndarray  # [B]
    samp: dict
    seeds: np.ndarray
    opts: StepOptions


class LLMEngine:
    """Continuous batching for one loaded model (`Qwen3`). See the module docstring."""

    def __init__(self, model, options: EngineOptions | None = None, **kwargs):
        options = engine_options(options, **kwargs)
        self.model, self.config = model, model.config
        limit = self.config.max_context_len
        max_model_len = options.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} is beyond the model's context of {limit} positions "
                             "(max_position_embeddings in config.json, or YaRN's factor x "
                             "original_max_position_embeddings)")
        self.options = options = dataclasses.replace(options, max_model_len=max_model_len)
        self.max_blocks_per_seq = -(-max_model_len // options.block_size)
        self.lookahead = options.decode_steps  # positions one decode call may write past a sequence's end
        self.max_prefill_seqs = min(options.max_num_seqs, max(1, options.max_num_batched_tokens // 16), 64)
        self.decode_buckets = buckets(options.max_num_seqs, 1, dense_from=16)  # 1, 4, 16, 32, 64, ...
        self.prefill_buckets = buckets(options.max_num_batched_tokens, min(64, options.max_num_batched_tokens),
                                        dense_from=1024)  # 64, 256, 1024, 2048, ...

        # The kernels address one layer's pool with int32 element offsets.
        most = (2**31 - 1) // (self.config.num_key_value_heads * options.block_size * self.config.head_dim)
        if options.num_blocks is not None and options.num_blocks > most:
            raise ValueError(f"num_blocks={options.num_blocks} is more than one layer's pool can address ({most} "
                             f"blocks of {options.block_size}: int32 offsets in the attention kernels)")
        self.parallel = tp = model.parallel  # a TensorParallel, or None: one device
        self._put = tp.put if tp is not None else jax.device_put  # host arrays -> the step's device(s)
        # one device's KV heads and MLP width; sampling reads the full vocabulary's logits on every device
        per_device = (local_config(self.config, tp.size).replace(vocab_size=self.config.vocab_size)
                      if tp is not None else self.config)
        num_blocks = options.num_blocks or min(most, blocks_for_memory(
            per_device, block_size=options.block_size, utilization=options.gpu_memory_utilization,
            max_num_batched_tokens=options.max_num_batched_tokens,
            max_rows=max(options.max_num_seqs, self.max_prefill_seqs),
            fallback_tokens=min(max_model_len, 1024) * min(options.max_num_seqs, 16) + max_model_len,
            device=tp.local_devices[0] if tp is not None else None))
        if tp is not None:
            self.cache = tp.init_cache(self.config, num_blocks, options.block_size)
        else:
            self.cache = KVCache.init(self.config, num_blocks, options.block_size)
        log.info("KV cache: %d blocks of %d positions (%d tokens, %.2f GiB%s)", num_blocks, options.block_size,
                 num_blocks * options.block_size, self.cache.nbytes / 2**30,
                 f" over {tp.size} devices" if tp is not None else "")
        self.blocks = BlockManager(num_blocks, options.block_size,
                                   enable_prefix_caching=options.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=options.max_num_seqs,
                                   max_num_batched_tokens=options.max_num_batched_tokens,
                                   max_prefill_seqs=self.max_prefill_seqs, lookahead=self.lookahead,
                                   prefills_per_decode=options.decode_steps)
        self.steps = StepCompiler(self.config, model.kernels, options.decode_steps, tp)
        self.seqs: dict[str, Sequence] = {}
        self._texts: dict[str, OutputText] = {}  # per request, when the model has a tokenizer
        self._inflight: _InFlight | None = None
        self._pending: _PendingPrefill | None = None
        self._ids = itertools.count()
        self._rng = random.Random()
        self.compile_s = self.compile_all() if options.precompile else 0.0

    # ---- requests --------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt_token_ids: SequenceABC[int],
                    params: SamplingParams | None = None) -> str:
        """Queue a request (token ids); returns its id. Raises ValueError for a prompt the engine cannot run."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = self._check_prompt(prompt_token_ids)
        max_model_len = self.options.max_model_len
        if len(prompt) >= max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; max_model_len={max_model_len} leaves no room "
                             "for a generated token")
        max_len = min(len(prompt) + params.max_tokens, max_model_len)
        need = self.blocks.blocks_needed(max_len)  # the scheduler never gives a sequence blocks past max_len
        if need > self.blocks.num_blocks:
            raise CacheOverflowError(
                f"request {request_id!r} needs up to {need} KV blocks ({len(prompt)} prompt tokens + "
                f"max_tokens={params.max_tokens}) but the whole pool has {self.blocks.num_blocks} blocks of "
                f"{self.options.block_size}; lower max_tokens or give the engine more blocks (num_blocks / "
                "gpu_memory_utilization)")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= set(self.model.eos_token_ids)
        seed = params.seed if params.seed is not None else self._rng.randrange(2**32)
        seq = Sequence(request_id, prompt, params, seed, frozenset(stop), max_len)
        if params.logprobs is not None:
            seq.logprobs = []
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]
        self.seqs[request_id] = seq
        if self.model.tokenizer is not None:
            self._texts[request_id] = OutputText(self.model.tokenizer, params.stop, params.include_stop_str_in_output)
        self.scheduler.add(seq)
        return request_id

    def _check_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (SequenceABC, np.ndarray)):
            raise TypeError(f"a prompt must be a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: a prompt needs at least one token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            bad = next(t for t in ids if not isinstance(t, (int, np.integer)) or isinstance(t, bool))
            raise TypeError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id(s) outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; False if it is unknown or already finished."""
        seq = self.seqs.get(str(request_id))
        if seq is None or seq.finished:
            return False
        self.scheduler.finish(seq, "abort")
        self._forget(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        # A decode call in flight whose rows have all finished (at a stop token, or aborted) has nothing to deliver.
        inflight = self._inflight is not None and not all(s.finished for s in self._inflight.batch.seqs)
        return self.scheduler.has_work() or inflight or self._pending is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], *, use_tqdm: bool = False,
                 on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run token prompts to completion (alongside any requests already queued) -> their final outputs, in
        order. `on_output(i, output)` sees prompt i after every step that changed it. On an error or Ctrl-C the
        prompts' requests are aborted, so the engine is left clean."""
        added: list[str] = []
        final: dict[str, RequestOutput] = {}
        bar = None
        try:
            for p, sp in zip(prompts, params):
                added.append(self.add_request(None, p, sp))
            index = {rid: i for i, rid in enumerate(added)}
            bar = _progress_bar(len(added)) if use_tqdm else None
            while len(final) < len(added):
                for out in self.step():
                    if out.request_id not in index:
                        continue
                    if on_output is not None:
                        on_output(index[out.request_id], out)
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in added:
                self.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[rid] for rid in added]

    # ---- stepping --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that got tokens or finished in it.

        Device work is queued before the previous work's results are read, so the device stays busy while the host
        processes them: a decode call continues into the next one, and a prefill step is read after the next
        prefill step is queued (or before a decode call, which needs the first tokens it sampled)."""
        changed: dict[str, Sequence] = {}
        if self._inflight is not None:
            done = self._inflight
            self._inflight = self._continue_decode(done)  # queued before reading `done`: the device stays busy
            self._finish_decode(done, changed)
            if self._inflight is not None:
                return self._outputs(changed)
        batch = self.scheduler.schedule()
        pending, self._pending = self._pending, None
        if isinstance(batch, PrefillBatch):
            self._pending = self._dispatch_prefill(batch)
        if pending is not None:
            self._finish_prefill(pending, changed)
        if isinstance(batch, DecodeBatch):
            batch.seqs = [s for s in batch.seqs if not s.finished]  # a first token just read may have ended one
            if batch.seqs:
                self._inflight = self._dispatch_decode(batch)
        return self._outputs(changed)

    def _outputs(self, changed: dict[str, Sequence]) -> list[RequestOutput]:
        outs = [self._request_output(seq) for seq in changed.values()]
        for seq in changed.values():
            if seq.finished:
                self._forget(seq)
        return outs

    def _forget(self, seq: Sequence) -> None:
        self.seqs.pop(seq.request_id, None)
        self._texts.pop(seq.request_id, None)

    # ---- prefill ---------------------------------------------------------------------------------------
    def _dispatch_prefill(self, batch: PrefillBatch) -> _PendingPrefill:
        """Queue a prefill step; the sequences' computed tokens advance now, so the next step can follow on."""
        opts = self._options(batch.seqs, prompt=True)
        num_tokens = self._bucket("prefill", batch.num_tokens, opts)
        rows = self.max_prefill_seqs
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.full(num_tokens, -1, np.int32)
        targets = np.zeros(num_tokens, np.int32)
        last = np.zeros(rows, np.int32)
        seq_lens, tables, starts, completes, start = [], [], [], [], 0
        for i, (seq, chunk) in enumerate(zip(batch.seqs, batch.chunks)):
            ids = seq.token_ids
            lo, hi = seq.num_computed_tokens, seq.num_computed_tokens + chunk
            tokens[start:start + chunk] = ids[lo:hi]
            positions[start:start + chunk] = np.arange(lo, hi)
            nxt = ids[lo + 1:hi + 1]
            targets[start:start + len(nxt)] = nxt
            last[i] = start + chunk - 1
            seq_lens.append(hi)
            tables.append(seq.block_table)
            starts.append(lo)
            seq.num_computed_tokens = hi
            completes.append(not seq.prefilling and not seq.output_token_ids)
            start += chunk
        meta = AttentionMetadata.for_prefill(tables, seq_lens, batch.chunks, block_size=self.options.block_size,
                                             num_tokens=num_tokens, num_seqs=rows, max_blocks=self.max_blocks_per_seq,
                                             put=self._put)
        samp, seeds, counts = self._sampling_rows(batch.seqs, rows, opts)
        tokens, positions, last, targets_d = self._put((tokens, positions, last, targets))
        args = (self.model.params, self.cache, tokens, positions, meta, last, targets_d, samp, seeds, counts)
        out, self.cache = self.steps.get("prefill", opts, args)(*args)
        return _PendingPrefill(batch, out, starts, completes, [s.num_preemptions for s in batch.seqs], targets)

    def _finish_prefill(self, done: _PendingPrefill, changed: dict) -> None:
        """Read a prefill step's outputs: prompt log-probabilities, and the first token of each completed prompt."""
        out = jax.device_get(done.outputs)
        now = time.monotonic()
        start = 0
        for i, (seq, chunk) in enumerate(zip(done.batch.seqs, done.batch.chunks)):
            if seq.status is Status.RUNNING and seq.num_preemptions == done.preemptions[i]:  # not aborted/preempted
                lo = done.starts[i]
                self._cache_full_blocks(seq)
                if seq.prompt_logprobs is not None and not seq.output_token_ids:
                    for j in range(chunk):
                        if lo + j + 1 < len(seq.prompt_token_ids):
                            seq.prompt_logprobs.append(_logprob_entry(
                                int(done.targets[start + j]), out["prompt_logprob"][start + j],
                                out["prompt_top_ids"][start + j], out["prompt_top_logprobs"][start + j],
                                seq.params.prompt_logprobs))
                if done.completes[i]:  # the prompt is in: its first token
                    seq.first_token_time = now
                    self._append(seq, int(out["tokens"][i]), out, (i,))
                    changed[seq.request_id] = seq
            start += chunk

    # ---- decode ----------------------------------------------------------------------------------------
    def _dispatch_decode(self, batch: DecodeBatch, tokens=None, positions=None, counts=None, prev=None) -> _InFlight:
        n = len(batch.seqs)
        if prev is None:
            opts = self._options(batch.seqs, prompt=False)
            rows = self._bucket("decode", n, opts)
            positions = np.full(rows, -1, np.int32)
            positions[:n] = [s.num_tokens - 1 for s in batch.seqs]
            counts = np.zeros(rows, np.int32)
            counts[:n] = [len(s.output_token_ids) for s in batch.seqs]
            feed = np.zeros(rows, np.int32)
            feed[:n] = [s.output_token_ids[-1] for s in batch.seqs]
            tokens = self._put(feed)
            stops = np.zeros(rows, np.int32)
            stops[:n] = [s.max_len - 1 for s in batch.seqs]
            samp, seeds, _ = self._sampling_rows(batch.seqs, rows, opts)
        else:
            stops, opts, samp, seeds = prev.stops, prev.opts, prev.samp, prev.seeds
            rows = len(positions)
        tables = np.zeros((rows, self.max_blocks_per_seq), np.int32)
        for i, s in enumerate(batch.seqs):
            tables[i, :len(s.block_table)] = s.block_table
        host = self._put((positions, stops, tables, counts))  # one transfer call for the per-call arrays
        args = (self.model.params, self.cache, tokens, *host[:3], samp, seeds, host[3])
        outputs, self.cache = self.steps.get("decode", opts, args)(*args)
        if opts.penalties:  # the history with this call's tokens: the next call's, kept on the device
            samp = {**samp, "history": outputs.pop("history")}
        return _InFlight(batch, outputs, positions, counts, stops, samp, seeds, opts)

    def _continue_decode(self, done: _InFlight) -> _InFlight | None:
        """Queue the next decode call for the same batch before `done` is read, if nothing else could run now, the
        live rows still need this batch size, and every live row has blocks for it; else None (the host reads
        `done` and schedules afresh). Rows of sequences that finished before `done` compute nothing."""
        sched = self.scheduler
        if sched.can_admit_next() or any(s.prefilling for s in sched.running):
            return None
        seqs = done.batch.seqs
        live = [i for i, s in enumerate(seqs) if not s.finished]
        if not live or len(live) != len(sched.running):  # all done, or sequences admitted meanwhile
            return None
        if self._bucket("decode", len(live), done.opts) < len(done.positions):
            return None  # a smaller batch would do: reschedule (compacts the rows)
        k = self.options.decode_steps
        alive = np.zeros(len(done.positions), bool)
        alive[live] = True
        positions = np.where(alive & (done.positions >= 0), done.positions + k, -1).astype(np.int32)
        stops = np.where(alive, done.stops, 0).astype(np.int32)
        if np.all(positions >= stops):
            return None  # every live row reaches its length limit in `done`: the next call would compute nothing
        targets = {i: min(int(positions[i]) + k, seqs[i].max_len) for i in live}  # blocks for this call's positions
        need = sum(max(self.blocks.blocks_needed(t) - len(seqs[i].block_table), 0) for i, t in targets.items())
        if need > self.blocks.num_free_blocks:
            return None
        for i, t in targets.items():
            self.blocks.grow(seqs[i].block_table, t)
        prev = dataclasses.replace(done, stops=stops)
        return self._dispatch_decode(done.batch, done.outputs["last"], positions, done.counts + k, prev)

    def _finish_decode(self, done: _InFlight, changed: dict) -> None:
        out = jax.device_get(done.outputs)
        k = self.options.decode_steps
        for i, seq in enumerate(done.batch.seqs):
            if seq.finished:
                continue  # aborted, or finished in the call before this one
            for j in range(k):
                if done.positions[i] + j >= done.stops[i] or seq.finished:
                    break
                seq.num_computed_tokens += 1  # the token fed at this step is now in the cache
                self._append(seq, int(out["tokens"][i, j]), out, (i, j))
                changed[seq.request_id] = seq
            if not seq.finished:
                self._cache_full_blocks(seq)

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache (only when one completed: cheap)."""
        if seq.num_computed_tokens // self.options.block_size > len(seq.block_hashes):
            self.blocks.cache_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.block_hashes)

    def _append(self, seq: Sequence, token: int, out: dict, index: tuple) -> None:
        """A new token for `seq`; finishes it on a stop token, a stop string or at its length limit, and with
        finish_reason "error" (the token dropped) when the model's logits for it were not finite."""
        if not out["finite"][index]:
            log.error("request %r: the model produced NaN or Inf logits at position %d; the request is stopped "
                      "(finish_reason 'error')", seq.request_id, seq.num_tokens - 1)
            self.scheduler.finish(seq, "error")
            if seq.request_id in self._texts:
                self._texts[seq.request_id].flush()
            return
        seq.output_token_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(_logprob_entry(token, out["logprob"][index], out["top_ids"][index],
                                               out["top_logprobs"][index], seq.params.logprobs))
        if token in seq.stop_ids:
            self.scheduler.finish(seq, "stop")
            seq.stop_reason = token if token in seq.params.stop_token_ids else None
        elif seq.num_tokens >= seq.max_len:
            self.scheduler.finish(seq, "length")
        text = self._texts.get(seq.request_id)
        stop = text.add(token, last=seq.finished) if text is not None else None
        if stop is not None:  # a stop string: the text ends at it
            if not seq.finished:
                self.scheduler.finish(seq, "stop")
            seq.finish_reason, seq.stop_reason = "stop", stop

    def _bucket(self, kind: str, n: int, opts: StepOptions) -> int:
        """The step size (decode rows or prefill tokens) to run `n` in: the smallest bucket that fits; without
        precompile, the smallest already compiled one that fits if any, so a run compiles few executables."""
        buckets = self.decode_buckets if kind == "decode" else self.prefill_buckets
        fits = [b for b in buckets if b >= n]
        if not self.options.precompile:
            compiled = self.steps.compiled_sizes(kind, opts)
            fits = [b for b in fits if b in compiled] or fits
        return fits[0]

    # ---- helpers ---------------------------------------------------------------------------------------
    def _options(self, seqs, *, prompt: bool) -> StepOptions:
        # Prompt log-probabilities only while a sequence that asked for them has produced nothing yet.
        return dataclasses.replace(_step_options([s.params for s in seqs]), prompt_logprobs=prompt and any(
            s.params.prompt_logprobs is not None and not s.output_token_ids for s in seqs))

    def _sampling_rows(self, seqs, rows: int, opts: StepOptions):
        samp = batch_arrays([s.params for s in seqs], rows, penalties=opts.penalties)
        if opts.penalties:
            samp |= history_arrays([s.token_ids for s in seqs], [len(s.prompt_token_ids) for s in seqs], rows,
                                   self.options.max_model_len)
        samp = self._put(samp)
        seeds = np.zeros(rows, np.uint32)
        seeds[:len(seqs)] = [s.seed for s in seqs]
        counts = np.zeros(rows, np.int32)
        counts[:len(seqs)] = [len(s.output_token_ids) for s in seqs]
        return (samp, *self._put((seeds, counts)))

    def _request_output(self, seq: Sequence) -> RequestOutput:
        text = self._texts[seq.request_id].visible(seq.finished) if seq.request_id in self._texts else None
        completion = CompletionOutput(0, text, list(seq.output_token_ids), seq.finish_reason,
                                      list(seq.logprobs) if seq.logprobs is not None else None, seq.stop_reason)
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finished_time, seq.num_cached_tokens,
                                 seq.num_preemptions)
        return RequestOutput(seq.request_id, list(seq.prompt_token_ids), [completion], seq.finished,
                             list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None, metrics)

    def stats(self) -> dict:
        """Counters for logs and metrics: requests, blocks, prefix-cache hit rate, preemptions."""
        b = self.blocks
        return {"running": self.num_running, "waiting": self.num_waiting, "blocks_total": b.num_blocks,
                "blocks_free": b.num_free_blocks, "blocks_cached": b.num_cached_blocks,
                "prefix_cache_hit_rate": b.hits / b.queries if b.queries else 0.0,
                "preemptions": self.scheduler.num_preemptions}

    # ---- start-up --------------------------------------------------------------------------------------
    def _prefill_shapes(self, num_tokens: int, opts: StepOptions = StepOptions()) -> tuple:
        history = self.options.max_model_len if opts.penalties else None
        return prefill_arg_shapes(self.model.params, self.cache, num_tokens, self.max_prefill_seqs,
                                  self.max_blocks_per_seq, history, self.parallel)

    def _decode_shapes(self, rows: int, opts: StepOptions = StepOptions()) -> tuple:
        history = self.options.max_model_len if opts.penalties else None
        return decode_arg_shapes(self.model.params, self.cache, rows, self.max_blocks_per_seq, history,
                                 self.parallel)

    def compile_all(self) -> float:
        """Compile the prefill and decode steps of every bucket (greedy and sampled) now; returns seconds."""
        jobs = []
        for greedy in (True, False):
            opts = StepOptions(greedy=greedy)
            jobs += [("prefill", opts, self._prefill_shapes(n)) for n in self.prefill_buckets]
            jobs += [("decode", opts, self._decode_shapes(b)) for b in self.decode_buckets]
        return self.steps.compile_all(jobs)

    def compile_for(self, num_seqs: int, prompt_tokens: int, params: list[SamplingParams]) -> float:
        """Compile (concurrently, now) the prefill and decode steps a run of `num_seqs` requests with
        `prompt_tokens` prompt tokens in all will start with; returns seconds. Without precompile this keeps the
        first compilations out of a streaming run."""
        opts = _step_options(params)
        tokens = self._bucket("prefill", min(prompt_tokens, self.options.max_num_batched_tokens), opts)
        decode_opts = dataclasses.replace(opts, prompt_logprobs=False)
        rows = self._bucket("decode", min(num_seqs, self.options.max_num_seqs), decode_opts)
        return self.steps.compile_all([("prefill", opts, self._prefill_shapes(tokens, opts)),
                                       ("decode", decode_opts, self._decode_shapes(rows, decode_opts))],
                                      progress=False)


def _step_options(params: SequenceABC[SamplingParams]) -> StepOptions:
    """The step variant that requests with these sampling params need together."""
    return StepOptions(greedy=all(p.greedy for p in params), logprobs=any(p.logprobs is not None for p in params),
                       prompt_logprobs=any(p.prompt_logprobs is not None for p in params),
                       penalties=any(p.penalized for p in params))


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="requests", unit="req")


def _logprob_entry(token: int, chosen, top_ids, top_values, k: int) -> dict[int, float]:
    """{token id: log-probability} for the chosen token and the k most likely, the chosen one first."""
    entry = {token: float(chosen)}
    for t, v in zip(top_ids[:k].tolist(), top_values[:k].tolist()):
        entry.setdefault(int(t), float(v))
    if not math.isfinite(entry[token]):
        entry[token] = float("-inf")
    return entry


__all__ = ["EngineOptions", "LLMEngine", "Status", "engine_options"]
