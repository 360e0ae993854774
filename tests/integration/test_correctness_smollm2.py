"""The real SmolLM2-135M in float32: the engine's greedy tokens equal transformers' exactly.

Every engine configuration (alone, batched, prefix caching on/off, chunked prefill,
preemption under a tight KV budget, prefix-cache reuse) must reproduce transformers'
``generate(do_sample=False)`` token for token, cut after its first EOS.
"""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from tests.conftest import NUM_THREADS, SMOLLM2_EOS_ID, SMOLLM2_MAX_TOKENS, assert_no_leak, record_preemptions

pytestmark = pytest.mark.slow

NUM_BLOCKS = 400  # 12,800 tokens of KV at the default block size: room for the whole batch, so no preemption unless asked


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def expected_finish(expected: list[int]) -> str:
    return "stop" if expected and expected[-1] == SMOLLM2_EOS_ID else "length"


def batch_requests(prompts: dict, references: dict) -> list[tuple[str, list[int], int, list[int]]]:
    """18 requests of mixed prompt and output lengths: (label, prompt ids, max_tokens, expected tokens).

    Every prompt at its full length, then shorter-output variants (a prefix of the same
    greedy reference) and one duplicate, so requests finish at different steps.
    """
    requests = [(name, ids, SMOLLM2_MAX_TOKENS, references[name]) for name, ids in prompts.items()]
    short_names = [n for n in prompts if n != "long"]
    for i, name in enumerate(short_names):
        max_tokens = 2 + 2 * i
        requests.append((f"{name}/max{max_tokens}", prompts[name], max_tokens, references[name][:max_tokens]))
    requests.append(("code/dup", prompts["code"], SMOLLM2_MAX_TOKENS, references["code"]))
    # Put the long prompt mid-batch: short requests both before and after it.
    long_request = requests.pop(list(prompts).index("long"))
    requests.insert(len(requests) // 2, long_request)
    return requests


def run_and_check(llm: LLM, requests) -> list:
    outputs = llm.generate([{"prompt_token_ids": ids} for _, ids, _, _ in requests],
                           [greedy(max_tokens) for _, _, max_tokens, _ in requests])
    for (label, _, _, expected), out in zip(requests, outputs):
        completion = out.outputs[0]
        assert completion.token_ids == expected, f"{label}: engine tokens differ from transformers"
        assert completion.finish_reason == expected_finish(expected), label
    assert_no_leak(llm)
    return outputs


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    """One default-configured engine (prefix caching on) shared by the tests that allow it."""
    return LLM(smollm2_path, num_threads=NUM_THREADS, num_blocks=NUM_BLOCKS)


def test_smollm2_decodes_from_its_gguf_blocks(llm):
    """SmolLM2's linears are Q4_1 and its tied embedding Q8_0 in the GGUF file: on a CPU with the
    native GEMV the engine holds them as those blocks, so every greedy check here runs through them."""
    from cluster.kernels.loader import load
    from cluster.model.layers.packed_weight import PackedWeight

    kernels = load()
    if kernels is None or not kernels.has_gemv_f32():
        pytest.skip("no native float32 GEMV on this CPU: the dense path runs")
    model = llm.engine.executor.worker.runner.model
    packed = [m._matmul for m in model.modules() if isinstance(getattr(m, "_matmul", None), PackedWeight)]
    assert len(packed) == 30 * 4 + 1  # qkv, o, gate_up, down in each layer, and the LM head
    assert all(p.blocks is not None for p in packed)
    assert {p.blocks.kind for p in packed} == {"q4_1", "q8_0"}


def test_prompts_cover_the_intended_cases(smollm2_prompts, smollm2_references):
    assert len(smollm2_prompts) >= 8
    assert len(smollm2_prompts["long"]) > 1024  # longer than the default per-step token budget
    assert len(smollm2_prompts["short3"]) == 3
    stopped = [n for n, ref in smollm2_references.items() if ref[-1] == SMOLLM2_EOS_ID]
    assert "eos_first" in stopped and len(stopped) >= 2  # some requests end on EOS, others on length
    assert smollm2_references["eos_first"] == [SMOLLM2_EOS_ID]


def test_each_prompt_alone_then_long_prompt_from_prefix_cache(llm, smollm2_prompts, smollm2_references,
                                                              smollm2_tokenizer):
    """(a) every prompt on its own; (f) the long one again, now served from the prefix cache."""
    assert llm.engine.block_manager.reset_prefix_cache()
    for name, ids in smollm2_prompts.items():
        expected = smollm2_references[name]
        [out] = llm.generate({"prompt_token_ids": ids}, greedy(SMOLLM2_MAX_TOKENS))
        completion = out.outputs[0]
        assert completion.token_ids == expected, name
        assert completion.finish_reason == expected_finish(expected), name
        assert completion.text == smollm2_tokenizer.decode(expected, skip_special_tokens=True), name
        assert out.prompt_token_ids == ids
        assert out.num_cached_tokens == 0, name  # no two prompts share a full first block
        assert_no_leak(llm)
        if name == "long":
            first_long = out

    ids = smollm2_prompts["long"]
    hits_before = llm.engine.block_manager.prefix_cache_hits
    [again] = llm.generate({"prompt_token_ids": ids}, greedy(SMOLLM2_MAX_TOKENS))
    block_size = llm.engine.config.cache.block_size
    # Every full block of the prompt but the one holding its last token (that one must run for logits).
    assert again.num_cached_tokens == (len(ids) - 1) // block_size * block_size
    assert llm.engine.block_manager.prefix_cache_hits - hits_before == again.num_cached_tokens
    assert again.outputs[0].token_ids == first_long.outputs[0].token_ids == smollm2_references["long"]
    assert again.outputs[0].text == first_long.outputs[0].text
    assert_no_leak(llm)


def test_text_prompt_equals_token_prompt(llm, smollm2_tokenizer, smollm2_prompts, smollm2_references):
    text = "The capital of France is"
    [out] = llm.generate(text, greedy(SMOLLM2_MAX_TOKENS))
    assert out.prompt == text
    assert out.prompt_token_ids == smollm2_tokenizer.encode(text) == smollm2_prompts["english"]
    assert out.outputs[0].token_ids == smollm2_references["english"]
    assert_no_leak(llm)


@pytest.mark.parametrize("options", [
    pytest.param({"enable_prefix_caching": True}, id="prefix-caching-on"),
    # Prefix caching off, and prompts split into 64-token chunks (decodes share the budget).
    pytest.param({"enable_prefix_caching": False, "max_num_batched_tokens": 64}, id="no-caching-chunked-64"),
])
def test_batch_of_mixed_requests(smollm2_path, smollm2_prompts, smollm2_references, options):
    requests = batch_requests(smollm2_prompts, smollm2_references)
    assert len(requests) >= 16
    llm = LLM(smollm2_path, num_threads=NUM_THREADS, num_blocks=NUM_BLOCKS, **options)
    run_and_check(llm, requests)


def test_preemption_under_a_tight_kv_budget(smollm2_path, smollm2_prompts, smollm2_references):
    requests = batch_requests(smollm2_prompts, smollm2_references)
    # 80 blocks (1,280 tokens) hold the long request alone but not the whole batch at once.
    llm = LLM(smollm2_path, num_threads=NUM_THREADS, block_size=16, num_blocks=80, max_num_batched_tokens=256)
    preempted = record_preemptions(llm)
    run_and_check(llm, requests)
    assert preempted, "the KV budget was meant to force at least one preemption"


def test_chat_applies_the_template_like_transformers(llm, smollm2_prompts, smollm2_references):
    messages = [{"role": "user", "content": "What is 2+2? Answer in one word."}]
    [out] = llm.chat(messages, greedy(SMOLLM2_MAX_TOKENS))
    assert out.prompt_token_ids == smollm2_prompts["chat"]
    assert out.outputs[0].token_ids == smollm2_references["chat"]
    assert_no_leak(llm)
