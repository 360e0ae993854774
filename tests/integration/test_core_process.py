"""The engine core in its own process: the same tokens as in-process, and a frontend that survives
the core. Killing the core (SIGKILL) or hanging it (SIGSTOP, caught by the step timeout) under
streaming load ends every in-flight request with EngineDeadError at once; a new core starts, the
test's process (the frontend's) is the same, and the new core holds no KV blocks."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from cluster.config import EngineConfig
from cluster.engine.async_engine import AsyncLLMEngine
from cluster.engine.llm_engine import LLMEngine
from cluster.errors import EngineDeadError
from cluster.outputs import RequestOutputKind
from cluster.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
STEP_TIMEOUT_S = 4


def _config(tiny_llama_dir) -> EngineConfig:
    return EngineConfig.from_kwargs(model=tiny_llama_dir("llama_tied"), dtype="float32", num_blocks=256,
                                    max_num_seqs=16, num_threads=1, step_timeout_s=STEP_TIMEOUT_S)


def _generate_all(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, GREEDY, RequestOutputKind.FINAL_ONLY)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step()})
    return [done[f"r{i}"] for i in range(len(prompts))]


PROMPTS = [[1, 5, 9, 13 + i] for i in range(4)]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    engine = LLMEngine(_config(tiny_llama_dir))
    try:
        return _generate_all(engine, PROMPTS)
    finally:
        engine.shutdown()


@pytest.fixture
def async_engine(tiny_llama_dir):
    engine = AsyncLLMEngine(LLMEngine(_config(tiny_llama_dir), core_process=True), restart_backoff_s=0.1)
    yield engine
    engine.shutdown()


def test_the_core_process_generates_what_the_in_process_core_does(tiny_llama_dir, reference):
    engine = LLMEngine(_config(tiny_llama_dir), core_process=True)
    try:
        assert engine.core.pid != os.getpid()
        assert _generate_all(engine, PROMPTS) == reference
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"]
    finally:
        engine.shutdown()


def test_the_counters_show_blocks_freed_by_aborts_once_the_engine_is_idle(tiny_llama_dir):
    """An abort that leaves the core idle frees blocks no step reports: the frontend keeps stepping
    until the core's counters include it, so routing, metrics and autoscaling never see them held."""
    engine = LLMEngine(_config(tiny_llama_dir), core_process=True)
    try:
        for i, ids in enumerate(PROMPTS):
            engine.add_request(f"a{i}", {"prompt_token_ids": ids}, LONG, RequestOutputKind.DELTA)
        tokens = dict.fromkeys([f"a{i}" for i in range(len(PROMPTS))], 0)
        while min(tokens.values()) < 2:
            for out in engine.step():
                tokens[out.request_id] += len(out.outputs[0].token_ids)
        held = engine.stats()
        assert held["num_running"] == len(PROMPTS) and held["num_free_blocks"] < held["num_blocks"], held
        for request_id in tokens:
            assert engine.abort(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"], stats
    finally:
        engine.shutdown()


def test_an_abandoned_stream_leaves_the_counters_idle(async_engine):
    """A consumer that stops reading mid-stream (a client gone) aborts its request; with nothing
    else to run, the engine's counters still come back to all blocks free."""
    async def abandon(i):
        async for out in async_engine.generate({"prompt_token_ids": [1, 7, 200 + i]}, LONG, f"gone{i}",
                                               kind=RequestOutputKind.DELTA):
            if out.outputs[0].token_ids:
                break

    async def run():
        await asyncio.wait_for(asyncio.gather(*(abandon(i) for i in range(3))), 120)
        deadline = time.monotonic() + 60
        while True:
            stats = async_engine.engine.stats()
            if stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"]:
                return stats
            if time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.05)

    stats = asyncio.run(run())
    assert stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"], stats


def _wait_serving(engine: AsyncLLMEngine, timeout_s: float = 60) -> float:
    started = time.monotonic()
    while not engine.is_serving:
        assert time.monotonic() - started < timeout_s, engine.why_not_serving
        time.sleep(0.05)
    return time.monotonic() - started


async def _stream_until_failure(engine: AsyncLLMEngine, n: int, on_all_streaming) -> list[tuple]:
    """n long streams; once each has a token, call on_all_streaming; each stream's end: (kind, seconds after)."""
    first = [asyncio.Event() for _ in range(n)]
    fired_at: list[float] = []

    async def one(i):
        try:
            async for _ in engine.generate({"prompt_token_ids": [1, 7, 100 + i]}, LONG, f"s{i}",
                                           kind=RequestOutputKind.DELTA):
                first[i].set()
            return "finished", None
        except EngineDeadError as err:
            return str(err), time.monotonic() - fired_at[0]

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first)), 120)
    fired_at.append(time.monotonic())
    on_all_streaming()
    return await asyncio.wait_for(asyncio.gather(*tasks), 120)


@pytest.mark.parametrize("sig, cause", [(signal.SIGKILL, "SIGKILL"), (signal.SIGSTOP, "step_timeout_s")])
def test_a_killed_or_hung_core_fails_its_requests_at_once_and_a_new_core_serves(async_engine, reference, sig,
                                                                               cause):
    old_pid = async_engine.engine.core.pid
    results = asyncio.run(_stream_until_failure(async_engine, 16, lambda: os.kill(old_pid, sig)))
    bound_s = 2.0 if sig == signal.SIGKILL else STEP_TIMEOUT_S + 2.0
    assert all(cause in why for why, _ in results), results[:3]
    assert max(after for _, after in results) < bound_s, sorted(after for _, after in results)[-3:]
    recovered_s = _wait_serving(async_engine)
    assert recovered_s < 30, recovered_s
    new_pid = async_engine.engine.core.pid
    assert new_pid != old_pid and async_engine.num_restarts == 1
    stats = async_engine.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"] and not stats["num_waiting"]

    async def again():
        outs = []
        for i, ids in enumerate(PROMPTS):
            out = [o async for o in async_engine.generate({"prompt_token_ids": ids}, GREEDY, f"again{i}",
                                                          kind=RequestOutputKind.FINAL_ONLY)]
            outs.append(out[-1].outputs[0].token_ids)
        return outs

    assert asyncio.run(again()) == reference
