"""Continuous batching: requests wait, are admitted while KV blocks and sequence slots allow, prefill in chunks
under a per-step token budget, then decode together; when the pool runs out, the newest running request is
preempted (its blocks freed, to be recomputed later from its prompt and the tokens it has produced).

Each step is either a prefill step (chunks of one or more sequences' uncomputed tokens) or a decode step (every
sequence whose prompt is in the cache, several tokens on the device). When both kinds have work, up to
`prefills_per_decode` prefill steps run between two decode calls, so running decodes wait a bounded number of
prefill chunks.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time

from .block_manager import BlockManager
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's state on the host."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]  # EOS ids (unless ignore_eos) and the request's stop_token_ids
    max_len: int  # prompt + max_tokens, capped at the engine's max_model_len
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    block_table: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # positions whose keys and values are in the pool
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at (the last) admission
    num_preemptions: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefilling(self) -> bool:
        """Still has prompt (or, after a preemption, earlier output) tokens to compute before it decodes."""
        return self.num_computed_tokens < self.num_tokens - (1 if self.output_token_ids else 0)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclasses.dataclass
class PrefillBatch:
    seqs: list[Sequence]
    chunks: list[int]  # tokens of each sequence computed in this step, from its num_computed_tokens

    @property
    def num_tokens(self) -> int:
        return sum(self.chunks)


@dataclasses.dataclass
class DecodeBatch:
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_seqs: int, lookahead: int, prefills_per_decode: int = 1):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.lookahead = lookahead  # positions a decode step may write past a sequence's current length
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # While both have work, up to this many prefill steps run between two decode calls. A decode call runs
        # `lookahead` tokens, so lookahead prefill steps per call admit as fast as vLLM (one decode token per
        # prefill step) and running sequences still get their tokens at the same average rate.
        self.prefills_per_decode = prefills_per_decode
        self._prefills_in_a_row = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> PrefillBatch | DecodeBatch | None:
        """The next step: a prefill batch, a decode batch, or None when nothing can run."""
        decoding = [s for s in self.running if not s.prefilling]
        if not (self._prefills_in_a_row >= self.prefills_per_decode and decoding):
            batch = self._schedule_prefill()
            if batch is not None:
                self._prefills_in_a_row += 1
                return batch
        self._prefills_in_a_row = 0
        return self._schedule_decode() if decoding else None

    def _schedule_prefill(self) -> PrefillBatch | None:
        seqs, chunks = [], []
        budget = self.max_num_batched_tokens

        def take(seq: Sequence) -> None:
            nonlocal budget
            n = min(seq.num_tokens - seq.num_computed_tokens - (1 if seq.output_token_ids else 0), budget)
            # A resumed sequence recomputes all its tokens but the last, which the next decode step feeds.
            seqs.append(seq)
            chunks.append(n)
            budget -= n

        for seq in self.running:  # sequences admitted earlier whose prompt is only partly computed
            if seq.prefilling and budget > 0 and len(seqs) < self.max_prefill_seqs:
                take(seq)
        while self.waiting and budget > 0 and len(seqs) < self.max_prefill_seqs:
            seq = self.waiting[0]
            if len(self.running) >= self.max_num_seqs or not self._admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            take(seq)
        return PrefillBatch(seqs, chunks) if seqs else None

    def can_admit_next(self) -> bool:
        """Whether the first waiting sequence could be admitted now."""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs and self._fits(self.waiting[0])[0]

    def _fits(self, seq: Sequence) -> tuple[bool, int]:
        """(whether the pool can hold all of `seq`'s tokens now, how many leading blocks it may take from the
        prefix cache). A prefix hit never covers the last token to compute, whose logits are needed."""
        # Tokens to compute before decoding: the prompt; after a preemption, also the output but its last token.
        target = seq.num_tokens - (1 if seq.output_token_ids else 0)
        max_cached = (target - 1) // self.blocks.block_size
        if seq.prompt_logprobs is not None and not seq.output_token_ids:
            max_cached = 0  # prompt log-probabilities need every prompt token computed
        need = self.blocks.blocks_to_allocate(seq.token_ids, seq.num_tokens, max_cached=max_cached)
        # Keep one block per running sequence in reserve so admissions cannot starve the decodes at once.
        return need <= self.blocks.num_free_blocks - len(self.running), max_cached

    def _admit(self, seq: Sequence) -> bool:
        """Give a waiting sequence the blocks for all its tokens, reusing cached prefix blocks; False if the pool
        cannot hold it now."""
        fits, max_cached = self._fits(seq)
        if not fits:
            return False
        tokens = seq.token_ids
        seq.block_table, cached = self.blocks.allocate(tokens, seq.num_tokens, max_cached=max_cached)
        seq.block_hashes = []
        self.blocks.cache_full_blocks(seq.block_table, tokens, cached, seq.block_hashes)
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        seq.status = Status.RUNNING
        return True

    def _schedule_decode(self) -> DecodeBatch | None:
        """Every running sequence past its prefill, each with blocks for `lookahead` more positions; the newest
        sequences are preempted while the pool cannot provide them."""
        decoding = [s for s in self.running if not s.prefilling]
        while decoding:
            short = [(s, self._decode_blocks(s)) for s in decoding]
            need = sum(n for _, n in short)
            if need <= self.blocks.num_free_blocks:
                for seq, n in short:
                    if n:
                        self.blocks.grow(seq.block_table, self._decode_target(seq))
                return DecodeBatch(decoding)
            victim = self.running[-1]
            self.preempt(victim)
            decoding = [s for s in decoding if s is not victim]
        return None

    def _decode_target(self, seq: Sequence) -> int:
        # A sequence with no output yet has its first token still to be read from its last prefill step.
        pending_first = 0 if seq.output_token_ids else 1
        return min(seq.num_tokens - 1 + pending_first + self.lookahead, seq.max_len)

    def _decode_blocks(self, seq: Sequence) -> int:
        return max(self.blocks.blocks_needed(self._decode_target(seq)) - len(seq.block_table), 0)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it first in line, to be recomputed when admitted again."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        if seq.prompt_logprobs is not None and not seq.output_token_ids:
            del seq.prompt_logprobs[1:]  # preempted mid-prefill: the recomputed prompt yields them again
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished (or aborted) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq.block_table)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.monotonic()
