"""AsyncLLMEngine: streaming, abort when the consumer stops, errors raised to the caller."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.config import EngineConfig
from cluster.engine.async_engine import AsyncLLMEngine
from cluster.engine.llm_engine import LLMEngine
from cluster.errors import EngineDeadError, InvalidRequestError, RequestFailedError
from cluster.sampling_params import SamplingParams

from tests.conftest import assert_no_leak

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def async_engine(tiny_llama_dir):
    config = EngineConfig.from_kwargs(model=tiny_llama_dir("llama_tied"), num_blocks=64, num_threads=2)
    engine = AsyncLLMEngine(LLMEngine(config))
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, request_id=None):
    return [out async for out in engine.generate(prompt, params, request_id)]


def test_stream_is_cumulative_and_matches_sync(async_engine):
    outs = asyncio.run(_collect(async_engine, {"prompt_token_ids": [1, 2, 3, 4]}, GREEDY))
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 13))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].finish_reason == "length"
    sync = LLMEngine(async_engine.engine.config)
    sync.add_request("s", {"prompt_token_ids": [1, 2, 3, 4]}, GREEDY)
    final = None
    while sync.has_unfinished_requests():
        final = (sync.step() or [final])[-1]
    assert final.outputs[0].token_ids == outs[-1].outputs[0].token_ids


def test_concurrent_streams(async_engine):
    async def main():
        prompts = [{"prompt_token_ids": [1, 5 + i, 9]} for i in range(8)]
        return await asyncio.gather(*(_collect(async_engine, p, GREEDY) for p in prompts))

    results = asyncio.run(main())
    assert all(r[-1].finished and len(r[-1].outputs[0].token_ids) == 12 for r in results)
    assert len({r[-1].request_id for r in results}) == 8


def test_consumer_break_aborts_and_frees_blocks(async_engine):
    engine, aborted = async_engine.engine, []
    abort = engine.abort

    def spy_abort(request_id):  # runs on the engine thread
        aborted.append((request_id, abort(request_id)))
        return aborted[-1][1]

    engine.abort = spy_abort

    async def main():
        # 500 tokens: far more than the stream gets before the break lands, so the request is still
        # running when it is aborted (finishing on its own would leave nothing to free).
        params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        async for out in async_engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "stop-early"):
            if len(out.outputs[0].token_ids) >= 3:
                break
        for _ in range(100):  # the abort lands on the engine thread
            if not async_engine.engine.has_unfinished_requests():
                return
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert aborted == [("stop-early", True)], "breaking out of the stream did not abort the live request"
    assert_no_leak(async_engine.engine)


def test_bad_input_raises_in_caller_and_engine_keeps_serving(async_engine):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        asyncio.run(_collect(async_engine, "hello", SamplingParams(max_tokens=0)))
    with pytest.raises(InvalidRequestError, match="prompt"):
        asyncio.run(_collect(async_engine, "", GREEDY))
    outs = asyncio.run(_collect(async_engine, "hello", GREEDY))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12


def test_a_step_failure_fails_its_request_and_a_dead_executor_restarts_the_engine(async_engine):
    execute = async_engine.engine.executor.execute

    def boom(_):
        raise RuntimeError("kernel refused the input")

    async_engine.engine.executor.execute = boom  # nobody else in the step: the fault is pinned on it
    with pytest.raises(RequestFailedError, match="kernel refused the input"):
        asyncio.run(_collect(async_engine, "hello", GREEDY))
    async_engine.engine.executor.execute = execute
    assert async_engine.is_serving and async_engine.num_restarts == 0
    assert asyncio.run(_collect(async_engine, "hello", GREEDY))[-1].finished

    def dead(_):
        raise EngineDeadError("worker lost")

    async_engine.engine.executor.execute = dead  # a dead worker: no request to blame, rebuild
    with pytest.raises(EngineDeadError, match="worker lost"):
        asyncio.run(_collect(async_engine, "hello", GREEDY))
    deadline = time.monotonic() + 60
    while not async_engine.is_serving:
        assert time.monotonic() < deadline, async_engine.why_not_serving
        time.sleep(0.05)
    assert async_engine.num_restarts == 1
    assert asyncio.run(_collect(async_engine, "hello", GREEDY))[-1].finished  # a new executor, without the fault


def test_duplicate_request_id_is_refused_without_disturbing_the_first(async_engine):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        first = async_engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "dup")
        out = await first.__anext__()
        with pytest.raises(InvalidRequestError, match="request_id"):
            await _collect(async_engine, "hello", GREEDY, "dup")
        rest = [o async for o in first]
        return [out] + rest

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 30


def test_paced_streams_send_fewer_messages_with_every_token_and_cancel_cleanly(tiny_llama_dir):
    """With stream_messages_per_s, coalescing streams yield at most every n / rate seconds: fewer
    messages, the same tokens, the final at once; a stream cancelled while it waits for its turn is
    aborted in the engine (its blocks freed)."""
    from cluster.outputs import RequestOutputKind

    config = EngineConfig.from_kwargs(model=tiny_llama_dir("llama_tied"), num_blocks=64, num_threads=2)
    engine = AsyncLLMEngine(LLMEngine(config), stream_messages_per_s=10.0)  # one stream: every 0.1 s
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompt = {"prompt_token_ids": [1, 2, 3, 4]}

    async def stream(paced: bool):
        outs = [o async for o in engine.generate(prompt, params, coalesce=paced, kind=RequestOutputKind.DELTA)]
        return [t for o in outs for t in o.outputs[0].token_ids], len(outs)

    async def cancel_while_waiting():
        gen = engine.generate(prompt, long_params, coalesce=True, kind=RequestOutputKind.DELTA)
        first = await gen.__anext__()  # the next yield waits ~0.1 s for its turn
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.03)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gen.aclose()
        return first

    long_params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    try:
        plain_tokens, plain_messages = asyncio.run(stream(False))
        started = time.monotonic()
        paced_tokens, paced_messages = asyncio.run(stream(True))
        assert paced_tokens == plain_tokens and plain_messages == 48
        # A tiny model makes a token in a few ms: 48 tokens take well under the 4.8 s that pacing
        # the messages to 10 a second would take if it held each token back.
        assert paced_messages <= 1 + (time.monotonic() - started) / 0.1 + 1 < plain_messages
        asyncio.run(cancel_while_waiting())
        deadline = time.monotonic() + 30
        while engine.engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "the cancelled stream was never aborted"
            time.sleep(0.01)
        assert_no_leak(engine.engine)
    finally:
        engine.shutdown()
