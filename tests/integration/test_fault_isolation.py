"""No request of death: a fault raised while a step runs is pinned on the requests that cause it;
they end with an internal error, everyone else's tokens are unaffected, and the engine serves on.
A fault that is nobody's rebuilds the engine in place. Faults are injected through real code paths:
a registered model class, the native decode kernel, the sampler.

Also here: the SwiftKV prefill of a prompt just past the token budget (a step with no token to
sample), which used to raise in every later step of the engine.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from cluster import LLM, EngineDeadError, SamplingParams
from cluster.engine.async_engine import AsyncLLMEngine
from cluster.errors import RequestFailedError
from cluster.runner import model_input
from cluster.swiftkv.checkpoint import save_params
from tests.conftest import NUM_THREADS, assert_no_leak
from tests.fault_models import (
    POISON_TOKEN,
    FailingDecodeKernel,
    SwitchableLlama,
    checkpoint_with_architecture,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
GOOD = [[1, 504, 3458, 282, 9, 77], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [1, 800, 801, 802],
        [1] + list(range(1000, 1040))]


def as_prompts(token_lists):
    return [{"prompt_token_ids": ids} for ids in token_lists]


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def poisoned_dir(tiny_llama_dir, tmp_path_factory):
    return checkpoint_with_architecture(tiny_llama_dir("llama_tied"), str(tmp_path_factory.mktemp("poisoned")),
                                        "PoisonedLlamaForCausalLM")


@pytest.fixture(scope="module")
def switchable_dir(tiny_llama_dir, tmp_path_factory):
    return checkpoint_with_architecture(tiny_llama_dir("llama_tied"), str(tmp_path_factory.mktemp("switchable")),
                                        "SwitchableLlamaForCausalLM")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """The good prompts' greedy tokens on the plain model, with nothing else in the engine."""
    llm = LLM(tiny_llama_dir("llama_tied"), dtype="float32", num_threads=NUM_THREADS, block_size=4)
    return [tokens(llm.generate(p, GREEDY))[0] for p in as_prompts(GOOD)]


@pytest.fixture(autouse=True)
def healthy_switchable_model():
    SwitchableLlama.broken = False
    SwitchableLlama.hang.clear()
    SwitchableLlama.release.clear()
    yield
    SwitchableLlama.broken = False
    SwitchableLlama.hang.clear()
    SwitchableLlama.release.set()


def test_a_poisoned_prompt_ends_alone_and_the_batch_keeps_its_tokens(poisoned_dir, reference):
    llm = LLM(poisoned_dir, dtype="float32", num_threads=NUM_THREADS, block_size=4, max_num_batched_tokens=32)
    poisoned = [1, 504, POISON_TOKEN, 282]
    outs = llm.generate(as_prompts(GOOD[:2] + [poisoned] + GOOD[2:]), GREEDY)
    assert outs[2].outputs[0].finish_reason == "error" and "poisoned token" in outs[2].error
    assert outs[2].outputs[0].token_ids == []
    assert tokens(outs[:2] + outs[3:]) == reference
    assert all(o.outputs[0].finish_reason == "length" and o.error is None for o in outs[:2] + outs[3:])
    assert_no_leak(llm)
    assert tokens(llm.generate(as_prompts(GOOD), GREEDY)) == reference  # nothing poisoned stays behind
    assert_no_leak(llm)


def test_a_decode_kernel_fault_ends_only_the_request_whose_shape_triggers_it(tiny_llama_dir, reference,
                                                                             monkeypatch):
    # Prompts attend through flash attention here (short chunks would take the decode kernel too, and
    # every prompt of 6 tokens or more has a row at a 6-token context): only decodes meet the fault.
    monkeypatch.setattr(model_input, "SMALL_PREFILL_ROWS", 0)
    llm = LLM(tiny_llama_dir("llama_tied"), dtype="float32", num_threads=NUM_THREADS, block_size=4)
    runner = llm.engine.executor.worker.runner
    if runner.kernels is None:
        pytest.skip("the native CPU kernels are not built on this machine")
    # GOOD[2] (4 prompt tokens) decodes at a 6-token context after 2 tokens; no other prompt is that short.
    runner.kernels = FailingDecodeKernel(runner.kernels, fail_at=6)
    outs = llm.generate(as_prompts(GOOD), GREEDY)
    assert runner.kernels.num_failures >= 1
    victim = outs[2].outputs[0]
    assert victim.finish_reason == "error" and "decode kernel fault" in outs[2].error
    assert victim.token_ids == reference[2][:2]
    assert tokens(outs[:2] + outs[3:]) == reference[:2] + reference[3:]
    assert_no_leak(llm)


def test_a_decode_kernel_fault_in_a_short_prompt_ends_only_that_prompt(tiny_llama_dir, reference):
    """Short prompts attend as decode rows through the same kernel (SMALL_PREFILL_ROWS): a fault there
    is pinned on the prompt whose row triggers it, before it produced a token."""
    llm = LLM(tiny_llama_dir("llama_tied"), dtype="float32", num_threads=NUM_THREADS, block_size=4)
    runner = llm.engine.executor.worker.runner
    if runner.kernels is None:
        pytest.skip("the native CPU kernels are not built on this machine")
    assert len(GOOD[3]) == 41 <= model_input.SMALL_PREFILL_ROWS
    # GOOD[3]'s last prompt row sees 41 tokens; the others' prompts and decodes never reach 41.
    runner.kernels = FailingDecodeKernel(runner.kernels, fail_at=41)
    outs = llm.generate(as_prompts(GOOD), GREEDY)
    assert runner.kernels.num_failures >= 1
    victim = outs[3].outputs[0]
    assert victim.finish_reason == "error" and "decode kernel fault" in outs[3].error
    assert victim.token_ids == []
    assert tokens(outs[:3]) == reference[:3]
    assert_no_leak(llm)


def test_a_sampler_fault_ends_only_its_request(tiny_llama_dir, reference):
    llm = LLM(tiny_llama_dir("llama_tied"), dtype="float32", num_threads=NUM_THREADS, block_size=4)
    runner = llm.engine.executor.worker.runner
    sample = runner.sampler

    def faulty_sampler(logits, requests):
        if any(r.params.seed == 666 for r in requests):
            raise FloatingPointError("sampler fault")
        return sample(logits, requests)

    runner.sampler = faulty_sampler
    params = [GREEDY, GREEDY, SamplingParams(temperature=0.8, seed=666, max_tokens=12), GREEDY]
    outs = llm.generate(as_prompts(GOOD[:2] + [[1, 5, 6, 7]] + GOOD[3:]), params)
    assert outs[2].outputs[0].finish_reason == "error" and "FloatingPointError" in outs[2].error
    assert tokens(outs[:2] + outs[3:]) == reference[:2] + reference[3:]
    assert_no_leak(llm)


def test_a_fault_every_request_hits_rebuilds_the_engine_and_the_llm_works_after(switchable_dir, reference):
    llm = LLM(switchable_dir, dtype="float32", num_threads=NUM_THREADS, block_size=4)
    old_runner = llm.engine.executor.worker.runner
    SwitchableLlama.broken = True
    with pytest.raises(EngineDeadError, match="restarted"):
        llm.generate(as_prompts(GOOD), GREEDY)
    SwitchableLlama.broken = False
    assert llm.engine.executor.worker.runner is not old_runner  # a new executor, weights and cache
    assert_no_leak(llm)
    assert tokens(llm.generate(as_prompts(GOOD), GREEDY)) == reference


# ---- the asyncio engine (the served path) ---------------------------------------------------------

async def _collect(engine: AsyncLLMEngine, prompt, params, request_id: str):
    last = None
    async for last in engine.generate(prompt, params, request_id=request_id):
        pass
    return last


async def _gather(engine, prompts, params):
    tasks = [_collect(engine, p, params, f"r{i}") for i, p in enumerate(prompts)]
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_async_engine_fails_only_the_poisoned_stream(poisoned_dir, reference):
    engine = AsyncLLMEngine.from_config(LLM(poisoned_dir, dtype="float32", num_threads=NUM_THREADS,
                                            block_size=4).engine.config)
    try:
        results = asyncio.run(_gather(engine, as_prompts(GOOD + [[1, POISON_TOKEN]]), GREEDY))
        assert isinstance(results[-1], RequestFailedError) and results[-1].request_id == "r4"
        assert [r.outputs[0].token_ids for r in results[:-1]] == reference
        assert engine.is_serving and engine.num_restarts == 0
        assert_no_leak(engine.engine)
    finally:
        engine.shutdown()


def test_async_engine_restarts_in_place_after_a_fault_nobody_caused(switchable_dir, reference):
    engine = AsyncLLMEngine.from_config(LLM(switchable_dir, dtype="float32", num_threads=NUM_THREADS,
                                            block_size=4).engine.config)
    try:
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

        async def break_while_streaming():
            tasks = [asyncio.ensure_future(_collect(engine, p, long, f"s{i}")) for i, p in enumerate(as_prompts(GOOD))]
            while engine.engine.scheduler.num_running < len(GOOD):  # all four are decoding
                await asyncio.sleep(0.01)
            SwitchableLlama.broken = True
            broken_at = time.monotonic()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results, time.monotonic() - broken_at

        results, took_s = asyncio.run(break_while_streaming())
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert took_s < 5.0  # every in-flight request ends at once
        SwitchableLlama.broken = False
        deadline = time.monotonic() + 60
        while not engine.is_serving:
            assert time.monotonic() < deadline, engine.why_not_serving
            time.sleep(0.05)
        assert engine.num_restarts == 1 and engine.is_running
        results = asyncio.run(_gather(engine, as_prompts(GOOD), GREEDY))
        assert [r.outputs[0].token_ids for r in results] == reference
        assert_no_leak(engine.engine)
    finally:
        engine.shutdown()


def test_async_engine_refuses_beyond_capacity_at_once_with_a_retry_hint(tiny_llama_dir):
    from cluster.errors import QueueFullError

    llm = LLM(tiny_llama_dir("llama_tied"), dtype="float32", num_threads=NUM_THREADS, max_num_seqs=2,
              max_waiting_requests=2)
    engine = AsyncLLMEngine(llm.engine)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)

        async def burst():
            tasks = [asyncio.ensure_future(_collect(engine, {"prompt_token_ids": [1, 5 + i]}, params, f"b{i}"))
                     for i in range(20)]
            started = time.monotonic()
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first_s = time.monotonic() - started
            return await asyncio.gather(*tasks, return_exceptions=True), first_s

        results, first_s = asyncio.run(burst())
        refused = [r for r in results if isinstance(r, QueueFullError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert len(served) == 4 and len(refused) == 16, results  # 2 running + 2 waiting
        assert first_s < 1.0 and all(r.retry_after_s >= 1.0 for r in refused)
        assert all(len(r.outputs[0].token_ids) == 30 for r in served)
        assert_no_leak(llm)
    finally:
        engine.shutdown()


# ---- SwiftKV: prompts just past the token budget ----------------------------------------------------

@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_swiftkv_prompt_past_the_token_budget_in_every_split_shape(tiny_llama_dir, tmp_path, group,
                                                                   prefix_caching):
    """Budget 16, blocks of 4: prompts of 17..49 tokens are prefilled in 2-4 chunks, alone, so some
    steps have no token to sample (the SwiftKV tail is empty); each must equal the dense reference."""
    from tests.integration.test_swiftkv import dense_reference, perturbed_params

    model_dir = tiny_llama_dir("llama_deep")
    params = perturbed_params(model_dir, 2, group)
    path = str(tmp_path / "p.safetensors")
    save_params(path, params, dtype=torch.float32)
    llm = LLM(model=model_dir, swiftkv_params=path, dtype="float32", block_size=4, max_num_batched_tokens=16,
              enable_prefix_caching=prefix_caching, cache_dir=str(tmp_path / "cache"), num_threads=NUM_THREADS)
    lengths = [16, 17, 20, 31, 32, 33, 47, 48, 49]
    prompts = [[1] + [100 + (7 * i + n) % 900 for i in range(n - 1)] for n in lengths]
    max_tokens = 3
    got = [tokens(llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=max_tokens)))[0]
           for p in prompts]
    assert got == dense_reference(model_dir, params, prompts, max_tokens)
    assert_no_leak(llm)
