"""Vocab-parallel token embedding and LM head: each rank owns a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.layers.packed_weight import PackedWeight
from cluster.distributed.tp_group import TPGroup


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; out-of-slice ids contribute zeros before the all-reduce."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.tp_size)  # ceil: the last rank's slice may be padded
        self.vocab_start = tp.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(source[self.vocab_start:self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to vocabulary logits; the slices are gathered on the sampling rank."""

    _matmul: PackedWeight | None = None

    def finalize_weights(self, kernels=None, gguf_blocks: bool = False) -> None:
        """Called once after loading (and after tying): pack the weight for the CPU matmul library."""
        self._matmul = PackedWeight(self.weight, kernels, gguf_blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Return float32 logits [N, vocab_size] on rank 0, None on other ranks."""
        logits = self._matmul.linear(hidden) if self._matmul is not None else F.linear(hidden, self.weight)
        logits = self.tp.gather_last_dim(logits)
        if logits is None:
            return None
        return logits[..., : self.vocab_size].float()
