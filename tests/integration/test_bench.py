"""`llm-cluster bench`'s measures of our engine, on a tiny model: they count what they claim."""

from __future__ import annotations

from tests.conftest import assert_no_leak

from cluster.bench import BURST_OUTPUT_RATIO, BURST_PROMPT_LEN_RANGE, Workload, cpu_summary, engine_burst, \
    make_burst_workload


def test_burst_workload_is_prefill_heavy_and_seeded():
    work = make_burst_workload(8, vocab_size=49152, seed=3)
    assert work.prompts == make_burst_workload(8, vocab_size=49152, seed=3).prompts
    for prompt, out in zip(work.prompts, work.output_lens):
        assert BURST_PROMPT_LEN_RANGE[0] <= len(prompt) <= BURST_PROMPT_LEN_RANGE[1]
        assert out == len(prompt) // BURST_OUTPUT_RATIO and all(100 <= t < 49152 for t in prompt)


def test_engine_burst_times_every_requests_first_token(tiny_llama_dir):
    from cluster import LLM

    llm = LLM(model=tiny_llama_dir("llama3_rope"), dtype="float32", max_num_batched_tokens=64)
    try:
        work = Workload([[200 + i for i in range(n)] for n in (40, 90, 20)], [3, 5, 2])
        ttfts, tokens_per_s = engine_burst(llm, work)
        assert len(ttfts) == 3 and all(t > 0 for t in ttfts) and tokens_per_s > 0
        # 64 tokens a step: the 90-token prompt needs chunks after the first step, so its first token
        # comes later than the 40-token prompt's, which was scheduled first.
        assert ttfts[1] > ttfts[0]
        assert_no_leak(llm)
    finally:
        llm.engine.shutdown()


def test_cpu_summary_names_the_cpu_and_its_cores():
    summary = cpu_summary()
    assert "cores" in summary and summary.split(",")[0]
