"""Attention over whole sequences with no paged cache: the layers' backend for training and reference runs.

The model's layers take their attention as a backend (``cluster/model/llama.py``): paged
(``PagedAttention``) when serving, this one when a batch of equal-length rows runs every token
at once, as SwiftKV distillation does. Tokens are laid out row after row (token ``t`` of row ``b``
at ``b * seq_len + t``), as the paged backend's flattened batch is, so the layers do not notice.
A ``DenseKV`` stands for one cache layer: SwiftKV's projection writes its K/V there and the later
layers read them, as they read the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DenseMetadata:
    batch: int  # rows
    seq_len: int  # tokens per row; each attends causally within its row


@dataclass
class DenseKV:
    """One cache layer's K/V for the whole batch, [batch * seq_len, Hkv, D] each."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class DenseAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    @staticmethod
    def write(kv_cache: DenseKV, k: torch.Tensor, v: torch.Tensor, meta: DenseMetadata) -> None:
        kv_cache.k, kv_cache.v = k, v

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                kv_cache: DenseKV | None, meta: DenseMetadata) -> torch.Tensor:
        """q: [B*T, Hq, D]; k, v: [B*T, Hkv, D], or None to read them from ``kv_cache`` -> [B*T, Hq * D]."""
        if k is None:
            k, v = kv_cache.k, kv_cache.v
        rows, length = meta.batch, meta.seq_len

        def by_head(x: torch.Tensor) -> torch.Tensor:
            return x.view(rows, length, -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(by_head(q), by_head(k), by_head(v), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(rows * length, -1)
