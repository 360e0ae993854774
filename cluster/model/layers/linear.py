"""Column- and row-parallel linear layers that take their own slice of a checkpoint.

``weight_loader(param, source, shard_id)`` receives a lazily sliceable source (a
safetensors slice or a tensor) so each rank reads only the rows or columns it owns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.layers.packed_weight import PackedWeight
from cluster.distributed.tp_group import TPGroup, divide


def _copy_rows(param: torch.Tensor, source, start: int, num_rows: int, dst_offset: int = 0) -> None:
    """Copy rows [start, start+num_rows) of ``source`` into ``param[dst_offset:...]``."""
    param.data[dst_offset:dst_offset + num_rows].copy_(source[start:start + num_rows])


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; each rank produces its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.out_per_rank = divide(out_features, tp.tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_per_rank, dtype=dtype), requires_grad=False) if bias else None
        for p in self.parameters():
            p.weight_loader = self.weight_loader
        self._matmul: PackedWeight | None = None

    def finalize_weights(self, kernels=None, gguf_blocks: bool = False) -> None:
        """Called once after loading: pack the weight for the CPU matmul library."""
        self._matmul = PackedWeight(self.weight, kernels, gguf_blocks)

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        n = param.shape[0]
        _copy_rows(param, source, self.tp.tp_rank * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._matmul is None:
            return F.linear(x, self.weight, self.bias)
        return self._matmul.linear(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (gate/up)."""

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """SwiGLU on a [gate | up] projection: silu(gate) * up in one pass where the native float32
        panels take ``x`` (each rank's slice is its own [gate | up]); None elsewhere."""
        if self._matmul is None or self.bias is not None or len(self.out_sizes_per_rank) != 2 or \
                self.out_sizes_per_rank[0] != self.out_sizes_per_rank[1]:
            return None
        return self._matmul.silu_mul(x)

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup, dtype: torch.dtype):
        self.out_sizes_per_rank = [divide(s, tp.tp_size, "output features") for s in out_sizes]
        super().__init__(in_features, sum(out_sizes), bias, tp, dtype)

    def weight_loader(self, param: nn.Parameter, source, shard_id: int = 0) -> None:
        n = self.out_sizes_per_rank[shard_id]
        offset = sum(self.out_sizes_per_rank[:shard_id])
        _copy_rows(param, source, self.tp.tp_rank * n, n, offset)


def kv_heads_on_rank(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(KV heads this rank holds, the first one's index): a split, or one replicated head."""
    if num_kv_heads >= tp.tp_size:
        count = divide(num_kv_heads, tp.tp_size, "key/value heads")
        return count, tp.tp_rank * count
    if tp.tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp.tp_size}) must divide or be a multiple of "
                         f"the key/value head count ({num_kv_heads})")
    return 1, tp.tp_rank // (tp.tp_size // num_kv_heads)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads.

    When tp_size exceeds the KV head count, KV heads are replicated so every rank
    still holds whole heads: rank r uses KV head r // (tp_size / num_kv_heads).
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup, dtype: torch.dtype):
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.tp_size, "attention heads")
        self.num_kv_heads, self.kv_head_start = kv_heads_on_rank(num_kv_heads, tp)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.tp_size
        super().__init__(hidden, out, bias, tp, dtype)

    def weight_loader(self, param: nn.Parameter, source, shard_id: str = "q") -> None:
        d = self.head_dim
        q_rows, kv_rows = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            _copy_rows(param, source, self.tp.tp_rank * q_rows, q_rows)
        else:
            offset = q_rows + (0 if shard_id == "k" else kv_rows)
            _copy_rows(param, source, self.kv_head_start * d, kv_rows, offset)

    @property
    def split_sizes(self) -> list[int]:
        d = self.head_dim
        return [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]


class SwiftKVProjection(ColumnParallelLinear):
    """SwiftKV's K/V projections of every AcrossKV group, fused into one matmul over the same input.

    Output rows per rank: for each group, this rank's K heads then its V heads. Loaded from the
    checkpoint's per-layer ``k_proj_swiftkv`` / ``v_proj_swiftkv`` with shard id (group, "k" | "v").
    """

    def __init__(self, hidden: int, head_dim: int, num_kv_heads: int, num_groups: int, bias: bool,
                 tp: TPGroup, dtype: torch.dtype):
        self.head_dim, self.num_groups = head_dim, num_groups
        self.num_kv_heads, self.kv_head_start = kv_heads_on_rank(num_kv_heads, tp)
        super().__init__(hidden, num_groups * 2 * self.num_kv_heads * head_dim * tp.tp_size, bias, tp, dtype)

    def weight_loader(self, param: nn.Parameter, source, shard_id: tuple[int, str] = (0, "k")) -> None:
        group, which = shard_id
        rows = self.num_kv_heads * self.head_dim
        offset = (2 * group + (0 if which == "k" else 1)) * rows
        _copy_rows(param, source, self.kv_head_start * self.head_dim, rows, offset)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.in_per_rank = divide(in_features, tp.tp_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        for p in self.parameters():
            p.weight_loader = self.weight_loader
        self._matmul: PackedWeight | None = None

    def finalize_weights(self, kernels=None, gguf_blocks: bool = False) -> None:
        """Called once after loading: pack the weight for the CPU matmul library."""
        self._matmul = PackedWeight(self.weight, kernels, gguf_blocks)

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(source[:])
            return
        n = self.in_per_rank
        param.data.copy_(source[:, self.tp.tp_rank * n:(self.tp.tp_rank + 1) * n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul.linear(x) if self._matmul is not None else F.linear(x, self.weight)
        y = self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y
