"""Turn a SchedulerOutput into the flat tensors one forward pass takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from cluster.model.layers.attention import AttentionMetadata, PrefillChunk


@dataclass
class ModelInput:
    """One step's batch, flattened: decode tokens first, then prefill chunks."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata  # where each token's K/V goes and what it attends to
    logits_indices: torch.Tensor  # [S] rows of the hidden states that need logits
    sample_request_ids: list[str]  # the S requests those rows belong to, in order


def build_model_input(out: SchedulerOutput, block_size: int, device: torch.device) -> ModelInput:
    """Flatten the step; attention indices are computed once here and shared by every layer."""
    decodes = [s for s in out.sequences if not s.is_prefill]
    prefills = [s for s in out.sequences if s.is_prefill]
    token_ids, positions, slots, logits_rows, sample_ids = [], [], [], [], []
    chunks: list[PrefillChunk] = []
    for seq in decodes + prefills:
        start = len(token_ids)
        token_ids += seq.token_ids
        positions += range(seq.start_position, seq.context_length)
        slots += _slots(seq.block_ids, seq.start_position, seq.context_length, block_size)
        if seq.is_prefill:
            chunks.append(_prefill_chunk(seq, start, block_size, device))
        if seq.needs_sample:
            logits_rows.append(len(token_ids) - 1)
            sample_ids.append(seq.request_id)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=len(decodes), prefills=chunks,
    )
    if decodes:
        meta.decode_slots, meta.decode_mask = _decode_context(decodes, block_size, device)
    return ModelInput(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
        sample_request_ids=sample_ids,
    )


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _context_slots(block_ids: list[int], length: int, block_size: int, device) -> torch.Tensor:
    table = torch.tensor(block_ids, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device)
    return table[pos // block_size] * block_size + pos % block_size


def _prefill_chunk(seq: ScheduledSequence, token_start: int, block_size: int, device) -> PrefillChunk:
    if seq.start_position == 0:
        return PrefillChunk(token_start, seq.num_tokens, 0, None, None)
    ctx = seq.context_length
    query_pos = torch.arange(seq.start_position, ctx, device=device)
    mask = torch.arange(ctx, device=device)[None, :] <= query_pos[:, None]
    return PrefillChunk(token_start, seq.num_tokens, seq.start_position,
                        _context_slots(seq.block_ids, ctx, block_size, device), mask)


def _decode_context(decodes: list[ScheduledSequence], block_size: int, device):
    """Padded cache slots [D, L] of every decode's context and the mask of real keys."""
    max_len = max(s.context_length for s in decodes)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(decodes), max_blocks, dtype=torch.long, device=device)
    for row, seq in enumerate(decodes):
        n = -(-seq.context_length // block_size)
        table[row, :n] = torch.tensor(seq.block_ids[:n], dtype=torch.long)
    pos = torch.arange(max_len, device=device)
    slots = table[:, pos // block_size] * block_size + pos % block_size
    lens = torch.tensor([s.context_length for s in decodes], device=device)
    mask = (pos[None, :] < lens[:, None]).view(len(decodes), 1, 1, max_len)
    return slots, mask
