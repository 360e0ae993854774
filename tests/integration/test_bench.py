"""`llm-cluster bench`'s measures of our engine, on a tiny model: they count what they claim."""

from __future__ import annotations

from tests.conftest import assert_no_leak

from cluster.bench import BURST_OUTPUT_RATIO, BURST_PROMPT_LEN_RANGE, Workload, cpu_summary, engine_burst, \
    make_burst_workload, malloc_summary


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


def test_malloc_summary_names_the_preloaded_allocator_and_its_conf(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    assert malloc_summary() == "glibc"  # MALLOC_CONF alone configures nothing
    monkeypatch.setenv("LD_PRELOAD", "/x/libiomp5.so:/venv/lib/libjemalloc.so.2")
    assert malloc_summary() == "libjemalloc.so.2 (MALLOC_CONF=dirty_decay_ms:-1)"


def test_bench_spec_measures_every_method_on_the_same_tokens(tiny_llama_dir, capsys):
    """`llm-cluster bench-spec` end to end on a tiny float32 model: every scenario and method gets a
    figure, greedy outputs equal speculation off (float32 is exact), and the structured table runs."""
    import random

    from cluster import LLM, SamplingParams
    from cluster.bench_spec import batched, extraction_prompt, single_stream
    from cluster.cli import main

    import torch

    model = tiny_llama_dir("llama3_rope")
    args = ["bench-spec", "--model", model, "--dtype", "float32", "--repeats", "1", "--single-requests", "1",
            "--streams", "2", "--max-tokens", "8", "--threads", "1", "--prompt-tokens", "100,300"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:  # --threads is process-wide: the rest of the suite must not run on one thread
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith(("copy lines", "as JSON", "random tokens"))]
    assert len(table) == 4 * 3, out  # four scenarios x off, ngram, suffix
    assert "schema compile: median" in out and "mask ms/step" in out
    llms = [LLM(model, dtype="float32", enable_prefix_caching=False, speculative=spec)
            for spec in (None, {"method": "ngram", "num_tokens": 4, "prompt_lookup_min": 1})]
    tokenizer = llms[0].get_tokenizer()
    prompts = [extraction_prompt(tokenizer, random.Random(1), min_tokens=100, max_tokens=200) for _ in range(2)]
    assert all(100 < len(p) <= 260 for p in prompts)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = [single_stream(llm, prompts, params) for llm in llms] + [batched(llm, prompts, params) for llm in llms]
    assert runs[0].tokens == runs[1].tokens and runs[2].tokens == runs[3].tokens
    assert all(run.decode_tok_s > 0 and sum(map(len, run.tokens)) == 24 for run in runs)
    assert runs[1].drafted >= runs[1].accepted and runs[0].drafted == 0
    for llm in llms:
        assert_no_leak(llm)
        llm.engine.shutdown()
