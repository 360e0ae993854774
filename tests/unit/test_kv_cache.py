"""The CPU KV cache: zeroed, and its memory advised for 2 MiB pages (decode reads scattered blocks)."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from cluster.runner.kv_cache import advise_huge_pages, allocate_kv_cache


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                current = lo <= address < hi
            elif current and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(sys.platform != "linux" or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="transparent huge pages are Linux's, where the kernel is built with them")
def test_cpu_cache_is_zeroed_and_its_memory_advised_for_huge_pages():
    arch = SimpleNamespace(num_kv_heads=3, head_dim=64, num_cache_layers=2)
    caches = allocate_kv_cache(arch, num_blocks=200, block_size=32, dtype=torch.float32, tp_size=1, device="cpu")
    assert len(caches) == 2
    for cache in caches:
        assert cache.shape == (2, 3, 200, 32, 64) and cache.dtype == torch.float32
        assert not cache.any()
        middle = cache.data_ptr() + cache.numel() * cache.element_size() // 2
        assert "hg" in _vm_flags(middle)  # MADV_HUGEPAGE took (the kernel backs it as THP allows)


def test_too_small_or_non_cpu_tensors_are_left_alone():
    assert advise_huge_pages(torch.empty(1000)) is False  # no whole 2 MiB page inside
    if torch.cuda.is_available():
        assert advise_huge_pages(torch.empty(1 << 22, device="cuda")) is False
