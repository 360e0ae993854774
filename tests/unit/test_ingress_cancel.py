"""The ingress cancels its replica call itself when its caller goes away (a closed stream, a
cancelled task), not only through Serve's recursive cancellation, which misses some."""

from __future__ import annotations

import asyncio
import types

import pytest

from cluster.serving.ingress import Ingress


class _Responses:
    """A model-server stream: two chunks at once, then one that never comes."""

    def __init__(self):
        self.cancelled = False
        self.sent = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent < 2:
            self.sent += 1
            return f"chunk{self.sent}"
        await asyncio.Event().wait()  # the engine is still generating

    def cancel(self):
        self.cancelled = True


def _ingress(responses: _Responses):
    async def tokenized(request):
        return request

    generate = types.SimpleNamespace(remote=lambda request: responses)
    server = types.SimpleNamespace(options=lambda **_: types.SimpleNamespace(generate=generate))
    return types.SimpleNamespace(server=server, _in_flight=0, _admit=lambda: None, _tokenized=tokenized)


def test_closing_the_stream_at_a_chunk_cancels_the_replica_call():
    responses = _Responses()
    ingress = _ingress(responses)

    async def run():
        stream = Ingress._stream(ingress, "request")
        assert await stream.__anext__() == "chunk1"
        assert ingress._in_flight == 1
        await stream.aclose()  # the caller is gone while this stream waits at a yield

    asyncio.run(run())
    assert responses.cancelled and ingress._in_flight == 0


def test_cancelling_the_caller_while_it_waits_cancels_the_replica_call():
    responses = _Responses()
    ingress = _ingress(responses)

    async def consume():
        return [chunk async for chunk in Ingress._stream(ingress, "request")]

    async def run():
        task = asyncio.create_task(consume())
        while responses.sent < 2:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert responses.cancelled and ingress._in_flight == 0


def test_a_stream_that_ends_cancels_nothing():
    class _Finite(_Responses):
        async def __anext__(self):
            if self.sent < 2:
                self.sent += 1
                return f"chunk{self.sent}"
            raise StopAsyncIteration

    responses = _Finite()
    ingress = _ingress(responses)

    async def run():
        return [chunk async for chunk in Ingress._stream(ingress, "request")]

    assert asyncio.run(run()) == ["chunk1", "chunk2"]
    assert not responses.cancelled and ingress._in_flight == 0


def test_a_failing_cancel_does_not_replace_the_callers_cancellation():
    class _Broken(_Responses):
        def cancel(self):
            raise RuntimeError("the router is gone")

    responses = _Broken()
    ingress = _ingress(responses)

    async def run():
        stream = Ingress._stream(ingress, "request")
        await stream.__anext__()
        await stream.aclose()  # GeneratorExit goes through; the failed cancel is only logged

    asyncio.run(run())
    assert ingress._in_flight == 0
