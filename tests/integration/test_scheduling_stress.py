"""Awkward scheduler settings on a tiny checkpoint give the same tokens as a roomy engine.

Block sizes of 1 and 3, token budgets of 1 and 5, one running sequence at a time and KV
caches barely larger than the biggest request: every request (greedy or seeded) must
still finish with the tokens it gets alone on a roomy engine, and no block may leak.
"""

from __future__ import annotations

import random

import pytest

from cluster import LLM, SamplingParams
from tests.conftest import NUM_THREADS, assert_no_leak

MAX_STEPS = 3000  # a livelocked scheduler fails the test instead of hanging it


def _requests(seed: int) -> list[tuple[list[int], int, int | None]]:
    """(prompt ids, max_tokens, seed or None for greedy); half share a common prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 49152) for _ in range(40)]
    requests = []
    for _ in range(6):
        n = rng.randint(1, 40)
        prompt = shared[:n] if rng.random() < 0.5 else [rng.randrange(3, 49152) for _ in range(n)]
        requests.append((prompt, rng.randint(1, 16), rng.choice([None, rng.randrange(1000)])))
    requests.append((list(shared), 16, None))  # the same prompt twice in one batch
    requests.append((list(shared), 12, 7))
    return requests


def _params(max_tokens: int, seed: int | None) -> SamplingParams:
    return SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_path(tiny_llama_dir) -> str:
    return tiny_llama_dir("llama_untied")


@pytest.fixture(scope="module")
def requests_and_references(tiny_path):
    requests = _requests(seed=0)
    roomy = LLM(tiny_path, num_threads=NUM_THREADS, num_blocks=256, max_model_len=512, enable_prefix_caching=False)
    references = [roomy.generate({"prompt_token_ids": p}, _params(m, s))[0].outputs[0].token_ids
                  for p, m, s in requests]
    return requests, references


def run_stepwise(llm: LLM, requests) -> tuple[dict, list[str]]:
    """Drive the engine by hand; return finished outputs by request id and every preempted id."""
    engine = llm.engine
    preempted: list[str] = []
    schedule = engine.scheduler.schedule

    def spy_schedule():
        out = schedule()
        preempted.extend(out.preempted_request_ids)
        return out

    engine.scheduler.schedule = spy_schedule
    for i, (prompt, max_tokens, seed) in enumerate(requests):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, _params(max_tokens, seed))
    finished = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            return finished, preempted
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    raise AssertionError(f"not finished after {MAX_STEPS} steps: the scheduler is stuck")


@pytest.mark.parametrize(("options", "must_preempt"), [
    pytest.param(dict(block_size=1, max_num_batched_tokens=5, num_blocks=60), False, id="block1-budget5"),
    pytest.param(dict(block_size=3, max_num_batched_tokens=1, num_blocks=30), False, id="block3-budget1"),
    pytest.param(dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=1, num_blocks=14), False, id="one-seq"),
    pytest.param(dict(block_size=16, max_num_batched_tokens=17, num_blocks=4), True, id="tight-cache-preempts"),
    pytest.param(dict(block_size=16, max_num_batched_tokens=17, num_blocks=4, enable_prefix_caching=False), True,
                 id="tight-cache-preempts-no-caching"),
    pytest.param(dict(block_size=2, max_num_batched_tokens=7, num_blocks=30, max_num_seqs=3), True,
                 id="block2-3seqs"),
])
def test_awkward_settings_give_the_roomy_engine_tokens(tiny_path, requests_and_references, options, must_preempt):
    requests, references = requests_and_references
    llm = LLM(tiny_path, num_threads=NUM_THREADS, max_model_len=512, **options)
    finished, preempted = run_stepwise(llm, requests)
    for i, expected in enumerate(references):
        out = finished[str(i)].outputs[0]
        assert out.token_ids == expected, f"request {i} under {options}"
        assert out.finish_reason == "length"
    if must_preempt:
        assert preempted, "the tight cache was meant to force preemption"
    assert_no_leak(llm)


def test_request_longer_than_the_whole_cache_ends_on_length(tiny_path, requests_and_references):
    """A sequence may never outgrow the KV cache (it would preempt itself forever): it stops at capacity."""
    requests, references = requests_and_references
    prompt, _, _ = requests[-2]  # 40 tokens
    llm = LLM(tiny_path, num_threads=NUM_THREADS, max_model_len=512, block_size=4, num_blocks=12)  # 48 tokens
    finished, _ = run_stepwise(llm, [(prompt, 100, None), (prompt, 100, None)])
    roomy_llm = LLM(tiny_path, num_threads=NUM_THREADS, max_model_len=512, num_blocks=64)
    roomy = roomy_llm.generate({"prompt_token_ids": prompt}, _params(8, None))[0].outputs[0].token_ids
    for out in finished.values():
        assert len(prompt) + len(out.outputs[0].token_ids) == 48
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == roomy
    assert_no_leak(llm)


def test_num_cached_tokens_never_exceeds_the_prompt_after_preemption(tiny_path):
    """RequestOutput.num_cached_tokens counts *prompt* tokens served from the prefix cache.

    A request preempted after generating is re-admitted with prompt + output tokens, whose
    full blocks are often still cached; those generated tokens are not prompt tokens.
    """
    # 12 blocks of 4 tokens: two 5-token prompts growing to 35 tokens cannot both stay.
    llm = LLM(tiny_path, num_threads=NUM_THREADS, max_model_len=512, block_size=4, num_blocks=12)
    prompts = [[5, 6, 7, 8, 9], [15, 16, 17, 18, 19]]
    finished, preempted = run_stepwise(llm, [(p, 30, None) for p in prompts])
    assert preempted, "the tight cache was meant to force preemption"
    for i, prompt in enumerate(prompts):
        out = finished[str(i)]
        assert len(out.outputs[0].token_ids) == 30
        assert 0 <= out.num_cached_tokens <= len(prompt), (
            f"request {i}: num_cached_tokens={out.num_cached_tokens} but its prompt has {len(prompt)} tokens"
        )
    assert_no_leak(llm)
