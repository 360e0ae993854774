"""The native CPU kernels against the pure-torch paths they replace."""

from __future__ import annotations

import sys

import pytest
import torch

from cluster.kernels.loader import load
from cluster.model.layers.attention import PagedAttention


@pytest.fixture(scope="module")
def kernel():
    module = load()
    assert module is not None, "the C++ CPU kernels failed to build (see the warning above)"
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("num_heads,num_kv_heads,block_size,head_dim", [
    (9, 3, 32, 64), (4, 4, 16, 64), (8, 2, 8, 64),  # SmolLM2's shape; MHA; small blocks
    (28, 4, 32, 128), (16, 1, 16, 128),  # Qwen2.5-7B's group of 7 at head size 128; MQA
    (6, 2, 32, 48),  # a head size without a specialised loop
])
def test_kernel_matches_torch_path(kernel, dtype, tol, num_heads, num_kv_heads, block_size, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_seqs = 200, 7
    cache = torch.randn(2, num_kv_heads, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(sorted(torch.randint(1, 20 * block_size, (num_seqs,), generator=gen).tolist()))
    max_blocks = -(-int(lens.max()) // block_size)
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype)
    mask = torch.arange(max_blocks * block_size)[None, :] < lens[:, None]
    attention = PagedAttention(num_heads, num_kv_heads, head_dim)
    expected = attention._decode_matmul(q, *_gather(cache, table), mask)
    got = kernel.paged_decode(q, cache, table, lens, attention.scale)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_long_contexts_across_windows_match_torch(kernel, dtype, tol, block_size):
    """Contexts of 1 to 1,700 tokens (the AMX kernel scores 512-token windows, 16 tokens a tile,
    the last window and slice partial), blocks scattered over the cache."""
    gen = torch.Generator().manual_seed(11)
    num_blocks = 600
    lens = torch.tensor([1, 15, 16, 17, 511, 512, 513, 1030, 1700])
    max_blocks = -(-int(lens.max()) // block_size)
    cache = torch.randn(2, 3, num_blocks, block_size, 64, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in lens])
    q = torch.randn(len(lens), 9, 64, generator=gen).to(dtype)
    mask = torch.arange(max_blocks * block_size)[None, :] < lens[:, None]
    attention = PagedAttention(9, 3, 64)
    expected = attention._decode_matmul(q, *_gather(cache, table), mask)
    torch.testing.assert_close(kernel.paged_decode(q, cache, table, lens, attention.scale).float(), expected.float(),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_rows_past_the_context_never_reach_the_output(kernel, dtype, head_dim):
    """A block's rows past its sequence's context hold whatever an earlier owner left, NaN included:
    the output is the same as with those rows zero (the AMX kernel loads V's rows as they lie, 16 at a
    time, so a partial last slice must not multiply them in)."""
    gen = torch.Generator().manual_seed(5)
    block_size, num_blocks = 32, 128
    lens = torch.tensor([1, 7, 17, 33, 100, 527])
    max_blocks = -(-int(lens.max()) // block_size)
    cache = torch.randn(2, 3, num_blocks, block_size, head_dim, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    clean = cache.clone()
    for s, n in enumerate(lens.tolist()):
        for t in range(n, max_blocks * block_size):
            cache[:, :, table[s, t // block_size], t % block_size] = float("nan")
            clean[:, :, table[s, t // block_size], t % block_size] = 0.0
    q = torch.randn(len(lens), 9, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    got = kernel.paged_decode(q, cache, table, lens, scale)
    assert not got.isnan().any()
    torch.testing.assert_close(got, kernel.paged_decode(q, clean, table, lens, scale), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_schedule_longest_first_changes_no_output(kernel, dtype):
    """Threads take (sequence, KV head) pairs longest context first, whichever is free: every pair
    is computed exactly once and a pair's result does not depend on the thread or the order, so the
    output is bit-identical to one thread's, and each row equals that sequence decoded alone."""
    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, num_seqs = 400, 32, 23
    cache = torch.randn(2, 3, num_blocks, block_size, 64, generator=gen).to(dtype)
    lens = torch.randint(1, 12 * block_size, (num_seqs,), generator=gen)  # unsorted, 1 to 383 tokens
    lens[[3, 17]] = torch.tensor([12 * block_size, 1])
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * 12].view(num_seqs, 12).contiguous()
    q = torch.randn(num_seqs, 9, 64, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernel.paged_decode(q, cache, table, lens, 0.125)
        torch.set_num_threads(max(2, threads))
        together = kernel.paged_decode(q, cache, table, lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)
    for s in (3, 17, 8):
        row = kernel.paged_decode(q[s:s + 1].contiguous(), cache, table[s:s + 1].contiguous(), lens[s:s + 1], 0.125)
        assert torch.equal(row[0], together[s])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_query_rows_in_place_from_the_qkv_projection(kernel, dtype):
    """A decode step's q is a view of the QKV output (rows 15 heads apart): read where it lies,
    bit-identical to a contiguous copy; a q whose heads are not contiguous is refused, not misread."""
    gen = torch.Generator().manual_seed(9)
    cache = torch.randn(2, 3, 64, 16, 64, generator=gen).to(dtype)
    lens = torch.tensor([5, 100, 33])
    table = torch.randperm(64, generator=gen)[:21].view(3, 7)
    qkv = torch.randn(3, 15, 64, generator=gen).to(dtype)
    q = qkv[:, :9]
    assert not q.is_contiguous()
    assert torch.equal(kernel.paged_decode(q, cache, table, lens, 0.125),
                       kernel.paged_decode(q.contiguous(), cache, table, lens, 0.125))
    with pytest.raises(RuntimeError, match="heads contiguous"):
        kernel.paged_decode(qkv.transpose(0, 1)[:, :3], cache, table, lens, 0.125)


@pytest.mark.parametrize("model_dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),  # kv_cache_dtype: rounded once
])
def test_native_kv_write_equals_torchs(kernel, model_dtype, cache_dtype):
    from cluster.model.layers.attention import write_kv

    gen = torch.Generator().manual_seed(9)
    expected = torch.randn(2, 3, 50, 16, 64, generator=gen).to(cache_dtype)
    got = expected.clone()
    qkv = torch.randn(40, 15, 64, generator=gen).to(model_dtype)  # K and V as the views attention gets
    k, v = qkv[:, 9:12], qkv[:, 12:15]
    slots = torch.randperm(50 * 16, generator=gen)[:37]  # 3 rows past the slots: bucket padding
    write_kv(expected, k, v, slots)
    write_kv(got, k, v, slots, kernel)
    assert torch.equal(got, expected)


def test_native_kv_write_refuses_a_slot_past_the_cache_and_writes_nothing(kernel):
    cache = torch.zeros(2, 3, 4, 16, 64)
    k = v = torch.ones(3, 3, 64)
    with pytest.raises(RuntimeError, match="slot 64 is past the cache's 64 slots"):
        kernel.write_kv(cache, k, v, torch.tensor([0, 5, 64]))
    assert not cache.any()
    kernel.write_kv(cache, k, v, torch.tensor([-1, 5, 63]))  # negative: a padding row, skipped
    written = cache.view(2, 3, 64, 64).abs().sum(dim=(0, 1, 3)).nonzero().flatten().tolist()
    assert written == [5, 63]



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: widened span by span
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (1, 49152), (33, 49152), (5, 8192 * 2 + 33), (2, 100)])
def test_native_argmax_equals_torchs(kernel, rows, vocab, dtype):
    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    logits = torch.randn(rows, vocab, generator=gen).to(dtype)
    assert torch.equal(kernel.argmax_rows(logits), logits.float().argmax(dim=-1))
    # ties: rounded logits repeat their maximum; the first index wins, as in torch
    coarse = (logits * 2).round()
    assert torch.equal(kernel.argmax_rows(coarse), coarse.float().argmax(dim=-1))
    # every span after the first holds the same maximum (the spans merge in order)
    flat = torch.zeros(rows, vocab, dtype=dtype)
    assert torch.equal(kernel.argmax_rows(flat), torch.zeros(rows, dtype=torch.long))
    flat[:, -1] = float("inf")
    assert torch.equal(kernel.argmax_rows(flat), flat.float().argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_argmax_treats_inf_and_nan_as_torch_does(kernel, dtype):
    logits = torch.full((6, 20000), float("-inf"), dtype=dtype)  # all masked: index 0
    logits[1, 12345] = float("inf")
    logits[2, 5] = logits[2, 17000] = float("nan")  # the first NaN wins, across spans too
    logits[3, 19999] = float("nan")  # in the scalar tail
    logits[4, 3] = 1.0
    logits[4, 9000] = float("nan")  # a NaN in a later span than the maximum
    logits[5, 40] = float("nan")  # in the vector part, after a finite maximum
    logits[5, 7] = 2.0
    assert torch.equal(kernel.argmax_rows(logits), logits.float().argmax(dim=-1))
    assert kernel.argmax_rows(logits).tolist() == [0, 12345, 5, 19999, 9000, 40]


def test_native_argmax_reads_strided_rows_and_refuses_what_it_cannot(kernel):
    wide = torch.randn(4, 300)
    view = wide[:, :250]  # rows 300 apart
    assert torch.equal(kernel.argmax_rows(view), view.argmax(dim=-1))
    assert kernel.argmax_rows(torch.empty(0, 10)).shape == (0,)
    half = torch.randn(4, 300).to(torch.bfloat16)[:, :250]
    assert torch.equal(kernel.argmax_rows(half), half.float().argmax(dim=-1))
    for bad in (wide.t(), wide.double(), wide.half(), wide[0], torch.empty(2, 0)):
        with pytest.raises(RuntimeError, match="argmax_rows"):
            kernel.argmax_rows(bad)


def test_greedy_sampler_takes_the_native_argmax_on_cpu_float32(kernel, monkeypatch):
    from cluster.sampling.sampler import Sampler, SamplingRequest, make_generator
    from cluster.sampling_params import SamplingParams

    calls = []

    class Spy:
        def argmax_rows(self, logits):
            calls.append((*logits.shape, logits.dtype))
            return kernel.argmax_rows(logits)

    greedy = SamplingRequest(SamplingParams(temperature=0.0, max_tokens=4), make_generator(0), [1], [], frozenset())
    logits = torch.randn(3, 500)
    sampler = Sampler(Spy())
    assert [t for t, _ in sampler(logits, [greedy] * 3)] == logits.argmax(dim=-1).tolist()
    assert calls == [(3, 500, torch.float32)]
    assert [t for t, _ in sampler(logits.bfloat16(), [greedy] * 3)] == logits.bfloat16().float().argmax(-1).tolist()
    assert calls[-1] == (3, 500, torch.bfloat16)  # bfloat16 logits as they are: no float32 copy first
    # logprobs widen their own rows: the same values as from a float32 copy of the whole batch
    with_logprobs = SamplingRequest(SamplingParams(temperature=0.0, max_tokens=4, logprobs=2), make_generator(0),
                                    [1], [], frozenset())
    half = logits.bfloat16()
    got = sampler(half, [greedy, with_logprobs, greedy])
    assert [t for t, _ in got] == half.float().argmax(-1).tolist() and got[0][1] is None
    assert repr(got[1][1]) == repr(Sampler()(half.float(), [greedy, with_logprobs, greedy])[1][1])
    groups = sampler.sample_groups(logits, [greedy, greedy], [[int(logits[0].argmax())], []])
    assert [tokens for tokens, _ in groups] == [logits[:2].argmax(-1).tolist(), [int(logits[2].argmax())]]
    assert calls[-1] == (3, 500, torch.float32)

def _gather(cache, table):
    from cluster.model.layers.attention import gather_blocks

    return gather_blocks(cache, table)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_rms_norm_matches_torch(kernel, with_residual, dtype, tol):
    from cluster.model.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 576, generator=gen).to(dtype)
    residual = torch.randn(37, 576, generator=gen).to(dtype)
    norm = RMSNorm(576, 1e-5, dtype)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(576, generator=gen))
    expected_residual = residual + x
    expected = torch.nn.functional.rms_norm(expected_residual if with_residual else x, (576,), norm.weight, 1e-5)
    norm.finalize_weights(kernel)
    got_residual = residual.clone()
    got = norm(x, got_residual) if with_residual else norm(x)
    assert norm._kernels is kernel
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    if with_residual:
        assert torch.equal(got_residual, expected_residual), "the residual stream must hold residual + x"


def _has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 960, 576), (2, 3072, 576), (3, 576, 1536), (4, 49152, 576),  # SmolLM2's linears, 1-4 decode rows
    (1, 3, 576), (4, 7, 40),  # fewer outputs than one group of four; an input size off the 32-wide loop
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_is_the_float32_product_rounded_once(kernel, rows, out_features, in_features, with_bias):
    if not kernel.has_gemv_bf16():
        assert not _has_avx512_bf16(), "built without AVX512-BF16 on a CPU that has it"
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16() if with_bias else None
    got = kernel.gemv_bf16(x, w, b)
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    # float32 sums in another order, then one rounding: within one bf16 step (2^-8 relative) of exact.
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4 * in_features ** 0.5).all()


def test_packed_linear_takes_the_gemv_for_decode_rows_and_onednn_above(kernel):
    from cluster.model.layers.packed_weight import GEMV_MAX_ROWS, PackedWeight

    if not kernel.has_gemv_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(960, 576, generator=gen).bfloat16()
    packed = PackedWeight(weight, kernel)
    packed.amx = None  # the AMX path has its own test below
    calls = []
    packed.gemv = lambda x, w, b: calls.append(x.shape[0]) or kernel.gemv_bf16(x, w, b)
    for rows in (0, 1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 64):  # 0: a step whose chunk needs no logits
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        torch.testing.assert_close(packed.linear(x).float(), (x.float() @ weight.float().T), atol=0.1, rtol=2e-2)
    assert calls == [1, GEMV_MAX_ROWS]
    assert kernel.gemv_bf16(torch.empty(0, 576).bfloat16(), weight, None).shape == (0, 960)
    assert PackedWeight(weight.float(), kernel).gemv is None  # float32 never takes the bfloat16 GEMV


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 48, 64])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (576, 1536), (48, 64)])
def test_amx_gemm_is_the_product_to_bfloat16_accuracy(kernel, rows, out_features, in_features):
    _skip_without_amx(kernel)
    gen = torch.Generator().manual_seed(rows * 7 + out_features)
    w = (torch.randn(out_features, in_features, generator=gen) * 0.1).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16()
    packed = kernel.pack_amx_bf16(w)
    x = torch.randn(2 * rows, in_features, generator=gen).bfloat16()[::2]  # rows further apart than K
    for bias in (None, b):
        got = kernel.gemm_amx_bf16(x, packed, bias)
        exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
        assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-4 * in_features ** 0.5).all()
    assert kernel.gemm_amx_bf16(x[:0], packed, None).shape == (0, out_features)


def test_amx_gemm_rejects_what_it_cannot_take(kernel):
    _skip_without_amx(kernel)
    w = torch.randn(48, 64).bfloat16()
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.pack_amx_bf16(torch.randn(40, 64).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.pack_amx_bf16(w.float())
    packed = kernel.pack_amx_bf16(w)
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        kernel.gemm_amx_bf16(torch.randn(65, 64).bfloat16(), packed, None)
    with pytest.raises(RuntimeError, match="K = 32"):
        kernel.gemm_amx_bf16(torch.randn(2, 32).bfloat16(), packed, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel.gemm_amx_bf16(torch.randn(2, 64).bfloat16(), packed, torch.randn(47).bfloat16())


def test_packed_linear_takes_the_amx_gemm_up_to_64_rows_and_onednn_above(kernel):
    from cluster.model.layers.packed_weight import AMX_GEMM_MAX_ROWS, PackedWeight

    _skip_without_amx(kernel)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(960, 576, generator=gen).bfloat16()
    packed = PackedWeight(weight, kernel)
    assert packed.amx is not None and PackedWeight(torch.randn(40, 64).bfloat16(), kernel).amx is None  # 40 % 16
    calls = []
    packed.amx_gemm = lambda x, w, b: calls.append(x.shape[0]) or kernel.gemm_amx_bf16(x, w, b)
    for rows in (0, 1, 33, AMX_GEMM_MAX_ROWS, AMX_GEMM_MAX_ROWS + 1):
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        torch.testing.assert_close(packed.linear(x).float(), (x.float() @ weight.float().T), atol=0.1, rtol=2e-2)
    assert calls == [1, 33, AMX_GEMM_MAX_ROWS]


def _has_avx2_fma() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return " avx2" in flags and " fma" in flags


@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 960, 576), (2, 3072, 576), (3, 576, 1536), (4, 49152, 576),  # SmolLM2's linears at decode rows
    (5, 576, 1536), (33, 3072, 576), (48, 960, 576),  # batches: four rows at a time, then the rest
    (1, 3, 576), (7, 13, 43), (6, 25, 8),  # fewer outputs than a block; inputs off the 8-wide loop
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_f32_is_the_product_to_float32_accuracy(kernel, rows, out_features, in_features, with_bias):
    if not kernel.has_gemv_f32():
        assert not _has_avx2_fma(), "built without AVX2/FMA on a CPU that has them"
        pytest.skip("this CPU has no AVX2/FMA")
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    got = kernel.gemv_f32(x, w, b)
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # float32 sums of in_features products: error grows like sqrt(K) ulps of the terms' size.
    assert ((got.double() - exact).abs() <= 1e-6 * in_features ** 0.5 * (1 + exact.abs())).all()
    # A row's result does not depend on the rows beside it (batch-invariant): row 0 alone, the same bits.
    assert torch.equal(kernel.gemv_f32(x[:1], w, b)[0], got[0])


@pytest.mark.parametrize("rows, out_features, in_features", [
    (34, 960, 576), (33, 3072, 576), (6, 576, 1536), (34, 49152, 576),  # SmolLM2: a short prompt, decode rows
    (1, 3, 576), (5, 16, 1), (7, 17, 43), (13, 33, 8), (40, 47, 100),  # a part panel; tiles of 1-6 rows
    (1030, 64, 64),  # a prefill chunk's worth of rows
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_f32_over_packed_panels_is_the_product_to_float32_accuracy(kernel, rows, out_features, in_features,
                                                                        with_bias):
    if not kernel.has_gemm_f32():
        assert not _has_avx2_fma(), "built without AVX2/FMA on a CPU that has them"
        pytest.skip("this CPU has no AVX2/FMA")
    gen = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    panels = kernel.pack_f32(w)
    count = -(-out_features // 16)
    assert panels.shape == (count, in_features, 16)
    # Panel p, row k: W[16p .. 16p + 15, k], zeros past the last output.
    padded = torch.cat([w, torch.zeros(count * 16 - out_features, in_features)])
    assert torch.equal(panels, padded.view(count, 16, in_features).transpose(1, 2))
    got = kernel.gemm_f32(x, panels, out_features, b)
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    # One float32 FMA chain down k: the error grows like k ulps of the terms' size at worst.
    assert ((got.double() - exact).abs() <= 1e-6 * in_features * (1 + exact.abs())).all()
    # A row's result does not depend on the rows beside it or the tile it falls in: the same bits
    # alone, and as the last row of another batch.
    assert torch.equal(kernel.gemm_f32(x[:1], panels, out_features, b)[0], got[0])
    assert torch.equal(kernel.gemm_f32(x[-3:], panels, out_features, b)[-1], got[-1])


def _causal_reference(q, k, v, q_offset, scale):
    """float64 attention: query i sees keys [0, q_offset + i]; grouped query heads share KV heads."""
    tokens, heads, _ = q.shape
    group = heads // k.shape[1]
    keys = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    values = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [Hq, T, S]
    seen = torch.arange(k.shape[0])[None, :] <= (q_offset + torch.arange(tokens))[:, None]
    scores = scores.masked_fill(~seen, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values).transpose(0, 1)


@pytest.mark.parametrize("tokens, q_offset, heads, kv_heads, head_dim", [
    (34, 0, 9, 3, 64), (300, 0, 9, 3, 64), (97, 211, 9, 3, 64),  # SmolLM2: a prompt; a chunk after a prefix
    (1, 0, 9, 3, 64), (5, 40, 9, 3, 64),  # one row; a tile short of rows
    (23, 9, 28, 4, 128), (40, 0, 16, 1, 128), (18, 3, 4, 4, 64),  # Qwen's group of 7; MQA; MHA
])
def test_prefill_attention_is_causal_attention_to_float32_accuracy(kernel, tokens, q_offset, heads, kv_heads, head_dim):
    if not kernel.has_prefill_attention():
        assert not _has_avx2_fma(), "built without AVX2/FMA on a CPU that has them"
        pytest.skip("this CPU has no AVX2/FMA")
    gen = torch.Generator().manual_seed(tokens * 1000 + q_offset)
    context = q_offset + tokens
    # As the layer hands them over: q, k and v strided views of one projection's rows.
    qkv = torch.randn(context, heads + 2 * kv_heads, head_dim, generator=gen) * 2
    q = qkv[q_offset:, :heads]
    k, v = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    scale = head_dim ** -0.5
    got = kernel.prefill_attention(q, k, v, q_offset, scale)
    assert got.shape == (tokens, heads, head_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _causal_reference(q, k, v, q_offset, scale), atol=2e-5, rtol=1e-4)
    # A row does not depend on the rows after it (the last rows' keys are masked, never mixed in).
    torch.testing.assert_close(kernel.prefill_attention(q[:1], k[:q_offset + 1], v[:q_offset + 1], q_offset, scale),
                               got[:1], atol=1e-6, rtol=1e-5)


def test_prefill_attention_rejects_mismatched_inputs(kernel):
    if not kernel.has_prefill_attention():
        pytest.skip("this CPU has no AVX2/FMA")
    q, k = torch.randn(4, 9, 64), torch.randn(10, 3, 64)
    with pytest.raises(RuntimeError, match="context"):
        kernel.prefill_attention(q, k, k, 7, 0.125)  # 7 + 4 keys needed, 10 there
    with pytest.raises(RuntimeError, match="multiple"):
        kernel.prefill_attention(torch.randn(4, 8, 64), k, k, 0, 0.125)
    with pytest.raises(RuntimeError, match="head size"):
        kernel.prefill_attention(torch.randn(4, 9, 48), torch.randn(10, 3, 48), torch.randn(10, 3, 48), 0, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.prefill_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), 0, 0.125)
    with pytest.raises(RuntimeError, match="k and v"):
        kernel.prefill_attention(q, k, k[:9], 0, 0.125)
    assert kernel.prefill_attention(q[:0], k, k, 0, 0.125).shape == (0, 9, 64)


@pytest.mark.parametrize("prefix", [0, 70])  # the chunk's own K/V; after a cached prefix
def test_float32_prefill_chunks_take_the_native_kernel_and_match_the_torch_path(kernel, prefix):
    from cluster.model.layers.attention import AttentionMetadata, prefill_chunk, write_kv

    if not kernel.has_prefill_attention():
        pytest.skip("this CPU has no AVX2/FMA")
    calls = []

    class Spy:  # the kernels module, its prefill attention counted
        def __getattr__(self, name):
            return getattr(kernel, name)

        def prefill_attention(self, *args):
            calls.append(args[0].shape[0])
            return kernel.prefill_attention(*args)

    gen = torch.Generator().manual_seed(prefix)
    block_size, tokens = 32, 100
    cache = torch.zeros(2, 3, 40, block_size, 64)
    table = torch.randperm(40, generator=gen)[: -(-(prefix + tokens) // block_size)]
    slots = torch.tensor([int(table[i // block_size]) * block_size + i % block_size for i in range(prefix + tokens)])
    k, v = torch.randn(prefix + tokens, 3, 64, generator=gen), torch.randn(prefix + tokens, 3, 64, generator=gen)
    write_kv(cache, k[:prefix], v[:prefix], slots[:prefix])  # the cached prefix
    q = torch.randn(tokens, 9, 64, generator=gen)
    attention = PagedAttention(9, 3, 64)
    outs = []
    for native in (Spy(), None):
        meta = AttentionMetadata(slot_mapping=slots[prefix:], decode_kernel=native,
                                 prefills=[prefill_chunk(0, tokens, prefix, table if prefix else None)])
        outs.append(attention(q, k[prefix:], v[prefix:], cache.clone(), meta))
    assert calls == [tokens]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)


def _has_amx_bf16() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return " amx_bf16" in flags and " avx512_bf16" in flags


def _skip_without_amx(kernel) -> None:
    if not kernel.has_prefill_attention_amx():
        assert not (_has_amx_bf16() and sys.platform == "linux"), "AMX-BF16 here, yet the kernel is not usable"
        pytest.skip("this CPU has no AMX-BF16")


@pytest.mark.parametrize("tokens, q_offset, heads, kv_heads, head_dim", [
    (34, 0, 9, 3, 64), (1024, 0, 9, 3, 64), (97, 211, 9, 3, 64), (300, 1400, 9, 3, 64),  # SmolLM2
    (1, 0, 9, 3, 64), (5, 40, 9, 3, 64), (129, 0, 9, 3, 64),  # one row; a tile short; a window and a key
    (23, 9, 28, 4, 128), (40, 0, 16, 1, 128), (18, 3, 4, 4, 64),  # Qwen's group of 7; MQA; MHA
])
def test_amx_prefill_attention_is_causal_attention_to_bfloat16_accuracy(kernel, tokens, q_offset, heads, kv_heads,
                                                                        head_dim):
    _skip_without_amx(kernel)
    gen = torch.Generator().manual_seed(tokens * 1000 + q_offset)
    context = q_offset + tokens
    # As the layer hands them over: q, k and v strided views of one projection's rows.
    qkv = (torch.randn(context, heads + 2 * kv_heads, head_dim, generator=gen) * 2).bfloat16()
    q = qkv[q_offset:, :heads]
    k, v = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    scale = head_dim ** -0.5
    got = kernel.prefill_attention_amx(q, k, v, q_offset, scale)
    assert got.shape == (tokens, heads, head_dim) and got.dtype == torch.bfloat16
    expected = _causal_reference(q, k, v, q_offset, scale)
    # the output rounded once to bfloat16 (2^-8 relative), the probabilities once (as torch's flash
    # attention rounds them): within a few bfloat16 steps of the exact result
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=1.6e-2)
    assert (got.double() - expected).abs().mean() < 2e-3
    # A row does not depend on the rows after it (the last rows' keys are masked, never mixed in).
    torch.testing.assert_close(kernel.prefill_attention_amx(q[:1], k[:q_offset + 1], v[:q_offset + 1], q_offset,
                                                            scale), got[:1], atol=0, rtol=0)


def test_amx_prefill_attention_rescales_when_a_late_window_holds_the_largest_scores(kernel):
    """The accumulator is rescaled only in windows where a lane's maximum grows: keys far past the
    first windows that score well above every earlier one (the queries' maxima jump at window 5)
    must still weigh in exactly; the test fails with the rescale left out."""
    _skip_without_amx(kernel)
    gen = torch.Generator().manual_seed(5)
    tokens, heads, kv_heads = 200, 9, 3
    context = 900
    q = torch.randn(tokens, heads, 64, generator=gen).bfloat16()
    k = torch.randn(context, kv_heads, 64, generator=gen)
    k[650:660] = q[:10, ::3].float().mean(0) * 4  # keys aligned with the queries: large scores late
    k, v = k.bfloat16(), torch.randn(context, kv_heads, 64, generator=gen).bfloat16()
    scale = 64 ** -0.5
    got = kernel.prefill_attention_amx(q, k, v, context - tokens, scale)
    expected = _causal_reference(q, k, v, context - tokens, scale)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=1.6e-2)


def test_amx_prefill_attention_rejects_mismatched_inputs(kernel):
    _skip_without_amx(kernel)
    q, k = torch.randn(4, 9, 64).bfloat16(), torch.randn(10, 3, 64).bfloat16()
    with pytest.raises(RuntimeError, match="context"):
        kernel.prefill_attention_amx(q, k, k, 7, 0.125)
    with pytest.raises(RuntimeError, match="multiple"):
        kernel.prefill_attention_amx(torch.randn(4, 8, 64).bfloat16(), k, k, 0, 0.125)
    with pytest.raises(RuntimeError, match="head size"):
        kernel.prefill_attention_amx(*(torch.randn(n, h, 48).bfloat16() for n, h in ((4, 9), (10, 3), (10, 3))), 0, 0.125)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.prefill_attention_amx(q.float(), k.float(), k.float(), 0, 0.125)
    with pytest.raises(RuntimeError, match="k and v"):
        kernel.prefill_attention_amx(q, k, k[:9], 0, 0.125)
    assert kernel.prefill_attention_amx(q[:0], k, k, 0, 0.125).shape == (0, 9, 64)


@pytest.mark.parametrize("prefix", [0, 70])  # the chunk's own K/V; after a cached prefix
def test_bfloat16_prefill_chunks_take_the_amx_kernel_and_match_the_torch_path(kernel, prefix):
    from cluster.model.layers.attention import AttentionMetadata, prefill_chunk, write_kv

    _skip_without_amx(kernel)
    calls = []

    class Spy:  # the kernels module, its AMX prefill attention counted
        def __getattr__(self, name):
            return getattr(kernel, name)

        def prefill_attention_amx(self, *args):
            calls.append(args[0].shape[0])
            return kernel.prefill_attention_amx(*args)

    gen = torch.Generator().manual_seed(prefix)
    block_size, tokens = 32, 100
    cache = torch.zeros(2, 3, 40, block_size, 64, dtype=torch.bfloat16)
    table = torch.randperm(40, generator=gen)[: -(-(prefix + tokens) // block_size)]
    slots = torch.tensor([int(table[i // block_size]) * block_size + i % block_size for i in range(prefix + tokens)])
    k, v = (torch.randn(prefix + tokens, 3, 64, generator=gen).bfloat16() for _ in range(2))
    write_kv(cache, k[:prefix], v[:prefix], slots[:prefix])  # the cached prefix
    q = torch.randn(tokens, 9, 64, generator=gen).bfloat16()
    attention = PagedAttention(9, 3, 64)
    outs = []
    for native in (Spy(), None):
        meta = AttentionMetadata(slot_mapping=slots[prefix:], decode_kernel=native,
                                 prefills=[prefill_chunk(0, tokens, prefix, table if prefix else None)])
        outs.append(attention(q, k[prefix:], v[prefix:], cache.clone(), meta).float())
    assert calls == [tokens]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=1.6e-2)


def test_gemm_f32_rejects_mismatched_shapes(kernel):
    if not kernel.has_gemm_f32():
        pytest.skip("this CPU has no AVX2/FMA")
    panels = kernel.pack_f32(torch.randn(40, 64))  # 3 panels
    with pytest.raises(RuntimeError, match="panels"):
        kernel.gemm_f32(torch.randn(2, 63), panels, 40, None)  # K differs
    with pytest.raises(RuntimeError, match="n_size"):
        kernel.gemm_f32(torch.randn(2, 64), panels, 49, None)  # more outputs than the panels hold
    with pytest.raises(RuntimeError, match="n_size"):
        kernel.gemm_f32(torch.randn(2, 64), panels, 32, None)  # a whole panel too many
    with pytest.raises(RuntimeError, match="bias"):
        kernel.gemm_f32(torch.randn(2, 64), panels, 40, torch.randn(39))
    with pytest.raises(RuntimeError, match="float32"):
        kernel.gemm_f32(torch.randn(2, 64).double(), panels, 40, None)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.pack_f32(torch.randn(4, 4).bfloat16())
    assert kernel.gemm_f32(torch.randn(0, 64), panels, 40, None).shape == (0, 40)


def test_float32_linear_takes_the_gemv_for_few_rows_and_the_panels_above(kernel):
    from cluster.model.layers.packed_weight import GEMV_F32_MAX_ROWS, PackedWeight

    if not kernel.has_gemv_f32():
        pytest.skip("this CPU has no AVX2/FMA")
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(960, 576, generator=gen)
    bias = torch.randn(960, generator=gen)
    packed = PackedWeight(weight, kernel)
    calls = []
    packed.gemv_f32 = lambda x, w, b: calls.append(("gemv", x.shape[0])) or kernel.gemv_f32(x, w, b)
    packed.gemm_f32 = lambda x, p, n, b: calls.append(("gemm", x.shape[0])) or kernel.gemm_f32(x, p, n, b)
    for rows in (0, 1, GEMV_F32_MAX_ROWS, GEMV_F32_MAX_ROWS + 1, 700):  # 0: a step whose chunk needs no logits
        x = torch.randn(rows, 576, generator=gen)
        torch.testing.assert_close(packed.linear(x, bias), x @ weight.T + bias, atol=1e-4, rtol=1e-5)
    assert calls == [("gemv", 1), ("gemv", GEMV_F32_MAX_ROWS), ("gemm", GEMV_F32_MAX_ROWS + 1), ("gemm", 700)]
    assert PackedWeight(weight, None).panels is None  # native kernels off: torch's linear


def test_bfloat16_linear_where_onednn_cannot_run_it_takes_widened_float32_panels(kernel, monkeypatch):
    """On a CPU that only emulates bfloat16 the weight is widened into float32 panels: the output is
    the float32 sum of the exact products, rounded to bfloat16 once (any batch size, with a bias)."""
    from cluster.model.layers.packed_weight import PackedWeight

    if not kernel.has_gemm_f32():
        pytest.skip("this CPU has no AVX2/FMA")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(960, 576, generator=gen).bfloat16()
    bias = torch.randn(960, generator=gen).bfloat16()
    packed = PackedWeight(weight, kernel)
    assert packed.widened and packed.packed is None and packed.panels.dtype == torch.float32
    for rows in (1, 4, 5, 33, 300):
        x = torch.randn(rows, 576, generator=gen).bfloat16()
        got = packed.linear(x, bias)
        exact = (x.double() @ weight.double().T + bias.double())
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 960)
        # one rounding to bfloat16 of a float32 sum: within half a bfloat16 step plus float32's error
        torch.testing.assert_close(got.double(), exact, atol=1e-3, rtol=2 ** -8)
    assert packed.linear(torch.empty(0, 576).bfloat16(), bias).shape == (0, 960)
    assert not PackedWeight(weight, None).widened  # native kernels off: torch's linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotary_in_place_is_bit_identical_to_torch(kernel, dtype):
    """The projection's q and k heads rotated where they lie (a strided view of [T, q + k + v heads]);
    16-bit bit-identical to torch's ops, float32 within its last bits."""
    from cluster.model.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(3)
    rope = RotaryEmbedding(64, 4096, 100000.0, None)
    positions = torch.randint(0, 4096, (45,), generator=gen)
    cos_sin = rope.lookup(positions, dtype)
    qkv = (4 * torch.randn(45, 9 + 3 + 3, 64, generator=gen)).to(dtype)
    qk = qkv[:, :12]
    expected = RotaryEmbedding.apply(cos_sin, qk)
    untouched = qkv[:, 12:].clone()
    kernel.rotary_(qk, *cos_sin)
    if dtype == torch.float32:  # a product may be fused into the sum: one rounding fewer than torch
        torch.testing.assert_close(qkv[:, :12], expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(qkv[:, :12], expected)
    assert torch.equal(qkv[:, 12:], untouched)  # the v heads beside them are left alone
    with pytest.raises(RuntimeError, match="one cos/sin row per token"):
        kernel.rotary_(qk, cos_sin[0][:3], cos_sin[1][:3])


def test_llama_attention_rotates_in_place_on_cpu_in_every_dtype(kernel):
    from cluster.distributed.tp_group import TPGroup
    from cluster.model.arch import ModelArch
    from cluster.model.llama import LlamaAttention

    arch = ModelArch._from_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                     "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}, "llama")
    for dtype in (torch.bfloat16, torch.float32):
        attn = LlamaAttention(arch, TPGroup(), dtype)
        attn.finalize_weights(kernel)
        assert attn._kernels is kernel
        attn.finalize_weights(None)  # native kernels off: torch's ops
        assert attn._kernels is None


def test_bfloat16_engine_with_chunked_prefill_and_few_rows_runs_every_request(tiny_llama_dir):
    """bf16 end to end through the native kernels: prompt chunks that need no logits (0 rows), lone
    decodes and small batches (the GEMV), larger ones (oneDNN); every request gets all its tokens."""
    from cluster.llm import LLM
    from cluster.sampling_params import SamplingParams

    llm = LLM(model=tiny_llama_dir("llama_untied"), dtype="bfloat16", block_size=4, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for batch in ([list(range(100, 150))], [[200 + i, 7, 9] for i in range(3)], [[300 + i] * 20 for i in range(9)]):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
        assert [len(o.outputs[0].token_ids) for o in outs] == [6] * len(batch)
        assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.mark.parametrize("variant, dtype", [("llama_tied", "float32"), ("qwen2", "float32"),  # qwen2: QKV bias
                                            ("llama_tied", "bfloat16"), ("qwen2", "bfloat16")])
def test_decode_steps_call_the_kernels_directly_with_the_modules_outputs(kernel, tiny_llama_dir, variant, dtype,
                                                                        monkeypatch):
    """Decode steps on CPU run each layer as a straight sequence of kernel calls; tokens and logprobs
    are bit-identical to the modules' forwards (through mixed steps, lone decodes, decode batches
    small enough for the gemv and larger ones; in bfloat16 larger ones padded to a row bucket). With
    AMX, bfloat16 steps run all the layers in one native call: bit-identical to both."""
    import dataclasses

    from cluster.llm import LLM
    from cluster.model.layers.packed_weight import can_pack
    from cluster.model.llama import LlamaDecoderLayer
    from cluster.sampling_params import SamplingParams

    if dtype == "bfloat16" and not (kernel.has_silu_mul_bf16() and can_pack(torch.zeros(1, 1, dtype=torch.bfloat16))):
        pytest.skip("bfloat16 runs widened to float32 here (no oneDNN bfloat16, or no AVX-512)")
    llm = LLM(model=tiny_llama_dir(variant), dtype=dtype, block_size=8, max_num_batched_tokens=64,
              enable_prefix_caching=False)  # the second run computes its prompts again, as the first did
    model = llm.engine.executor.worker.runner.model.model
    layers = model.layers
    plans = [layer._native for layer in layers]
    assert all(plan is not None for plan in plans)
    stack = model._stack
    assert (stack is not None) == (dtype == "bfloat16" and kernel.has_gemm_amx_bf16())
    rows, stacked = [], []
    native = LlamaDecoderLayer._decode_native
    monkeypatch.setattr(LlamaDecoderLayer, "_decode_native",
                        lambda self, cos_sin, hidden, *rest: rows.append(hidden.shape[0]) or
                        native(self, cos_sin, hidden, *rest))
    if stack is not None:
        model._stack = dataclasses.replace(stack, run=lambda hidden, *rest: stacked.append(hidden.shape[0]) or
                                           stack.run(hidden, *rest))
    prompts = [{"prompt_token_ids": [100 + i + j % 7 for j in range(3 + 9 * i)]} for i in range(7)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)

    def run():
        return [(o.outputs[0].token_ids, repr(o.outputs[0].logprobs)) for o in llm.generate(prompts, params)]

    direct = run()
    if stack is not None:  # every decode step ran the layers in one call, lone rows and padded buckets
        assert stacked and min(stacked) <= 4 < max(stacked) and not rows
        runner = llm.engine.executor.worker.runner
        real = runner.kernels

        class Forwarding:  # other kernels for the step (as the fault-isolation tests swap in): layer by layer
            def __getattr__(self, name):
                return getattr(real, name)

        runner.kernels, calls = Forwarding(), len(stacked)
        try:
            assert run() == direct and len(stacked) == calls and rows
        finally:
            runner.kernels = real
        rows.clear()
        model._stack = None
        assert run() == direct
        model._stack = stack
    assert rows and min(rows) <= 4 < max(rows)  # gemv-sized and panel-sized decode batches both ran
    model._stack = None
    for layer in layers:
        layer._native = None
    rows.clear()
    assert run() == direct and not rows
    for layer, plan in zip(layers, plans):
        layer._native = plan
    model._stack = stack


def test_batches_padded_to_row_buckets_give_the_unpadded_tokens(tiny_llama_dir):
    """Padding a step's rows to a bucket (so oneDNN reuses its matmuls) changes no real row. In
    float32 (unpadded by default, forced here) greedy tokens must be equal with and without it,
    through mixed steps, lone decodes and decode batches of odd sizes; bfloat16 pads by default
    (its sums may round differently at another row count, as they do when the batch changes)."""
    from cluster.llm import LLM
    from cluster.runner.model_input import padded_rows
    from cluster.sampling_params import SamplingParams

    assert [padded_rows(n) for n in (0, 1, 4, 5, 16, 17, 256, 257, 1025, 4097)] == \
        [0, 1, 4, 16, 16, 32, 256, 320, 1152, 4352]
    prompts = [{"prompt_token_ids": [100 + i + j % 7 for j in range(3 + 11 * i)]} for i in range(7)]
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    llm = LLM(model=tiny_llama_dir("llama_untied"), dtype="float32", block_size=4, max_num_batched_tokens=40)
    runner = llm.engine.executor.worker.runner
    assert not runner.pad_rows
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    runner.pad_rows = True
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == plain
    assert llm.engine.executor.worker.runner.pad_rows
    bf16 = LLM(model=tiny_llama_dir("llama_untied"), dtype="bfloat16", block_size=4, max_num_batched_tokens=40)
    assert bf16.engine.executor.worker.runner.pad_rows


def _gguf_weight(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    import gguf
    import numpy as np

    qtype = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).copy())


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 960, 576), (2, 3072, 576), (3, 576, 1536), (4, 4096, 576),  # SmolLM2's linears at decode rows
    (5, 576, 1536), (33, 3072, 576), (48, 960, 576),  # batches
    (1, 3, 64), (7, 13, 32), (2, 25, 96),  # fewer outputs than a block of rows; one-block rows
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_over_gguf_blocks_is_bit_identical_to_the_dense_weight(kernel, kind, rows, out_features, in_features,
                                                                     with_bias):
    from cluster.model.layers.gguf_blocks import recover

    if not kernel.has_gemv_f32():
        pytest.skip("this CPU has no AVX2/FMA")
    weight = _gguf_weight(kind, out_features, in_features, seed=rows + out_features)
    blocks = recover(weight)
    assert blocks is not None and blocks.kind == kind
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    gemv = kernel.gemv_q4_1 if kind == "q4_1" else kernel.gemv_q8_0
    got = gemv(x, blocks.qs, blocks.scales, b)
    assert torch.equal(got, kernel.gemv_f32(x, weight, b))  # decoded to the same floats, summed the same way
    assert gemv(x[:0], blocks.qs, blocks.scales, b).shape == (0, out_features)


def test_gemv_over_gguf_blocks_rejects_mismatched_shapes(kernel):
    from cluster.model.layers.gguf_blocks import recover

    if not kernel.has_gemv_f32():
        pytest.skip("this CPU has no AVX2/FMA")
    blocks = recover(_gguf_weight("q4_1", 8, 64, seed=1))
    with pytest.raises(RuntimeError, match="qs must be"):
        kernel.gemv_q4_1(torch.randn(2, 96), blocks.qs, blocks.scales, None)
    with pytest.raises(RuntimeError, match="uint8"):
        kernel.gemv_q4_1(torch.randn(2, 64), blocks.qs.view(torch.int8), blocks.scales, None)
    with pytest.raises(RuntimeError, match="scales"):
        kernel.gemv_q4_1(torch.randn(2, 64), blocks.qs, blocks.scales[:4], None)


def test_linear_holds_exact_gguf_weights_as_blocks_for_decode_rows(kernel):
    from cluster.model.layers.packed_weight import GGUF_BLOCKS_MAX_ROWS, PackedWeight

    if not kernel.has_gemv_f32():
        pytest.skip("this CPU has no AVX2/FMA")
    weight = _gguf_weight("q4_1", 960, 576, seed=3)
    packed = PackedWeight(weight, kernel, gguf_blocks=True)
    assert packed.blocks is not None and packed.blocks.kind == "q4_1"
    dense = PackedWeight(weight, kernel)  # gguf_blocks off: the float32 weight
    assert dense.blocks is None
    calls = []
    gemv_blocks = packed.gemv_blocks
    packed.gemv_blocks = lambda x, qs, scales, b: calls.append(x.shape[0]) or gemv_blocks(x, qs, scales, b)
    for rows in (1, 5, GGUF_BLOCKS_MAX_ROWS):  # the blocks: the plain weight's gemv_f32 bits
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(packed.linear(x), kernel.gemv_f32(x, weight, None))
    for rows in (GGUF_BLOCKS_MAX_ROWS + 1, 40):  # larger batches: the panels, as for a plain weight
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
        assert torch.equal(packed.linear(x), dense.linear(x))
    assert calls == [1, 5, GGUF_BLOCKS_MAX_ROWS]
    assert PackedWeight(torch.randn(960, 576), kernel, gguf_blocks=True).blocks is None  # not blocks: dense
    assert PackedWeight(weight, None, gguf_blocks=True).blocks is None  # native kernels off


@pytest.mark.parametrize("rows, n", [(1, 8), (3, 1536), (37, 100), (130, 13)])  # tails past the 8 lanes
def test_silu_mul_is_torchs_swiglu_activation_to_float32_accuracy(kernel, rows, n):
    if not kernel.has_silu_mul():
        pytest.skip("silu_mul needs AVX2 + FMA")
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, 2 * n, generator=gen) * 6
    x[0, : min(n, 6)] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-30, -1e-30])[: min(n, 6)]  # exp's edges
    gate, up = x.double().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = kernel.silu_mul(x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-30)
    assert kernel.silu_mul(torch.empty(0, 2 * n)).shape == (0, n)


@pytest.mark.parametrize("rows, n", [(1, 16), (5, 48), (34, 1536), (257, 64)])
def test_gemm_silu_mul_equals_the_projection_then_the_activation(kernel, rows, n):
    """The fused SwiGLU projection: bit-identical to gemm_f32 over the merged weight then silu_mul."""
    if not kernel.has_gemm_f32():
        pytest.skip("gemm_f32 needs AVX2 + FMA")
    gen = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, 96, generator=gen)
    panels = kernel.pack_f32(torch.randn(2 * n, 96, generator=gen) * 0.3)
    expected = kernel.silu_mul(kernel.gemm_f32(x, panels, 2 * n, None))
    got = kernel.gemm_f32_silu_mul(x, panels, n)
    assert got.shape == (rows, n) and torch.equal(got, expected)
    assert kernel.gemm_f32_silu_mul(x[:0], panels, n).shape == (0, n)


def test_gemm_silu_mul_refuses_halves_off_the_panels(kernel):
    if not kernel.has_gemm_f32():
        pytest.skip("gemm_f32 needs AVX2 + FMA")
    x = torch.randn(7, 32)
    with pytest.raises(RuntimeError, match="multiple of 16"):  # the gate/up boundary inside a panel
        kernel.gemm_f32_silu_mul(x, kernel.pack_f32(torch.randn(88, 32)), 44)
    with pytest.raises(RuntimeError, match="gate \\| up"):  # panels of another width
        kernel.gemm_f32_silu_mul(x, kernel.pack_f32(torch.randn(96, 32)), 32)
    with pytest.raises(RuntimeError, match="gate \\| up"):
        kernel.gemm_f32_silu_mul(torch.randn(7, 31), kernel.pack_f32(torch.randn(64, 32)), 32)


def test_silu_mul_rejects_what_it_cannot_read(kernel):
    if not kernel.has_silu_mul():
        pytest.skip("silu_mul needs AVX2 + FMA")
    for bad in (torch.randn(4, 7), torch.randn(4, 8).bfloat16(), torch.randn(8, 4).t(), torch.randn(2, 4, 8)):
        with pytest.raises(RuntimeError, match="silu_mul"):
            kernel.silu_mul(bad)


def _tiny_mlp(dtype: torch.dtype, intermediate: int, gen: torch.Generator):
    """A LlamaMLP of hidden size 64 with small random weights (drawn from ``gen``)."""
    from cluster.distributed.tp_group import TPGroup
    from cluster.model.arch import ModelArch
    from cluster.model.llama import LlamaMLP

    arch = ModelArch._from_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                     "intermediate_size": intermediate, "num_hidden_layers": 1,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                                     "max_position_embeddings": 64}, "llama")
    mlp = LlamaMLP(arch, TPGroup(), dtype)
    for p in mlp.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return mlp


def test_float32_mlp_takes_the_one_pass_activation_and_matches_the_torch_path(kernel):
    if not kernel.has_silu_mul():
        pytest.skip("silu_mul needs AVX2 + FMA")
    gen = torch.Generator().manual_seed(3)
    mlp = _tiny_mlp(torch.float32, 100, gen)
    x = torch.randn(19, 64, generator=gen)
    with torch.no_grad():
        expected = mlp(x)
        mlp.finalize_weights(kernel)
        assert mlp._silu_mul is kernel
        got = mlp(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    mlp.finalize_weights(None)
    assert mlp._silu_mul is None


@pytest.mark.parametrize("rows, n, scale", [(1, 1536, 1.0), (33, 1536, 4.0), (300, 1536, 0.01), (3, 100, 30.0),
                                             (2, 7, 1.0)])
def test_bfloat16_silu_mul_is_bit_identical_to_torchs_two_steps(kernel, rows, n, scale):
    """torch rounds silu(gate) to bfloat16, then the product: the kernel must land on the very same
    bits (transformers runs torch's ops), over a row's 16-wide body and its scalar tail alike."""
    from cluster.model.llama import silu_bf16_table

    if not kernel.has_silu_mul_bf16():
        assert "avx512f" not in open("/proc/cpuinfo").read(), "built without AVX-512 on a CPU that has it"
        pytest.skip("silu_mul_bf16 needs AVX-512")
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = (torch.randn(rows, 2 * n, generator=gen) * scale).bfloat16()
    edges = [0.0, -0.0, 88.0, -88.0, 100.0, -100.0, 1e-39, -1e-39, float("inf"), float("-inf"), float("nan")]
    x[0, : min(n, len(edges))] = torch.tensor(edges[:n]).bfloat16()  # exp's and the rounding's edges
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate).mul_(up)
    table = silu_bf16_table()
    got = kernel.silu_mul_bf16(x, table)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} values differ"
    strided = torch.cat([x, x[:, :8]], dim=1)[:, : 2 * n]  # rows further apart than 2n
    assert torch.equal(kernel.silu_mul_bf16(strided, table).view(torch.int16), got.view(torch.int16))
    assert kernel.silu_mul_bf16(x[:0], table).shape == (0, n)
    for bad, bad_table in ((x.float(), table), (x[:, :-1], table), (x.t(), table), (x[None], table), (x, table[:-2])):
        with pytest.raises(RuntimeError, match="silu_mul_bf16"):
            kernel.silu_mul_bf16(bad, bad_table)


def test_bfloat16_mlp_takes_the_one_pass_activation_bit_identically(kernel):
    if not kernel.has_silu_mul_bf16():
        pytest.skip("silu_mul_bf16 needs AVX-512")
    gen = torch.Generator().manual_seed(4)
    mlp = _tiny_mlp(torch.bfloat16, 100, gen)
    x = torch.randn(19, 64, generator=gen).bfloat16()
    with torch.no_grad():
        expected = mlp(x)
        mlp.finalize_weights(kernel)
        assert mlp._silu_mul_bf16 is not None and mlp._silu_mul is None
        got = mlp(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("intermediate, rows, fused", [(96, 19, True), (96, 3, False), (100, 19, False)])
def test_float32_mlp_fuses_the_activation_into_the_gate_up_panels(kernel, intermediate, rows, fused):
    """Where the panels take the rows and gate and up are whole panels, the projection applies
    silu(gate) * up itself (bit-identical to the projection then the activation); decode-sized
    inputs (the gemv) and halves that end inside a panel take the two steps."""
    if not kernel.has_gemm_f32():
        pytest.skip("gemm_f32 needs AVX2 + FMA")
    gen = torch.Generator().manual_seed(4)
    mlp = _tiny_mlp(torch.float32, intermediate, gen)
    mlp.gate_up_proj.finalize_weights(kernel)
    mlp.down_proj.finalize_weights(kernel)
    mlp.finalize_weights(kernel)
    x = torch.randn(rows, 64, generator=gen)
    with torch.no_grad():
        two_steps = mlp.down_proj(kernel.silu_mul(mlp.gate_up_proj(x)))
        assert (mlp.gate_up_proj.silu_mul(x) is not None) == fused
        assert torch.equal(mlp(x), two_steps)
