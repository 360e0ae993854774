"""KV cache storage on one rank: per layer, one K+V tensor holding only this rank's heads."""

from __future__ import annotations

import torch

from cluster.config import CacheConfig
from cluster.errors import InvalidConfigError
from cluster.model.arch import ModelArch


def num_kv_heads_per_rank(arch: ModelArch, tp_size: int) -> int:
    return max(1, arch.num_kv_heads // tp_size)


def block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype, tp_size: int) -> int:
    """Bytes one block takes on one rank, over all KV caches (AcrossKV groups share one), K and V."""
    per_token = 2 * arch.num_cache_layers * num_kv_heads_per_rank(arch, tp_size) * arch.head_dim
    return per_token * block_size * dtype.itemsize


def num_blocks_for(config: CacheConfig, arch: ModelArch, dtype: torch.dtype, tp_size: int) -> int:
    """Blocks that fit the memory budget (or the explicit override)."""
    if config.num_blocks is not None:
        return config.num_blocks
    n = config.kv_cache_memory_bytes // block_bytes(arch, config.block_size, dtype, tp_size)
    if n < 1:
        raise InvalidConfigError(
            "kv_cache_memory_bytes",
            f"{config.kv_cache_memory_bytes} bytes do not hold one block "
            f"({block_bytes(arch, config.block_size, dtype, tp_size)} bytes)",
        )
    return n


def allocate_kv_cache(arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype,
                      tp_size: int, device: torch.device) -> list[torch.Tensor]:
    """One tensor per KV cache (per layer; per group with AcrossKV):
    [2 (K, V), kv_heads_on_this_rank, num_blocks, block_size, head_dim]."""
    shape = (2, num_kv_heads_per_rank(arch, tp_size), num_blocks, block_size, arch.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_cache_layers)]
