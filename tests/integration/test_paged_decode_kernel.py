"""The native paged decode kernel against the pure-torch attention path it replaces."""

from __future__ import annotations

import pytest
import torch

from cluster.kernels.paged_decode import load
from cluster.model.layers.attention import DecodeGroup, PagedAttention


@pytest.fixture(scope="module")
def kernel():
    module = load()
    assert module is not None, "the C++ paged decode kernel failed to build (see the warning above)"
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(9, 3, 32), (4, 4, 16), (8, 2, 8)])
def test_kernel_matches_torch_path(kernel, dtype, tol, num_heads, num_kv_heads, block_size):
    gen = torch.Generator().manual_seed(0)
    num_blocks, head_dim, num_seqs = 200, 64, 7
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(sorted(torch.randint(1, 20 * block_size, (num_seqs,), generator=gen).tolist()))
    max_blocks = -(-int(lens.max()) // block_size)
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype)
    mask = torch.arange(max_blocks * block_size)[None, :] < lens[:, None]
    attention = PagedAttention(num_heads, num_kv_heads, head_dim)
    expected = attention._decode_matmul(q, *_gather(cache, table), mask)
    got = kernel.paged_decode(q, cache, table, lens, attention.scale)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def _gather(cache, table):
    from cluster.model.layers.attention import gather_blocks

    return gather_blocks(cache, table)
