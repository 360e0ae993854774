"""An asyncio front for LLMEngine: the engine steps on its own thread; callers await outputs.

``generate()`` yields cumulative RequestOutputs and aborts the request (freeing its
KV blocks) when the consumer stops iterating, is cancelled, or the engine dies.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from cluster.config import EngineConfig
from cluster.engine.input_processor import PromptType
from cluster.engine.llm_engine import LLMEngine
from cluster.errors import EngineDeadError, InvalidRequestError
from cluster.outputs import RequestOutput
from cluster.sampling_params import SamplingParams

_IDLE_WAIT_S = 0.05  # how long the idle engine thread sleeps between command checks


class AsyncLLMEngine:
    """Thread-backed asyncio wrapper; all engine state is touched on the engine thread only."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, coalesce: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; validation errors raise before anything is queued.

        With ``coalesce`` a consumer that fell behind gets only the newest output (outputs are
        cumulative, so nothing is lost): fewer, larger messages when the server is busy.
        """
        self._check_alive()
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        state = self.engine.prepare_request(request_id, prompt, params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", state))
        finished = False
        try:
            self._check_alive()  # the thread may have died after the first check
            while not finished:
                item = await stream.get()
                while coalesce and not isinstance(item, BaseException) and not item.finished and not stream.empty():
                    item = stream.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request from outside its stream (e.g. a client disconnect)."""
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # ---- engine thread -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine died: {self._dead!r}")

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
        except BaseException as err:  # any step failure kills every in-flight request, loudly
            self._dead = err
            self._fail_all(EngineDeadError(f"the engine died: {err!r}"))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, payload) -> None:
        if kind == "abort":
            self.engine.abort(payload)
            return
        request_id = payload.seq.request_id
        if request_id not in self._streams:  # the caller went away before the add landed
            return
        try:
            self.engine.add_prepared(payload)
        except Exception as err:  # e.g. queue full: the caller sees it; the engine keeps serving
            loop, stream = self._streams[request_id]
            loop.call_soon_threadsafe(stream.put_nowait, err)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                target[0].call_soon_threadsafe(target[1].put_nowait, out)

    def _fail_all(self, error: EngineDeadError) -> None:
        for loop, stream in list(self._streams.values()):
            loop.call_soon_threadsafe(stream.put_nowait, error)
