"""The native CPU kernels against the pure-torch paths they replace."""

from __future__ import annotations

import pytest
import torch

from cluster.kernels.loader import load
from cluster.model.layers.attention import PagedAttention


@pytest.fixture(scope="module")
def kernel():
    module = load()
    assert module is not None, "the C++ CPU kernels failed to build (see the warning above)"
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size,head_dim", [
    (9, 3, 32, 64), (4, 4, 16, 64), (8, 2, 8, 64),  # SmolLM2's shape; MHA; small blocks
    (28, 4, 32, 128), (16, 1, 16, 128),  # Qwen2.5-7B's group of 7 at head size 128; MQA
    (6, 2, 32, 48),  # a head size without a specialised loop
])
def test_kernel_matches_torch_path(kernel, dtype, tol, num_heads, num_kv_heads, block_size, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_seqs = 200, 7
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


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_matches_torch(kernel, with_residual):
    from cluster.model.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 576, generator=gen).bfloat16()
    residual = torch.randn(37, 576, generator=gen).bfloat16()
    norm = RMSNorm(576, 1e-5, torch.bfloat16)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(576, generator=gen))
    expected_residual = residual + x
    expected = torch.nn.functional.rms_norm(expected_residual if with_residual else x, (576,), norm.weight, 1e-5)
    norm.finalize_weights(kernel)
    got_residual = residual.clone()
    got = norm(x, got_residual) if with_residual else norm(x)
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    if with_residual:
        assert torch.equal(got_residual, expected_residual), "the residual stream must hold residual + x"
