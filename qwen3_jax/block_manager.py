"""KV-cache block accounting with prefix caching: which pool blocks each sequence owns, reference counts, and the
hash table of full blocks that later requests with the same prefix reuse.

A full block is identified by a chained hash of its tokens and every token before it (hash(previous block's hash,
its tokens)), so two sequences share a block only when their whole prefixes up to that block's end are equal; the
tokens are kept and compared on a hit, so a hash collision can never hand out the wrong block. Blocks with no
owner stay in the hash table until they are needed again: free blocks are reused least recently freed first,
and the tail blocks of a sequence are freed before its head, so shared prefixes outlive the suffixes after them.
"""

from __future__ import annotations

import collections
import dataclasses


class NoFreeBlocksError(RuntimeError):
    """The pool has no free block left (the scheduler checks `num_free_blocks` before allocating)."""


@dataclasses.dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its keys and values are computed
    tokens: tuple[int, ...] = ()  # the block's tokens, kept with the hash to verify a hit


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    """The hash of a full block: its tokens and (through `previous`) every token before it."""
    return hash((previous, tokens))


class BlockManager:
    """Blocks of `block_size` positions in a pool of `num_blocks`; all methods are host-side bookkeeping."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # chain hash -> block id
        self.hits = 0  # prefix-cache hits and lookups, in blocks
        self.queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner (some may still hold a cached prefix)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids of the longest cached run of full blocks that starts `token_ids` (read-only lookup)."""
        if not self.enable_prefix_caching:
            return []
        out, h = [], None
        for i in range(len(token_ids) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(h, tokens)
            block_id = self._cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            out.append(block_id)
        return out

    def allocate(self, token_ids: list[int], num_tokens: int, *, max_cached: int) -> tuple[list[int], int]:
        """Blocks for the first `num_tokens` positions of a new sequence, reusing up to `max_cached` cached
        prefix blocks -> (block table, number of tokens whose keys and values are already there)."""
        hit = self.cached_prefix(token_ids)[:max_cached]
        need = self.blocks_needed(num_tokens)
        self.queries += len(token_ids) // self.block_size
        self.hits += len(hit)
        fresh = need - len(hit)
        if fresh > self.num_free_blocks - sum(1 for b in hit if self.blocks[b].ref_count == 0):
            raise NoFreeBlocksError(f"{fresh} blocks needed, {self.num_free_blocks} free")
        for block_id in hit:
            self._take(block_id)
        table = hit + [self._take(self._evict()) for _ in range(fresh)]
        return table, len(hit) * self.block_size

    def blocks_to_allocate(self, token_ids: list[int], num_tokens: int, *, max_cached: int) -> int:
        """How many free blocks `allocate` would consume (cached hits that have no owner count: they leave the
        free list too)."""
        hit = self.cached_prefix(token_ids)[:max_cached]
        idle_hits = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - len(hit) + idle_hits

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it covers `num_tokens` positions."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"{need} blocks needed, {self.num_free_blocks} free")
        for _ in range(max(need, 0)):
            table.append(self._take(self._evict()))

    def cache_full_blocks(self, table: list[int], token_ids: list[int], num_computed: int,
                          hashes: list[int]) -> None:
        """Register every block of `table` whose positions are all below `num_computed` (keys and values
        written) under its chain hash, so later requests can reuse it. `hashes` holds the chain hashes of the
        sequence's blocks registered so far and is extended (so each block is hashed once)."""
        if not self.enable_prefix_caching:
            return
        for i in range(len(hashes), min(num_computed // self.block_size, len(table))):
            block = self.blocks[table[i]]
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            if block.hash is not None or h in self._cached:
                continue  # a prefix hit, or the same prefix computed twice by requests in flight together
            block.hash, block.tokens = h, tokens
            self._cached[h] = block.block_id

    def free(self, table: list[int]) -> None:
        """Release a sequence's blocks, tail first (so a shared head is evicted last)."""
        for block_id in reversed(table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        table.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix held only by free blocks."""
        for block_id in self._free:
            self._uncache(self.blocks[block_id])

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
        return block_id

    def _evict(self) -> int:
        """The least recently freed block, its cached prefix (if any) forgotten."""
        if not self._free:
            raise NoFreeBlocksError("no free block")
        block_id = next(iter(self._free))
        self._uncache(self.blocks[block_id])
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.hash is not None:
            if self._cached.get(block.hash) == block.block_id:
                del self._cached[block.hash]
            block.hash, block.tokens = None, ()
