"""The Triton paged-attention kernels (the CUDA backend) against the float32 torch reference
(``cluster.gpu_check.reference_attention``, the one ``make gpu-check`` uses on real shapes).

On a machine without CUDA they run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on small shapes: ragged lengths, contexts that end on and just past block
boundaries, prefill chunks after a cached prefix, GQA ratios 1, 3 and 4, head dims 64 and 128.
"""

from __future__ import annotations

import pytest
import torch

from cluster.gpu_check import attention_case
from cluster.kernels import triton_attention as ta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype) -> torch.Tensor:
    return torch.randn(2, kv_heads, num_blocks, block_size, head_dim, dtype=torch.float32).to(DEVICE, dtype)


def _run(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    return attention_case(seq_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, DEVICE, seed)


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


def test_write_kv_skips_padding_rows():
    kv_cache = _cache(2, 4, 4, 64, torch.float32)
    before = kv_cache.clone()
    slots = torch.tensor([3, -1, -1], dtype=torch.int32, device=DEVICE)  # decode graphs' padding: slot -1
    k, v = torch.randn(3, 2, 64).to(DEVICE), torch.randn(3, 2, 64).to(DEVICE)
    ta.write_kv(kv_cache, k, v, slots)
    expected = before.clone()
    expected.view(2, 2, -1, 64)[0][:, 3] = k[0]
    expected.view(2, 2, -1, 64)[1][:, 3] = v[0]
    assert torch.equal(kv_cache, expected)


def test_non_contiguous_cache_is_refused():
    kv_cache = _cache(2, 4, 4, 64, torch.float32).transpose(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        ta.write_kv(kv_cache, torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.zeros(1, dtype=torch.long))
