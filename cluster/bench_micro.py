"""``llm-cluster bench-micro``: CPU choices the engine makes, measured against the alternative.

1. bfloat16 linear with the weight pre-packed for oneDNN vs plain ``F.linear``, at SmolLM2's
   layer shapes and decode-sized batches.
2. Decode attention over the paged cache: the C++ kernel vs the pure-torch path
   (block gather + two bmm calls), 64 sequences with contexts of 300-900 tokens.
3. SwiGLU's activation in float32: the one-pass ``silu_mul`` kernel vs ``F.silu(gate).mul_(up)``,
   at SmolLM2's width (intermediate 1,536) for decode-sized to prefill-sized batches.
Each figure is the median of several timed repeats.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from cluster.model.layers.attention import PagedAttention, gather_blocks
from cluster.model.layers.packed_weight import PackedWeight

SMOLLM2_LINEAR_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


def _time_us(fn, repeats: int = 7, inner: int = 20) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


def bench_linears() -> None:
    print("bf16 linear, 30 distinct weights per shape (not cache-resident), us per call")
    print(f"{'shape (out, in)':>18s} {'M':>4s} {'F.linear':>10s} {'packed':>10s} {'speed-up':>9s}")
    for out_f, in_f in SMOLLM2_LINEAR_SHAPES:
        count = 30 if out_f < 10000 else 2
        weights = [torch.randn(out_f, in_f, dtype=torch.bfloat16) for _ in range(count)]
        packed = [PackedWeight(w) for w in weights]
        for m in (1, 16, 64):
            x = torch.randn(m, in_f, dtype=torch.bfloat16)
            plain = _time_us(lambda: [F.linear(x, w) for w in weights]) / count
            fast = _time_us(lambda: [p.linear(x) for p in packed]) / count
            print(f"{str((out_f, in_f)):>18s} {m:4d} {plain:10.0f} {fast:10.0f} {plain / fast:8.2f}x")


def bench_decode_attention() -> None:
    from cluster.kernels.loader import load

    kernel = load()
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size, num_blocks, num_seqs = 9, 3, 64, 32, 2000, 64
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=gen).bfloat16()
    lens = torch.sort(torch.randint(300, 900, (num_seqs,), generator=gen)).values
    max_blocks = -(-int(lens.max()) // block_size)
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    q = torch.randn(num_seqs, heads, head_dim, generator=gen).bfloat16()
    mask = torch.arange(max_blocks * block_size)[None, :] < lens[:, None]
    attention = PagedAttention(heads, kv_heads, head_dim)
    torch_us = _time_us(lambda: attention._decode_matmul(q, *gather_blocks(cache, table), mask), inner=5)
    print(f"\ndecode attention, {num_seqs} sequences, contexts 300-900, bf16, us per layer")
    print(f"  torch (gather + bmm): {torch_us:8.0f}")
    if kernel is None:
        print("  C++ kernel: unavailable (build failed)")
        return
    kernel_us = _time_us(lambda: kernel.paged_decode(q, cache, table, lens, attention.scale), inner=5)
    print(f"  C++ paged kernel:     {kernel_us:8.0f}   ({torch_us / kernel_us:.2f}x)")


def bench_silu_mul() -> None:
    from cluster.kernels.loader import load

    kernel = load()
    print("\nSwiGLU activation silu(gate) * up, float32, intermediate 1536, us per layer")
    if kernel is None or not kernel.has_silu_mul():
        print("  silu_mul: unavailable (no AVX2 + FMA, or the build failed)")
        return
    print(f"{'rows':>6s} {'torch':>9s} {'silu_mul':>9s} {'speed-up':>9s}")
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 34, 256, 1024):
        x = torch.randn(rows, 2 * 1536, generator=gen)
        gate, up = x.chunk(2, dim=-1)
        torch_us = _time_us(lambda: F.silu(gate).mul_(up), inner=30)
        kernel_us = _time_us(lambda: kernel.silu_mul(x), inner=30)
        print(f"{rows:6d} {torch_us:9.1f} {kernel_us:9.1f} {torch_us / kernel_us:8.2f}x")


def run_micro(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    bench_linears()
    bench_decode_attention()
    bench_silu_mul()
    return 0
