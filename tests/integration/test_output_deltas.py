"""Outputs as deltas: per step the frontend handles and hands on only what is new, so its work does
not grow with the output; the deltas join to exactly the text and tokens of the final output."""

from __future__ import annotations

import pickle
import statistics
import time

from cluster.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.outputs import RequestOutputKind
from cluster.sampling_params import SamplingParams

NUM_TOKENS = 2000
PARAMS = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True, logprobs=1,
                        stop=["\x00 never generated"])  # a stop string: the holdback path runs every step


def _run(engine: LLMEngine, request_id: str, kind: RequestOutputKind):
    """Step one request to the end; per step: the outputs' pickled size and the frontend's own time."""
    core_step = engine.core.step
    core_s = [0.0]

    def timed_core_step():
        started = time.perf_counter()
        try:
            return core_step()
        finally:
            core_s[0] += time.perf_counter() - started

    engine.core.step = timed_core_step
    try:
        engine.add_request(request_id, {"prompt_token_ids": [1, 5, 9, 13]}, PARAMS, kind)
        outputs, sizes, frontend_s = [], [], []
        while engine.has_unfinished_requests():
            core_s[0] = 0.0
            started = time.perf_counter()
            step = engine.step()
            frontend_s.append(time.perf_counter() - started - core_s[0])
            sizes.append(len(pickle.dumps(step)))
            outputs += step
        return outputs, sizes, frontend_s
    finally:
        engine.core.step = core_step


def test_a_2000_token_stream_costs_the_same_per_step_at_its_end_as_at_its_start(tiny_llama_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(model=tiny_llama_dir("llama_long"), num_blocks=256,
                                                block_size=16, num_threads=2))
    try:
        deltas, sizes, frontend_s = _run(engine, "delta", RequestOutputKind.DELTA)
        cumulative, cumulative_sizes, _ = _run(engine, "cumulative", RequestOutputKind.CUMULATIVE)
    finally:
        engine.shutdown()

    final = cumulative[-1].outputs[0]
    assert final.num_generated_tokens == NUM_TOKENS and len(final.token_ids) == NUM_TOKENS
    # The deltas join to the final output, token for token and character for character.
    assert [t for out in deltas for t in out.outputs[0].token_ids] == final.token_ids
    assert "".join(out.outputs[0].text for out in deltas) == final.text
    assert [lp.token_id for out in deltas for lp in out.outputs[0].logprobs] == final.token_ids
    assert deltas[-1].finished and deltas[-1].outputs[0].num_generated_tokens == NUM_TOKENS

    first, last = sizes[:100], sizes[-101:-1]  # the final step carries the finish: left out
    assert statistics.median(last) <= statistics.median(first) * 1.1 + 64, (first[:5], last[-5:])
    # The same measure sees cumulative outputs grow with the output (so the bound above can fail).
    assert statistics.median(cumulative_sizes[-101:-1]) > 10 * statistics.median(cumulative_sizes[:100])
    # Frontend time per step (the step minus the core's part): flat, with a generous bound for a busy box.
    early, late = statistics.median(frontend_s[:100]), statistics.median(frontend_s[-101:-1])
    assert late < 3 * early + 200e-6, f"frontend per step: first 100 {early * 1e6:.0f} us, last 100 {late * 1e6:.0f} us"
