"""The Triton paged-attention kernels (the CUDA backend) against a plain torch reference.

On a machine without CUDA they run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on small shapes: ragged lengths, contexts that end on and just past block
boundaries, prefill chunks after a cached prefix, GQA ratios 1, 3 and 4, head dims 64 and 128.
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.kernels import triton_attention as ta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype) -> torch.Tensor:
    return torch.randn(2, kv_heads, num_blocks, block_size, head_dim, dtype=torch.float32).to(DEVICE, dtype)


def _tables(seq_lens: list[int], block_size: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Each sequence's blocks, scattered over the cache (no two sequences share one), padded with 0."""
    needed = [-(-n // block_size) for n in seq_lens]
    pool = rng.sample(range(num_blocks), sum(needed))
    table = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    for row, n in enumerate(needed):
        table[row, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    return table.to(DEVICE)


def _reference(q, kv_cache, tables, seq_lens, query_lens, scale) -> torch.Tensor:
    """float32: each query row attends to keys 0..its position, read block by block."""
    block_size = kv_cache.shape[3]
    group = q.shape[1] // kv_cache.shape[1]
    out, row = torch.empty(q.shape, dtype=torch.float32, device=q.device), 0
    for s, (n, qn) in enumerate(zip(seq_lens, query_lens)):
        blocks = tables[s, : -(-n // block_size)].long()
        keys = kv_cache[0][:, blocks].reshape(kv_cache.shape[1], -1, kv_cache.shape[4])[:, :n].float()
        values = kv_cache[1][:, blocks].reshape(kv_cache.shape[1], -1, kv_cache.shape[4])[:, :n].float()
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # [Hq, n, D]
        queries = q[row: row + qn].float().transpose(0, 1)  # [Hq, qn, D]
        scores = queries @ keys.transpose(1, 2) * scale
        positions = torch.arange(n - qn, n, device=q.device)
        scores.masked_fill_(torch.arange(n, device=q.device)[None, :] > positions[:, None], float("-inf"))
        out[row: row + qn] = (scores.softmax(-1) @ values).transpose(0, 1)
        row += qn
    return out


def _run(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    kv_cache = _cache(kv_heads, num_blocks, block_size, head_dim, dtype)
    tables = _tables(seq_lens, block_size, num_blocks, rng)
    q = torch.randn(sum(query_lens), heads, head_dim).to(DEVICE, dtype)
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    prefill_lens = query_lens[num_decodes:]
    scale = head_dim ** -0.5
    out = ta.paged_attention(q, kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), starts,
                             num_decodes, max(prefill_lens, default=0), scale)
    return out.float(), _reference(q, kv_cache, tables, seq_lens, query_lens, scale)


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128)])
def test_decode_matches_reference_over_ragged_contexts(dtype, heads, kv_heads, head_dim):
    block_size = 16
    seq_lens = [1, 15, 16, 17, 33, 70]  # one token; just under, on and past a block boundary; several blocks
    out, ref = _run(seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, block_size, dtype)
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128)])
def test_mixed_batch_of_decodes_and_prefills_over_cached_prefixes(dtype, heads, kv_heads, head_dim):
    block_size = 8
    # Two decodes, then prefill chunks: a whole prompt (nothing cached), a chunk after a cached
    # prefix that ends mid-block, one that starts on a block boundary, and a one-token chunk.
    query_lens = [1, 1, 21, 13, 16, 1]
    seq_lens = [9, 40, 21, 13 + 27, 16 + 24, 5]
    out, ref = _run(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=1)
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_prefill_longer_than_a_tile_and_a_key_block():
    # 70 queries over 2 tiles at GQA 3 (64 rows / 4 -> 16 tokens a tile: 5 tiles), keys in blocks of 32.
    out, ref = _run([100, 70], [30, 70], heads=6, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
                    seed=2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_stores_each_token_at_its_slot_and_nowhere_else(dtype):
    kv_heads, num_blocks, block_size, head_dim = 3, 6, 4, 64
    kv_cache = _cache(kv_heads, num_blocks, block_size, head_dim, dtype)
    before = kv_cache.clone()
    slots = torch.tensor([5, 6, 7, 8, 21, 0], device=DEVICE)  # across a block boundary, scattered
    k = torch.randn(len(slots), kv_heads, head_dim).to(DEVICE, dtype)
    v = torch.randn(len(slots), kv_heads, head_dim).to(DEVICE, dtype)
    ta.write_kv(kv_cache, k, v, slots)
    expected = before.clone()
    flat = expected.view(2, kv_heads, -1, head_dim)
    flat[0][:, slots] = k.transpose(0, 1)
    flat[1][:, slots] = v.transpose(0, 1)
    assert torch.equal(kv_cache, expected)


def test_non_contiguous_cache_is_refused():
    kv_cache = _cache(2, 4, 4, 64, torch.float32).transpose(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        ta.write_kv(kv_cache, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.zeros(1, dtype=torch.long))
