"""RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (replicated on every rank)."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op. It accumulates in float32 for half types too; where transformers scales
        # after rounding to bf16, this rounds once after scaling (at most one bf16 ulp apart).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
