"""Prefill attention with shapes rounded up (CPU_PREFILL_SHAPE_QUANTUM) equals the unpadded one,
and padding never reads what stale cache slots hold."""

from __future__ import annotations

import pytest
import torch

from cluster.model.layers.attention import AttentionMetadata, PagedAttention, prefill_chunk

HQ, HKV, D, BS, NB = 6, 2, 16, 16, 24


def _attend(q, k, v, cache, start, table, quantum):
    chunk = prefill_chunk(0, q.shape[0], start, table, quantum)
    slots = torch.arange(q.shape[0]) if table is None else torch.empty(0, dtype=torch.long)
    meta = AttentionMetadata(slot_mapping=slots, prefills=[chunk])
    return PagedAttention(HQ, HKV, D)(q, None if table is not None else k, None if table is not None else v,
                                      cache, meta)


@pytest.mark.parametrize("start,tokens", [(0, 1), (0, 7), (0, 33), (5, 1), (16, 16), (17, 20), (40, 9), (100, 60),
                                          (300, 1), (31, 33)])
def test_padded_prefill_equals_unpadded(start, tokens):
    torch.manual_seed(start * 1000 + tokens)
    cache = torch.randn(2, HKV, NB, BS, D)
    ctx = start + tokens
    table = None
    if start:
        table = torch.randperm(NB)[: -(-ctx // BS)]
        # Stale slots past the context hold NaN: whatever a dead request left must not leak in.
        last, used = table[-1], ctx - (len(table) - 1) * BS
        cache[:, :, last, used:] = float("nan")
    q, k, v = torch.randn(tokens, HQ, D), torch.randn(tokens, HKV, D), torch.randn(tokens, HKV, D)
    exact = _attend(q, k, v, cache.clone(), start, table, 1)
    padded = _attend(q, k, v, cache.clone(), start, table, 32)
    assert padded.shape == exact.shape == (tokens, HQ * D)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)


def test_padded_chunk_shapes_are_multiples_of_the_quantum():
    table = torch.arange(4)
    chunk = prefill_chunk(3, 10, 37, table, 32)
    assert (chunk.padded_tokens, chunk.padded_context) == (32, 64)
    assert chunk.causal_mask.shape == (32, 64)
    # Real query i sees keys 0..37 + i and nothing after.
    assert chunk.causal_mask[0, :38].all() and not chunk.causal_mask[0, 38:].any()
    assert chunk.causal_mask[9, :47].all() and not chunk.causal_mask[9, 47:].any()
    plain = prefill_chunk(3, 10, 0, None, 32)
    assert plain.padded_tokens == 32 and plain.causal_mask is None
