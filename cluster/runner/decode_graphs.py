"""CUDA graphs for decode-only steps: capture the model's forward once per batch-size bucket, replay.

A decode step on a small model is a few hundred tiny kernel launches; on a GPU the launches, not
the math, bound it. So, as vLLM does, the forward of a decode-only batch is captured once per
bucket size (1, 2, 4, 8, then multiples of 16 up to the largest decode batch) over persistent
input buffers, and each step only fills those buffers and replays the graph of the smallest
bucket that holds its batch. Prefill and mixed steps run eagerly.

Per step the host does one copy: every input (token ids, positions, cache slots, context
lengths, block tables) is written into one pinned int32 staging tensor laid out like the device
buffer, and copied over in one asynchronous H2D transfer. The graphs read views of that buffer.
Rows past the batch are padding: slot -1 (the K/V write skips it), context length 1, and their
outputs are dropped.

Scope, deliberately: the Triton attention backend (the torch path is not capturable), tp = 1
(a TP all-reduce inside a captured graph is possible with NCCL but unproven here: tp > 1 runs
eagerly), and models without SwiftKV (its decode tail is a second batch). ``capture=False`` runs
the same padded, bucketed path eagerly: it is how the padding and buffer logic is tested on a
machine without CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cluster.contracts.scheduler_output import ScheduledSequence
from cluster.model.layers.attention import AttentionMetadata, VarlenMetadata

logger = logging.getLogger(__name__)

PAD_SLOT = -1


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (which is always included)."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


@dataclass
class _Views:
    """The persistent device inputs, as slices of one int32 buffer."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]


def _views(buffer: torch.Tensor, max_batch: int, max_blocks: int) -> _Views:
    b = max_batch
    return _Views(buffer[:b], buffer[b:2 * b], buffer[2 * b:3 * b], buffer[3 * b:4 * b],
                  buffer[4 * b:4 * b + b * max_blocks].view(b, max_blocks))


class DecodeGraphs:
    """Captured (or, with ``capture=False``, eagerly replayed) decode forwards, one per bucket."""

    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_model_len: int, max_batch: int,
                 device: torch.device, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.device = device
        self.capture = capture
        numel = 4 * self.max_batch + self.max_batch * self.max_blocks
        self._host = torch.zeros(numel, dtype=torch.int32, pin_memory=capture)  # staging twin
        self._device = torch.zeros(numel, dtype=torch.int32, device=device)
        self._host_views = _views(self._host, self.max_batch, self.max_blocks)
        self._views = _views(self._device, self.max_batch, self.max_blocks)
        self._query_start = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._pad(0)
        self._device.copy_(self._host)
        if capture:
            self._capture_all()

    # ---- capture -------------------------------------------------------------------------------

    def _meta(self, n: int) -> AttentionMetadata:
        v = self._views
        return AttentionMetadata(slot_mapping=v.slots[:n], varlen=VarlenMetadata(
            query_start_loc=self._query_start[: n + 1], seq_lens=v.seq_lens[:n], block_tables=v.block_tables[:n],
            num_decodes=n, max_query_len=0))

    def _forward(self, n: int) -> torch.Tensor:
        v = self._views
        return self.model(v.input_ids[:n], v.positions[:n], self.kv_caches, self._meta(n))

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n in self.sizes:  # warm-up of every size: Triton compiles (and loads) outside any capture
                self._forward(n)
        torch.cuda.current_stream().wait_stream(stream)
        for n in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[n] = self._forward(n)
            self._graphs[n] = graph
        torch.cuda.synchronize()
        logger.info("captured decode graphs for batch sizes %s", self.sizes)

    # ---- steps ---------------------------------------------------------------------------------

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds ``num_seqs`` decodes, or None (run eagerly)."""
        return next((n for n in self.sizes if n >= num_seqs), None)

    def fits(self, sequences: list[ScheduledSequence]) -> bool:
        return 0 < len(sequences) <= self.max_batch and all(s.is_single_decode for s in sequences)

    def run(self, sequences: list[ScheduledSequence]) -> torch.Tensor:
        """Hidden states [len(sequences), hidden] of one decode-only step (every sequence one token)."""
        num = len(sequences)
        n = self.bucket(num)
        h = self._host_views
        for row, seq in enumerate(sequences):
            position = seq.start_position
            h.input_ids[row] = seq.token_ids[0]
            h.positions[row] = position
            h.slots[row] = seq.block_ids[position // self.block_size] * self.block_size + position % self.block_size
            h.seq_lens[row] = seq.context_length
            blocks = -(-seq.context_length // self.block_size)
            h.block_tables[row, :blocks] = torch.tensor(seq.block_ids[:blocks], dtype=torch.int32)
        self._pad(num)
        self._device.copy_(self._host, non_blocking=self.capture)  # the one H2D copy of the step
        self.num_replays += 1
        if self.capture:
            self._graphs[n].replay()
            return self._outputs[n][:num]
        return self._forward(n)[:num]

    def _pad(self, start: int) -> None:
        """Rows from ``start`` on: harmless padding (no K/V written, one key attended)."""
        h = self._host_views
        h.input_ids[start:] = 0
        h.positions[start:] = 0
        h.slots[start:] = PAD_SLOT
        h.seq_lens[start:] = 1
