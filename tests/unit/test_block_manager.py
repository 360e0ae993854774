"""BlockManager: exact block ids, ref counts, LRU eviction and prefix-cache hits."""

from __future__ import annotations

import pytest

from cluster.engine.block_manager import BlockManager, hash_block_tokens
from cluster.engine.sequence import Sequence
from cluster.errors import InvalidConfigError
from cluster.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_seq(request_id: str, prompt_token_ids: list[int]) -> Sequence:
    return Sequence(request_id, list(prompt_token_ids), SamplingParams(max_tokens=8))


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit the sequence and pretend one step computed its whole prompt."""
    bm.allocate_prefix(seq)
    bm.append(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def test_initial_state():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks, bm.usage) == (8, 4, 8, 0.0)
    assert bm.free_block_ids() == list(range(8))


def test_bad_sizes_raise_typed_error():
    with pytest.raises(InvalidConfigError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(InvalidConfigError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)


def test_hash_is_pinned_and_chained():
    # Pinned values: workers and restarted processes must agree on every hash.
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == 9121524398691793932
    assert hash_block_tokens(first, [5, 6, 7, 8]) == 5094574419050465977
    assert hash_block_tokens(0, [1, 2, 3, 4]) != first
    assert hash_block_tokens(first, [1, 2, 3, 4]) != first
    assert 0 <= first < 2**64


def test_allocate_and_append_exact_ids():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq("a", range(10))
    assert bm.allocate_prefix(seq) == 0
    assert bm.num_blocks_needed(seq, 10) == 3
    bm.append(seq, 10)
    assert seq.block_ids == [0, 1, 2]
    assert ref_counts(bm)[:4] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    seq.num_computed_tokens = 10
    assert bm.num_blocks_needed(seq, 2) == 0  # 12 tokens still fit in 3 blocks
    assert bm.num_blocks_needed(seq, 3) == 1
    bm.append(seq, 3)
    assert seq.block_ids == [0, 1, 2, 3]
    bm.check_invariants()


def test_append_raises_when_out_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=BLOCK_SIZE)
    seq = make_seq("a", range(9))
    bm.allocate_prefix(seq)
    assert not bm.can_append(seq, 9) and bm.can_append(seq, 8)
    with pytest.raises(RuntimeError, match="needs 3 blocks"):
        bm.append(seq, 9)
    assert seq.block_ids == [] and bm.num_free_blocks == 2


def test_commit_registers_only_full_computed_blocks():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq("a", range(10))
    bm.allocate_prefix(seq)
    bm.append(seq, 10)
    seq.num_computed_tokens = 7  # a chunk ended mid-block: only block 0 is full and computed
    bm.commit(seq)
    h0 = hash_block_tokens(None, [0, 1, 2, 3])
    assert seq.block_hashes == [h0]
    assert [b.block_hash for b in bm.blocks[:3]] == [h0, None, None]
    seq.num_computed_tokens = 10
    bm.commit(seq)
    h1 = hash_block_tokens(h0, [4, 5, 6, 7])
    assert seq.block_hashes == [h0, h1]
    assert bm.cached_block_id(h1) == 1 and bm.blocks[2].block_hash is None
    bm.check_invariants()


def test_prefix_hit_shares_blocks_with_running_sequence():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq("a", range(10))
    compute(bm, a)
    b = make_seq("b", list(range(8)) + [50, 51, 52])  # shares two full blocks with a
    assert bm.allocate_prefix(b) == 8
    assert b.block_ids == [0, 1] and b.block_hashes == a.block_hashes
    assert (b.num_computed_tokens, b.num_cached_tokens) == (8, 8)
    assert ref_counts(bm)[:3] == [2, 2, 1]
    assert bm.num_free_blocks == 5  # hits on referenced blocks take nothing from the queue
    bm.append(b, 3)
    assert b.block_ids == [0, 1, 3]
    bm.free(a)
    assert ref_counts(bm)[:4] == [1, 1, 0, 1]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2]
    bm.check_invariants()


def test_hits_stop_at_first_miss():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(bm, make_seq("a", range(12)))
    b = make_seq("b", [0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])  # block 1 differs, block 2 equal
    assert bm.allocate_prefix(b) == 4
    assert b.block_ids == [0]


def test_never_covers_last_token():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(bm, make_seq("a", range(8)))  # two full blocks, both cached
    same = make_seq("same", range(8))
    assert bm.allocate_prefix(same) == 4  # block 1 would hold the last token: recompute it
    assert same.block_ids == [0]
    longer = make_seq("longer", range(9))
    assert bm.allocate_prefix(longer) == 8
    assert longer.block_ids == [0, 1]


def test_free_releases_in_reverse_order_and_is_idempotent():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    seq = make_seq("a", range(10))
    compute(bm, seq)
    bm.free(seq)
    assert seq.block_ids == [] and seq.block_hashes == []
    assert bm.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.free(seq)
    assert bm.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert bm.cached_block_id(hash_block_tokens(None, [0, 1, 2, 3])) == 0  # still cached
    bm.check_invariants()


def test_freed_cached_blocks_are_reused_by_later_request():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(bm, a := make_seq("a", range(10)))
    bm.free(a)
    b = make_seq("b", range(9))
    assert bm.allocate_prefix(b) == 8
    assert b.block_ids == [0, 1]
    assert bm.free_block_ids() == [3, 4, 5, 6, 7, 2]  # the hits left the free queue
    assert bm.num_free_blocks == 6
    bm.append(b, 1)
    assert b.block_ids == [0, 1, 3]
    bm.check_invariants()


def test_eviction_in_lru_order_drops_hashes():
    bm = BlockManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_seq("a", range(9))
    compute(bm, a)  # blocks [0, 1, 2]; 0 and 1 hashed
    h0, h1 = a.block_hashes
    bm.free(a)
    assert bm.free_block_ids() == [3, 2, 1, 0]
    b = make_seq("b", range(100, 109))
    bm.allocate_prefix(b)
    bm.append(b, 9)
    # The LRU head {3, 2, 1} is taken (a's tail block 1 is evicted before its head block 0),
    # handed out in ascending order.
    assert b.block_ids == [1, 2, 3]
    assert bm.cached_block_id(h1) is None and bm.blocks[1].block_hash is None
    assert bm.cached_block_id(h0) == 0
    c = make_seq("c", range(9))
    assert bm.allocate_prefix(c) == 4
    assert c.block_ids == [0] and bm.num_free_blocks == 0
    bm.check_invariants()


def test_reused_blocks_are_handed_out_in_ascending_order():
    # Release is tail-first, so a freed sequence's blocks sit in the free queue in descending
    # order; one allocation must still lay its tokens out front to back (the CPU decode kernel
    # streams ascending runs of blocks about twice as fast as descending or scattered ones).
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    a = make_seq("a", range(4 * 8))
    bm.allocate_prefix(a)
    bm.append(a, a.num_tokens)
    assert a.block_ids == list(range(8))
    bm.free(a)
    assert bm.free_block_ids()[8:] == list(range(7, -1, -1))
    b, c = make_seq("b", range(100, 100 + 4 * 8)), make_seq("c", range(200, 200 + 4 * 8))
    for seq in (b, c):
        bm.allocate_prefix(seq)
        bm.append(seq, seq.num_tokens)
    assert b.block_ids == list(range(8, 16)) and c.block_ids == list(range(8))
    bm.check_invariants()


def test_duplicate_block_keeps_first_registration():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_seq("a", range(5)), make_seq("b", range(5))
    for seq in (a, b):  # both admitted before either committed: no hits
        assert bm.allocate_prefix(seq) == 0
        bm.append(seq, 5)
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.commit(seq)
    assert a.block_hashes == b.block_hashes
    assert bm.cached_block_id(a.block_hashes[0]) == a.block_ids[0] == 0
    assert b.block_ids[0] == 2 and bm.blocks[2].block_hash is None
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_stats_count_tokens_queried_and_hit():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(bm, make_seq("a", range(10)))
    compute(bm, make_seq("b", range(9)))
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (19, 8)


def test_cancel_prefix_rolls_back_refs_and_stats():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    compute(bm, make_seq("a", range(10)))
    b = make_seq("b", range(9))
    bm.allocate_prefix(b)
    bm.cancel_prefix(b)
    assert b.block_ids == [] and (b.num_computed_tokens, b.num_cached_tokens) == (0, 0)
    assert ref_counts(bm)[:3] == [1, 1, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10, 0)


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    a = make_seq("a", range(10))
    compute(bm, a)
    assert a.block_hashes == [] and all(b.block_hash is None for b in bm.blocks)
    b = make_seq("b", range(10))
    assert bm.allocate_prefix(b) == 0
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 0)


def test_reset_prefix_cache_refused_while_blocks_in_use():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq("a", range(10))
    compute(bm, a)
    assert bm.reset_prefix_cache() is False
    bm.free(a)
    assert bm.reset_prefix_cache() is True
    assert bm.allocate_prefix(make_seq("b", range(10))) == 0
    bm.check_invariants()
