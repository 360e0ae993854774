"""Turn a SchedulerOutput into the flat tensors one forward pass takes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from cluster.contracts.scheduler_output import ScheduledSequence, SchedulerOutput
from cluster.model.layers.attention import (CPU_PREFILL_SHAPE_QUANTUM, AttentionMetadata, DecodeGroup,
                                            PrefillChunk, TailBatch, VarlenMetadata, prefill_chunk, round_up)
from cluster.model.layers.packed_weight import GEMV_MAX_ROWS

# Row buckets for padded batches: (up to this many rows, round up to a multiple of this).
_ROW_BUCKETS = ((256, 16), (1024, 64), (4096, 128))


def padded_rows(n: int) -> int:
    """The rows a batch of ``n`` is padded to on CPU (bfloat16/float16).

    oneDNN builds (JIT-compiles) a matmul for every new row count: about 5-10 ms for each of a
    layer's four weight shapes, against 1-2 ms to run one (docs/benchmarks.md). Continuous batching
    changes the row count nearly every step, so unpadded steps kept paying it. Rounded up to these
    buckets there are ~40 row counts below 4k rows, built once each. Up to ``GEMV_MAX_ROWS`` the
    native GEMV runs, which has no such cost.
    """
    if n <= GEMV_MAX_ROWS:
        return n
    for limit, step in _ROW_BUCKETS:
        if n <= limit:
            return round_up(n, step)
    return round_up(n, 256)


# Decodes are grouped by context length so padding wastes little gather and attention work:
# a group closes when its longest context would exceed this many times its shortest.
DECODE_GROUP_SPREAD = 1.5
# Prefill chunks of up to this many tokens attend as decode rows through the native decode kernel
# (CPU): a 34-token SmolLM2 prompt's attention, K/V write included, took 260 us a layer with torch's
# flash attention (its fixed costs) and 115 with the kernel (AVX2 EPYC). Past this the chunk's rows
# re-read the context once each, and flash's tiles win.
SMALL_PREFILL_ROWS = 64


@dataclass
class ModelInput:
    """One step's batch, flattened: decode tokens first, then prefill chunks."""

    input_ids: torch.Tensor  # [T], or [padded_rows(T)] with ``pad`` (token 0 at position 0 past T)
    positions: torch.Tensor  # [T] (padded alike)
    meta: AttentionMetadata  # where each token's K/V goes and what it attends to
    logits_indices: torch.Tensor  # [S] rows of the hidden states that need logits (padded alike: the last repeated)
    sample_request_ids: list[str]  # the request each of the S rows belongs to (several rows when verifying drafts)
    tail: TailBatch | None = None  # SwiftKV: the rows that run past the split (the model returns only them)


def build_model_input(out: SchedulerOutput, block_size: int, device: torch.device,
                      decode_kernel=None, swiftkv: bool = False, keep_all: bool = False,
                      varlen: bool = False, pad: bool = False) -> ModelInput:
    """Flatten the step; attention indices are computed once here and shared by every layer.

    With the native decode kernel all decodes form one group (it reads each context at its own
    length); the torch path groups them by length to limit padding. With ``varlen`` (the Triton
    backend) the step is described per sequence instead (``VarlenMetadata``). With ``swiftkv`` the
    batch also carries the tail that runs past the split: every decode, and of each prefill chunk
    the rows it samples (its last token, and each draft it verifies; all its tokens with
    ``keep_all``, for scoring). With ``pad``
    the token rows and the logits rows are padded to ``padded_rows`` buckets (the caller keeps the
    first ``len(sample_request_ids)`` logits).
    """
    # A decode that verifies speculative drafts runs as 1 + d decode rows of one context, each a
    # token longer than the one before (all rows' K/V is written before any attends): the batched
    # decode kernels then serve it, where a prefill chunk's path cost a gathered copy of the context.
    ordered = sorted((s for s in out.sequences if not s.is_prefill), key=lambda s: s.start_position)
    decodes = [row for seq in ordered for row in _decode_rows(seq)]
    prefills = [s for s in out.sequences if s.is_prefill]
    token_ids, positions, slots, logits_rows, sample_ids = [], [], [], [], []
    prefill_starts: list[int] = []
    for seq in decodes + prefills:
        start = len(token_ids)
        token_ids += seq.token_ids
        positions += range(seq.start_position, seq.context_length)
        slots += _slots(seq.block_ids, seq.start_position, seq.context_length, block_size)
        if not seq.is_single_decode:
            prefill_starts.append(start)
        num_rows = seq.num_sample_rows
        logits_rows += range(len(token_ids) - num_rows, len(token_ids))
        sample_ids += [seq.request_id] * num_rows
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    if varlen:
        meta = AttentionMetadata(slot_mapping=slot_mapping, varlen=_varlen(
            [(seq.num_tokens, seq.context_length, seq.block_ids) for seq in decodes + prefills], len(decodes),
            block_size, device))
    else:
        groups = _decode_groups(decodes, block_size, device, spread=None if decode_kernel else DECODE_GROUP_SPREAD)
        chunks = []
        for seq, start in zip(prefills, prefill_starts):
            if decode_kernel is not None and not swiftkv and seq.num_tokens <= SMALL_PREFILL_ROWS:
                groups.append(_decode_group(_chunk_rows(seq), start, block_size, device))
            else:
                chunks.append(_prefill_chunk(seq, start, block_size, device))
        meta = AttentionMetadata(slot_mapping=slot_mapping, decodes=groups, prefills=chunks, decode_kernel=decode_kernel)
    tail = None
    if swiftkv:
        tail, logits_rows = _tail_batch(decodes, prefills, prefill_starts, meta, logits_rows, block_size, device,
                                        keep_all)
    if pad:
        extra = padded_rows(len(token_ids)) - len(token_ids)
        token_ids, positions = token_ids + [0] * extra, list(positions) + [0] * extra
        if logits_rows:
            logits_rows = logits_rows + logits_rows[-1:] * (padded_rows(len(logits_rows)) - len(logits_rows))
    return ModelInput(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
        sample_request_ids=sample_ids,
        tail=tail,
    )


def _tail_batch(decodes, prefills, prefill_starts: list[int], meta: AttentionMetadata, logits_rows: list[int],
                block_size: int, device, keep_all: bool) -> tuple[TailBatch, list[int]]:
    """The rows past the SwiftKV split and their attention (read-only, from the cache); the logits
    rows renumbered into the tail. Decodes keep their place: they are the first rows of both."""
    rows = list(range(len(decodes)))
    kept_chunks = []  # (sequence, its rows kept, where they start in the tail)
    for seq, start in zip(prefills, prefill_starts):
        kept = seq.num_tokens if keep_all else seq.num_sample_rows
        if not kept:
            continue
        end = start + seq.num_tokens
        kept_chunks.append((seq, kept, len(rows)))
        rows += range(end - kept, end)
    where = {row: i for i, row in enumerate(rows)}
    no_slots = meta.slot_mapping[:0]
    if meta.varlen is not None:
        entries = [(1, seq.context_length, seq.block_ids) for seq in decodes]
        entries += [(kept, seq.context_length, seq.block_ids) for seq, kept, _ in kept_chunks]
        tail_meta = AttentionMetadata(slot_mapping=no_slots, varlen=_varlen(entries, len(decodes), block_size, device))
    else:
        tail_chunks = []
        for seq, kept, at in kept_chunks:
            ctx = seq.context_length
            table = torch.tensor(seq.block_ids[: -(-ctx // block_size)], dtype=torch.long, device=device)
            tail_chunks.append(prefill_chunk(at, kept, ctx - kept, table, _quantum(device)))
        tail_meta = AttentionMetadata(slot_mapping=no_slots, decodes=meta.decodes, prefills=tail_chunks,
                                      decode_kernel=meta.decode_kernel)
    return TailBatch(torch.tensor(rows, dtype=torch.long, device=device), tail_meta), [where[r] for r in logits_rows]


def _varlen(entries: list[tuple[int, int, list[int]]], num_decodes: int, block_size: int, device) -> VarlenMetadata:
    """Per sequence (query rows, context length, block ids), decodes first -> the Triton backend's metadata."""
    starts, lens = [0], []
    max_blocks = max((-(-ctx // block_size) for _, ctx, _ in entries), default=1)
    table = torch.zeros(len(entries), max_blocks, dtype=torch.int32)
    for row, (query_len, ctx, block_ids) in enumerate(entries):
        starts.append(starts[-1] + query_len)
        lens.append(ctx)
        n = -(-ctx // block_size)
        table[row, :n] = torch.tensor(block_ids[:n], dtype=torch.int32)
    return VarlenMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32).to(device),
        block_tables=table.to(device),
        num_decodes=num_decodes,
        max_query_len=max((q for q, _, _ in entries[num_decodes:]), default=0),
    )


def _slots(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _quantum(device) -> int:
    return CPU_PREFILL_SHAPE_QUANTUM if torch.device(device).type == "cpu" else 1


def _prefill_chunk(seq: ScheduledSequence, token_start: int, block_size: int, device) -> PrefillChunk:
    table = None
    if seq.start_position:
        table = torch.tensor(seq.block_ids[: -(-seq.context_length // block_size)], dtype=torch.long, device=device)
    return prefill_chunk(token_start, seq.num_tokens, seq.start_position, table, _quantum(device))


def _decode_rows(seq: ScheduledSequence) -> list[ScheduledSequence]:
    """A decode as single-token rows: itself, or with drafts one row per token (row j sees j more)."""
    if not seq.num_draft_tokens:
        return [seq]
    return [replace(seq, token_ids=[token], start_position=seq.start_position + j, needs_sample=True,
                    num_draft_tokens=0) for j, token in enumerate(seq.token_ids)]


def _chunk_rows(seq: ScheduledSequence) -> list[ScheduledSequence]:
    """A short prefill chunk as one decode row per token, row j seeing the context up to its own
    position (the chunk's K/V is written before any row attends): the native decode kernel reads it
    in place, causal by construction. Attention metadata only: sampling keeps the chunk's rows."""
    return [replace(seq, token_ids=[token], start_position=seq.start_position + j, num_draft_tokens=0)
            for j, token in enumerate(seq.token_ids)]


def _decode_groups(decodes: list[ScheduledSequence], block_size: int, device,
                   spread: float | None) -> list[DecodeGroup]:
    """Split length-sorted decodes into groups of similar context length (one group if spread is None)."""
    groups, start = [], 0
    for end in range(1, len(decodes) + 1):
        closes = end == len(decodes) or \
            (spread is not None and decodes[end].context_length > spread * decodes[start].context_length)
        if closes:
            groups.append(_decode_group(decodes[start:end], start, block_size, device))
            start = end
    return groups


def _decode_group(decodes: list[ScheduledSequence], token_start: int, block_size: int, device) -> DecodeGroup:
    """Block tables of every decode's context, padded, and the mask of real keys."""
    max_len = max(s.context_length for s in decodes)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
    for row, seq in enumerate(decodes):
        n = -(-seq.context_length // block_size)
        table[row, :n] = torch.tensor(seq.block_ids[:n], dtype=torch.long)
    mask = None
    padded_len = max_blocks * block_size
    lens = torch.tensor([s.context_length for s in decodes], dtype=torch.long)
    if min(s.context_length for s in decodes) != padded_len:
        mask = (torch.arange(padded_len)[None, :] < lens[:, None]).to(device)
    return DecodeGroup(token_start, len(decodes), table.to(device), max_len, lens.to(device), mask)
