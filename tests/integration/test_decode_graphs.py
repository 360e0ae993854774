"""Decode graphs (cluster/runner/decode_graphs.py) without a GPU: the same padded, bucketed path runs
eagerly (``capture=False``), so the persistent buffers, the padding rows and the bucket choice are
checked here; the capture itself is checked by `make gpu-check` on a GPU."""

from __future__ import annotations

import pytest

from tests.conftest import assert_no_leak

from cluster.llm import LLM
from cluster.runner.decode_graphs import bucket_sizes
from cluster.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("max_batch, sizes", [(1, [1]), (20, [1, 2, 4, 8, 16, 20]),
                                              (64, [1, 2, 4, 8, 16, 32, 48, 64])])
def test_bucket_sizes(max_batch, sizes):
    assert bucket_sizes(max_batch) == sizes


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)]


def test_padded_bucketed_decode_gives_the_eager_tokens(tiny_llama_dir):
    path = tiny_llama_dir("llama_untied")
    options = dict(model=path, dtype="float32", attention_backend="triton", block_size=4, max_num_batched_tokens=32)
    eager, graphed = LLM(**options), LLM(**options)
    runner = graphed.engine.executor.worker.runner
    runner.enable_decode_graphs(max_batch=6, capture=False)
    graphs = runner.graphs
    assert graphs.sizes == [1, 2, 4, 6]
    # 5 decodes pad to the bucket of 6; 3 to 4; 7 do not fit (eager until some finish, then graphed:
    # requests switch paths mid-stream); one alone needs no padding.
    for prompts in ([[100 + 7 * i + j for j in range(3 + 5 * i)] for i in range(5)],
                    [[300 + i, 301, 302 + 2 * i] for i in range(3)],
                    [[500 + 11 * i + j for j in range(2 + i)] for i in range(7)],
                    [[42, 43, 44, 45, 46]]):
        before = graphs.num_replays
        assert _greedy(graphed, prompts) == _greedy(eager, prompts)
        assert graphs.num_replays > before
    assert_no_leak(graphed)


def test_decode_graphs_need_the_triton_backend(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir("llama_untied"), dtype="float32", attention_backend="torch")
    with pytest.raises(ValueError, match="triton"):
        llm.engine.executor.worker.runner.enable_decode_graphs(max_batch=4, capture=False)


def test_no_graphs_are_planned_off_cuda(tiny_llama_dir):
    llm = LLM(model=tiny_llama_dir("llama_untied"), dtype="float32", attention_backend="triton")
    assert llm.engine.plan.worker_spec(llm.engine.config).decode_graph_batch == 0
    assert llm.engine.executor.worker.runner.graphs is None
