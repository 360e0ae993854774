"""The tensor-parallel group a rank belongs to, and its collectives.

Every collective is a no-op at world size 1, so one code path serves a laptop,
CI and a multi-GPU node. The group is passed explicitly to the layers that need
it; there is no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group."""

    tp_rank: int = 0  # this rank, 0 .. tp_size-1; rank 0 samples
    tp_size: int = 1  # ranks in the group
    process_group: Any = None  # torch.distributed ProcessGroup; None at tp_size 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")

    @property
    def is_driver(self) -> bool:
        """The rank that gathers logits and samples."""
        return self.tp_rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        if self.tp_size == 1:
            return x
        torch.distributed.all_reduce(x, group=self.process_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` along the last dim on rank 0 (None elsewhere)."""
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp_size)] if self.is_driver else None
        torch.distributed.gather(x, parts, dst=self._global_rank(0), group=self.process_group)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def _global_rank(self, group_rank: int) -> int:
        return torch.distributed.get_global_rank(self.process_group, group_rank) if self.process_group else group_rank


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division with an error that names both numbers."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator
