"""KV pages with reference counts and a prefix cache keyed by a hash chain over full pages.

A page enters the prefix cache only once its KV has been computed, so a request can never
read a page that another request is still filling. Freed pages keep their hash until reused,
so a later request with the same prefix can revive them.
"""
from __future__ import annotations

from collections import deque

from vllm_jax.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: tuple = ()


def chain_hash(prev: int, token_ids) -> int:
    return hash((prev, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, page_size: int, enable_prefix_caching: bool = True):
        self.page_size = page_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids = deque(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt pages looked up
        self.prefix_hits = 0  # ... found in the cache

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached run of full pages, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        hits, h = [], -1
        for i in range((seq.num_tokens - 1) // self.page_size):
            tokens = tuple(seq.page_tokens(i, self.page_size))
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.pages_needed(seq.num_tokens) - len(hits) + revived <= self.num_free

    def allocate(self, seq: Sequence):
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        self.prefix_queries += (seq.num_tokens - 1) // self.page_size
        self.prefix_hits += len(hits)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                self.free_ids.remove(bid)
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block.hash)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.page_size
        # the least recently freed pages, in ascending order: a finished sequence's pages come
        # back tail first, and a prompt's KV read backwards page by page is 2x slower to stream
        fresh = [self._take_free() for _ in range(self.pages_needed(seq.num_tokens) - len(hits))]
        seq.block_table.extend(sorted(fresh))

    def _take_free(self) -> int:
        bid = self.free_ids.popleft()
        block = self.blocks[bid]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == bid:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, (), 1
        return bid

    def deallocate(self, seq: Sequence):
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(bid)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of every token the sequence holds."""
        return self.pages_needed(seq.num_tokens) - len(seq.block_table) <= self.num_free

    def may_append(self, seq: Sequence, num_tokens: int | None = None):
        """Pages for num_tokens (default: the tokens the sequence holds)."""
        needed = self.pages_needed(seq.num_tokens if num_tokens is None else num_tokens)
        while len(seq.block_table) < needed:
            seq.block_table.append(self._take_free())

    def register_computed(self, seq: Sequence):
        """Publish the pages whose KV is now complete to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.page_size
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.page_tokens(i, self.page_size))
            prev = seq.block_hashes[-1] if seq.block_hashes else -1
            h = chain_hash(prev, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)

    def reset_prefix_cache(self):
        """Forget every page's contents (the KV cache was lost); only when no sequence holds
        a page."""
        assert self.num_free == self.num_blocks
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash, block.token_ids = -1, ()
