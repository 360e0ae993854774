"""``kv_cache_dtype``: a float32 model over a bfloat16 / float16 KV cache.

The cache holds each K/V value rounded once; attention widens it back and computes in float32.
So the kernel's widening path must equal the float32 path run over the widened cache bit for bit,
the cache must hold twice the tokens in the same budget, and SmolLM2's outputs must stay those of
the exact model up to that one rounding (first greedy tokens, teacher-forced top-1 agreement).
"""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.config import EngineConfig
from cluster.errors import InvalidConfigError
from tests.conftest import NUM_THREADS, assert_no_leak

FIRST_TOKENS = 8
TEACHER_FORCED_POSITIONS = 64


def test_kv_cache_dtype_is_validated_where_the_config_is_built():
    with pytest.raises(InvalidConfigError, match="kv_cache_dtype") as err:
        EngineConfig.from_kwargs(kv_cache_dtype="int8")
    assert err.value.field == "kv_cache_dtype"
    with pytest.raises(InvalidConfigError, match="only a float32 model takes a 16-bit cache"):
        EngineConfig.from_kwargs(dtype="bfloat16", kv_cache_dtype="float16")
    config = EngineConfig.from_kwargs(dtype="float32", kv_cache_dtype="bfloat16")
    assert config.cache.resolved_kv_cache_dtype("float32") == "bfloat16"
    assert EngineConfig.from_kwargs(dtype="bfloat16", kv_cache_dtype="bfloat16").cache.kv_cache_dtype == "bfloat16"


def test_the_triton_backend_refuses_a_16_bit_cache_under_float32(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend's CPU test mode
    with pytest.raises(InvalidConfigError, match="triton attention backend reads K/V in the model's dtype"):
        EngineConfig.from_kwargs(dtype="float32", attention_backend="triton", kv_cache_dtype="bfloat16")
    EngineConfig.from_kwargs(dtype="float32", attention_backend="triton", kv_cache_dtype="float32")


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_widening_decode_equals_the_float32_kernel_over_the_widened_cache(cache_dtype, head_dim):
    from cluster.kernels.loader import load

    kernels = load()
    if kernels is None or not kernels.has_widening_decode():
        pytest.skip("the native kernels' widening decode needs AVX2 + FMA + F16C")
    gen = torch.Generator().manual_seed(0)
    num_seqs, kv_heads, group, block_size, num_blocks = 5, 3, 3, 16, 64
    cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=gen).to(cache_dtype)
    q = torch.randn(num_seqs, kv_heads * group, head_dim, generator=gen)
    lens = torch.tensor([1, 17, 100, 33, 160])
    table = torch.randperm(num_blocks, generator=gen)[: num_seqs * 10].view(num_seqs, 10).contiguous()
    widened = kernels.paged_decode(q, cache, table, lens, head_dim ** -0.5)
    exact = kernels.paged_decode(q, cache.float(), table, lens, head_dim ** -0.5)
    assert widened.dtype == torch.float32 and torch.equal(widened, exact)
    with pytest.raises(RuntimeError, match="float32 queries"):
        kernels.paged_decode(q.to(torch.float16 if cache_dtype == torch.bfloat16 else torch.bfloat16), cache,
                             table, lens, 0.125)


def test_a_16_bit_cache_holds_twice_the_tokens(tiny_llama_dir):
    model = tiny_llama_dir("llama3_rope")
    sizes = {}
    for kv_dtype in ("auto", "bfloat16"):
        llm = LLM(model, dtype="float32", kv_cache_dtype=kv_dtype, kv_cache_memory_bytes=8 << 20)
        try:
            sizes[kv_dtype] = llm.engine.block_manager.num_blocks
            assert {c.dtype for c in llm.engine.executor.worker.runner.kv_caches} == \
                {torch.float32 if kv_dtype == "auto" else torch.bfloat16}
            out = llm.generate([{"prompt_token_ids": list(range(200, 260))}],
                               SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
            assert len(out[0].outputs[0].token_ids) == 6
            assert_no_leak(llm)
        finally:
            llm.engine.shutdown()
    assert sizes["bfloat16"] == 2 * sizes["auto"]


@pytest.fixture(scope="module", params=[True, False], ids=["kernels", "torch"])
def engine_bf16_cache(request, smollm2_path) -> LLM:
    llm = LLM(smollm2_path, dtype="float32", kv_cache_dtype="bfloat16", num_threads=NUM_THREADS, num_blocks=400,
              use_native_kernels=request.param)
    yield llm
    llm.engine.shutdown()


@pytest.mark.slow
def test_first_greedy_tokens_equal_the_exact_model(engine_bf16_cache, smollm2_prompts, smollm2_references):
    """One batch (the long prompt's chunks read its bfloat16 prefix back) against transformers in float32."""
    names = [n for n in smollm2_prompts if n != "eos_first"]
    outputs = engine_bf16_cache.generate([{"prompt_token_ids": smollm2_prompts[n]} for n in names],
                                         SamplingParams(temperature=0.0, max_tokens=FIRST_TOKENS))
    for name, out in zip(names, outputs):
        n = min(FIRST_TOKENS, len(smollm2_references[name]))
        assert out.outputs[0].token_ids[:n] == smollm2_references[name][:n], name
    assert_no_leak(engine_bf16_cache)


@pytest.mark.slow
def test_teacher_forced_top1_agrees_with_the_exact_model(engine_bf16_cache, hf_smollm2, smollm2_prompts):
    """Each position's scores through the rounded cache against transformers' exact ones."""
    ids = smollm2_prompts["long"]
    # 16 tokens at a time: every chunk reads the earlier ones back from the bfloat16 cache (and a
    # chunk this short attends as decode rows, reading its own K/V from there too)
    ours = engine_bf16_cache.engine.executor.worker.score(ids, chunk_tokens=16)
    with torch.no_grad():
        theirs = hf_smollm2(torch.tensor([ids]), logits_to_keep=TEACHER_FORCED_POSITIONS).logits[0]
    tail = slice(len(ids) - TEACHER_FORCED_POSITIONS, len(ids))
    agree = (ours[tail].argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree >= 0.97, f"top-1 agreement {agree:.3f} over the last {TEACHER_FORCED_POSITIONS} positions"
