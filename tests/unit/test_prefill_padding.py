"""Prefill attention over a cached prefix (two unmasked parts merged by log-sum-exp) with shapes
rounded up (CPU_PREFILL_SHAPE_QUANTUM) equals plain causal attention over the whole context, and
padding never reads what stale cache slots hold."""

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


def _reference(q, cache, start, table, k, v):
    """Causal attention in float64 with an explicit mask: query i (position start + i) sees keys 0..start + i."""
    tokens = q.shape[0]
    if table is None:
        keys, values = k.transpose(0, 1), v.transpose(0, 1)
    else:
        context = cache[:, :, table].reshape(2, HKV, -1, D)[:, :, : start + tokens]
        keys, values = context[0], context[1]
    keys, values = keys.double().repeat_interleave(HQ // HKV, 0), values.double().repeat_interleave(HQ // HKV, 0)
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) * D ** -0.5  # [H, T, S]
    seen = torch.arange(keys.shape[1])[None, :] <= start + torch.arange(tokens)[:, None]
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    return (probs @ values).transpose(0, 1).reshape(tokens, HQ * D)


@pytest.mark.parametrize("quantum", [1, 32])
@pytest.mark.parametrize("start,tokens", [(0, 1), (0, 7), (0, 33), (5, 1), (16, 16), (17, 20), (40, 9), (100, 60),
                                          (300, 1), (31, 33), (32, 32), (64, 5), (63, 65)])
def test_prefill_equals_plain_causal_attention(start, tokens, quantum):
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
    got = _attend(q, k, v, cache.clone(), start, table, quantum)
    assert got.shape == (tokens, HQ * D)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _reference(q, cache, start, table, k, v), rtol=1e-5, atol=1e-5)


def test_bfloat16_prefill_after_a_prefix_is_within_rounding_of_the_reference():
    torch.manual_seed(7)
    start, tokens = 70, 45
    cache = torch.randn(2, HKV, NB, BS, D).bfloat16()
    table = torch.randperm(NB)[: -(-(start + tokens) // BS)]
    q = torch.randn(tokens, HQ, D).bfloat16()
    got = _attend(q, None, None, cache, start, table, 32)
    torch.testing.assert_close(got.double(), _reference(q, cache, start, table, None, None), rtol=2e-2, atol=2e-2)


def test_chunk_shapes_are_multiples_of_the_quantum():
    chunk = prefill_chunk(3, 10, 37, torch.arange(4), 32)
    # every query sees keys 0..31 unmasked; keys 32..46 (5 prefix + 10 own) causally, in a 32-row square
    assert (chunk.padded_tokens, chunk.split, chunk.causal_rows) == (32, 32, 32)
    chunk = prefill_chunk(3, 30, 60, torch.arange(6), 32)
    assert (chunk.padded_tokens, chunk.split, chunk.causal_rows) == (32, 32, 64)
    exact = prefill_chunk(3, 10, 37, torch.arange(4), 1)
    assert (exact.padded_tokens, exact.split, exact.causal_rows) == (10, 37, 10)
    plain = prefill_chunk(3, 10, 0, None, 32)
    assert plain.padded_tokens == 32 and plain.split == 0


@pytest.mark.parametrize("start,tokens", [(0, 1), (0, 34), (5, 12), (40, 64), (17, 65), (0, 200)])
def test_short_chunks_attend_as_decode_rows_through_the_native_kernel(start, tokens):
    """With the native decode kernel, a prefill chunk of up to SMALL_PREFILL_ROWS tokens becomes one
    decode row per token (row j sees the context up to its own position); longer ones stay chunks.
    Either way the result is causal attention over the whole context."""
    from cluster.contracts.scheduler_output import ScheduledSequence, SchedulerOutput
    from cluster.kernels.loader import load
    from cluster.runner.model_input import SMALL_PREFILL_ROWS, build_model_input

    kernel = load()
    if kernel is None:
        pytest.skip("the native CPU kernels did not build here")
    torch.manual_seed(start + tokens)
    ctx = start + tokens
    blocks = torch.randperm(NB)[: -(-ctx // BS)].tolist()
    seq = ScheduledSequence("r", list(range(tokens)), start, blocks, needs_sample=True, is_prefill=True)
    model_input = build_model_input(SchedulerOutput([seq]), BS, torch.device("cpu"), decode_kernel=kernel)
    meta = model_input.meta
    if tokens <= SMALL_PREFILL_ROWS:
        assert not meta.prefills and len(meta.decodes) == 1
        group = meta.decodes[0]
        assert group.token_start == 0 and group.num_seqs == tokens
        assert group.context_lens.tolist() == list(range(start + 1, ctx + 1))
    else:
        assert not meta.decodes and len(meta.prefills) == 1
    assert model_input.logits_indices.tolist() == [tokens - 1]  # sampling still takes the chunk's last row
    cache = torch.randn(2, HKV, NB, BS, D)
    q, k, v = torch.randn(tokens, HQ, D), torch.randn(tokens, HKV, D), torch.randn(tokens, HKV, D)
    got = PagedAttention(HQ, HKV, D)(q, k, v, cache, meta)  # writes the chunk's K/V first, then attends
    table = torch.tensor(blocks)
    torch.testing.assert_close(got.double(), _reference(q, cache, start, table, None, None), rtol=1e-5, atol=1e-5)
