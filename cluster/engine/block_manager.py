"""The paged KV cache's block table and prefix cache (pure Python, no torch).

Blocks hold ``block_size`` tokens of K/V. A full block is named by a hash chain over
its tokens and every token before it, so two requests that share a prefix can share
its blocks. Unreferenced blocks sit in an LRU free queue; a block keeps its hash (and
stays reusable by a later request) until the queue hands it out for new tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cluster.contracts.block_hash import hash_block_tokens
from cluster.engine.sequence import Sequence
from cluster.errors import InvalidConfigError


@dataclass
class Block:
    """One KV block's bookkeeping."""

    block_id: int
    ref_count: int = 0  # sequences whose block table holds this block
    block_hash: int | None = None  # set while registered in the prefix cache


class BlockManager:
    """Hands out KV blocks to sequences, sharing full prefix blocks by hash (vLLM v1 style)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise InvalidConfigError("num_blocks", f"must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise InvalidConfigError("block_size", f"must be >= 1, got {block_size}")
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is LRU order: allocation pops the head, release appends to the tail.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references, cached ones included (they can be evicted)."""
        return len(self._free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def cached_block_id(self, block_hash: int) -> int | None:
        """The block registered under ``block_hash``, if any (for tests and metrics)."""
        return self._hash_to_block.get(block_hash)

    def free_block_ids(self) -> list[int]:
        """The free queue, head (next to be allocated) first."""
        return list(self._free_queue)

    # -- admission ------------------------------------------------------------

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a newly admitted sequence (no blocks yet) its cached prefix blocks.

        Returns the number of cached tokens, which also becomes ``seq.num_computed_tokens``.
        The last token is never covered, so the model still computes it and yields logits.
        """
        if seq.block_ids:
            raise RuntimeError(f"request {seq.request_id!r} already holds blocks")
        self.prefix_cache_queries += seq.num_tokens
        if self.enable_prefix_caching:
            self._take_cached_prefix(seq)
        num_cached = len(seq.block_ids) * self._block_size
        seq.num_computed_tokens = num_cached
        # After a preemption the hit may cover generated tokens too; report prompt tokens only.
        seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        self.prefix_cache_hits += num_cached
        return num_cached

    def cancel_prefix(self, seq: Sequence) -> None:
        """Undo ``allocate_prefix`` for a sequence the scheduler could not admit after all.

        The stats are rolled back too, so a request retried every step counts once.
        """
        self.prefix_cache_queries -= seq.num_tokens
        self.prefix_cache_hits -= len(seq.block_ids) * self._block_size  # only the hit blocks are held
        self.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _take_cached_prefix(self, seq: Sequence) -> None:
        token_ids = seq.all_token_ids
        parent: int | None = None
        for i in range((seq.num_tokens - 1) // self._block_size):
            parent = hash_block_tokens(parent, token_ids[i * self._block_size:(i + 1) * self._block_size])
            block_id = self._hash_to_block.get(parent)
            if block_id is None:
                break
            self._ref(block_id)
            seq.block_ids.append(block_id)
            seq.block_hashes.append(parent)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_queue[block_id]
        block.ref_count += 1

    # -- growth ---------------------------------------------------------------

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks the sequence needs to hold ``num_computed_tokens + num_new_tokens`` tokens."""
        num_tokens = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-num_tokens // self._block_size) - len(seq.block_ids))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether ``append(seq, num_new_tokens)`` would succeed now."""
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to cover ``num_new_tokens`` more tokens, evicting LRU cached blocks."""
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"request {seq.request_id!r} needs {needed} blocks, "
                               f"{self.num_free_blocks} free; call can_append first")
        # The blocks to evict are the LRU head's; handing them out in ascending id order lays a
        # chunk's K/V out front to back, which the CPU decode kernel reads at twice the speed of
        # the descending runs that tail-first release leaves (tests/unit/test_block_manager.py).
        seq.block_ids.extend(sorted(self._pop_free() for _ in range(needed)))

    def _pop_free(self) -> int:
        block_id, _ = self._free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its old contents are about to be overwritten
            del self._hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    # -- after a step -----------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Hash and register the blocks the last step filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self._block_size, len(seq.block_ids))
        for i in range(len(seq.block_hashes), num_full):  # usually none: a block fills every block_size steps
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block_tokens(parent, seq.token_ids_slice(i * self._block_size,
                                                                       (i + 1) * self._block_size))
            seq.block_hashes.append(block_hash)
            self._register(seq.block_ids[i], block_hash)

    def _register(self, block_id: int, block_hash: int) -> None:
        # Two requests may compute the same block at once; the first one registered wins
        # and the other block simply stays out of the cache.
        block = self.blocks[block_id]
        if block_hash in self._hash_to_block or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._hash_to_block[block_hash] = block_id

    # -- release ----------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks stay cached until evicted."""
        # Tail blocks are released first so they are evicted before the shared prefix.
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block_id] = None
        seq.block_ids = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (returns False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._hash_to_block.clear()
        return True

    def check_invariants(self) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent (used by tests)."""
        for block in self.blocks:
            if block.ref_count < 0 or (block.ref_count == 0) != (block.block_id in self._free_queue):
                raise RuntimeError(f"block {block.block_id}: ref_count {block.ref_count} vs free queue")
            if block.block_hash is not None and self._hash_to_block.get(block.block_hash) != block.block_id:
                raise RuntimeError(f"block {block.block_id}: hash not registered to it")
        for block_hash, block_id in self._hash_to_block.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise RuntimeError(f"hash map points at block {block_id}, which holds another hash")
