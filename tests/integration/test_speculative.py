"""Speculative decoding end to end: greedy output is token-for-token the same with speculation on
(n-gram, suffix) and off, on a tiny fp32 model and on SmolLM2, batched, with blocks returned.
The engine-level invariants under random programs (preemption, aborts, SwiftKV/AcrossKV, tight
budgets) are in test_engine_properties.py; the verification rule's distribution in
tests/unit/test_speculative.py."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams
from tests.conftest import NUM_THREADS, assert_no_leak

SPECULATIVE = {
    "ngram": {"method": "ngram", "num_tokens": 4, "prompt_lookup_min": 1},
    "suffix": {"method": "suffix", "num_tokens": 4},
}


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("method", list(SPECULATIVE))
def test_tiny_model_greedy_is_the_same_with_speculation(method, tiny_llama_dir):
    model = tiny_llama_dir("llama_deep")
    segment = list(range(300, 340))
    prompts = [segment * 3 + [7, 8], [5] * 20, segment + list(range(900, 930)) + segment[:10], [11, 12, 13]]
    options = dict(dtype="float32", num_threads=NUM_THREADS, block_size=4, num_blocks=256,
                   max_num_batched_tokens=64)
    plain = _generate(LLM(model, **options), prompts, 48)
    llm = LLM(model, speculative=SPECULATIVE[method], **options)
    assert _generate(llm, prompts, 48) == plain
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_drafted_tokens"] >= stats["spec_accepted_tokens"]
    assert_no_leak(llm)


def test_smollm2_extraction_is_the_same_with_speculation_and_drafts_are_accepted(smollm2_path):
    """A record-extraction prompt: the answer copies spans of the document, so drafts are accepted."""
    llm_plain = LLM(smollm2_path, num_threads=NUM_THREADS, num_blocks=256)
    tokenizer = llm_plain.get_tokenizer()
    records = "\n".join(f"Invoice {1000 + i}: customer Acme Widgets Ltd, amount {137 * i % 997}.{i:02d} EUR, "
                        f"due 2026-0{1 + i % 9}-1{i % 9}" for i in range(12))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{records}\n\nCopy the lines of invoices 1003, 1004 and 1005 exactly."}],
        tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt)["input_ids"]
    plain = _generate(llm_plain, [ids], 64)
    for method, options in SPECULATIVE.items():
        llm = LLM(smollm2_path, num_threads=NUM_THREADS, num_blocks=256, speculative=options)
        assert _generate(llm, [ids], 64) == plain, method
        stats = llm.engine.stats()
        assert stats["spec_accepted_tokens"] >= 16, (method, stats)  # the copied lines are drafted
        assert_no_leak(llm)
