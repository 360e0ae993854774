"""An asyncio front for LLMEngine: the engine steps on its own thread; callers await outputs.

``generate()`` yields RequestOutputs (cumulative by default; deltas for streaming servers) and
aborts the request (freeing its KV blocks) when the consumer stops iterating or is cancelled.

Faults are contained at two levels. A fault the engine can pin on requests ends only those
(``RequestFailedError``, raised from their ``generate()``); everyone else goes on. A fault it
cannot pin (a dead tensor-parallel worker, a step that fails for every request) fails every
in-flight request with ``EngineDeadError`` at once and rebuilds the engine in place, with backoff;
``is_serving`` is False until it is back. Only when every rebuild fails does the engine stop for
good (``is_running`` False), and the replica holding it is replaced.

Admission is decided here, on the caller's event loop and never behind a running step: beyond
``max_num_seqs + max_waiting_requests`` requests in flight a new one gets ``QueueFullError`` at
once, with a retry hint from the measured completion rate.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from cluster.config import EngineConfig
from cluster.engine.input_processor import PromptType
from cluster.engine.llm_engine import LLMEngine
from cluster.errors import EngineDeadError, InvalidRequestError, QueueFullError, RequestFailedError
from cluster.outputs import RequestOutput, RequestOutputKind, merge_deltas
from cluster.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long the idle engine thread waits for a command before checking its workers
_RATE_WINDOW = 64  # completions remembered for the retry hint
_MAX_RETRY_AFTER_S = 60.0
_MAX_STREAM_INTERVAL_S = 0.5  # pacing never holds a stream's tokens back longer than this


class AsyncLLMEngine:
    """Thread-backed asyncio wrapper; all engine state is touched on the engine thread only."""

    def __init__(self, engine: LLMEngine, max_restarts: int = 5, restart_backoff_s: float = 1.0,
                 stream_messages_per_s: float | None = None):
        self.engine = engine
        # Coalescing streams share this many messages per second: with n in flight each yields at
        # most every n / stream_messages_per_s seconds (a final output at once). None: no pacing.
        self.stream_messages_per_s = stream_messages_per_s
        self.max_restarts = max_restarts  # consecutive failed rebuilds before giving up
        self.restart_backoff_s = restart_backoff_s  # doubled after each failed rebuild
        self.num_restarts = 0  # successful rebuilds so far
        sched = engine.config.scheduler
        waiting = sched.max_waiting_requests
        self.capacity = None if waiting is None else sched.max_num_seqs + waiting  # requests in flight at most
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None  # set when the engine cannot be rebuilt: for good
        self._restarting: str | None = None  # why, while the engine is being rebuilt
        self._finish_times: collections.deque[float] = collections.deque(maxlen=_RATE_WINDOW)
        self.step_started_s: float | None = None  # monotonic start of the step running now
        self.last_step_end_s = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    # ---- state ---------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """False once the engine has stopped for good (every rebuild failed, or shut down)."""
        return self._dead is None and self._thread.is_alive()

    @property
    def is_serving(self) -> bool:
        """Running and not rebuilding: a new request can be served."""
        return self.is_running and self._restarting is None

    @property
    def why_not_serving(self) -> str | None:
        if self._dead is not None:
            return f"the engine stopped: {self._dead!r}"
        if not self._thread.is_alive():
            return "the engine thread stopped"
        if self._restarting is not None:
            return f"the engine is restarting after a fault: {self._restarting}"
        return None

    def step_running_for_s(self) -> float:
        """How long the step in progress has run (0 when none is): a hung step shows here."""
        started = self.step_started_s
        return 0.0 if started is None else time.monotonic() - started

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- requests ------------------------------------------------------------------------------

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, coalesce: bool = False,
                       bypass_admission: bool = False,
                       kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; validation and admission errors raise before anything is queued.

        With ``coalesce`` a consumer that fell behind gets what is queued as one output (the newest
        cumulative one, or the deltas merged): fewer, larger messages when the server is busy.
        ``bypass_admission`` is for the health probe, which must not be refused as traffic.
        """
        self._check_serving()
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        if not bypass_admission:
            self._admit()
        if params is not None and params.structured_outputs is not None:
            # Compiling a new constraint can take seconds: off the event loop (health, streams).
            state = await asyncio.to_thread(self.engine.prepare_request, request_id, prompt, params, kind)
            if request_id in self._streams:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        else:
            state = self.engine.prepare_request(request_id, prompt, params, kind)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", state))
        finished = False
        loop = asyncio.get_running_loop()
        next_yield_s = 0.0
        try:
            self._check_serving()  # the engine may have failed after the first check
            while not finished:
                item = await stream.get()
                while coalesce and _is_partial(item) and not stream.empty():
                    item = _merged(item, stream.get_nowait(), kind)
                # Paced: a partial output waits for its stream's turn, taking in what arrives meanwhile.
                # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # lands as the inner get completes, and a cancelled stream then ran on unaborted.)
                while coalesce and _is_partial(item) and (wait_s := next_yield_s - loop.time()) > 0:
                    try:
                        async with asyncio.timeout(wait_s):
                            newer = await stream.get()
                    except TimeoutError:
                        break
                    item = _merged(item, newer, kind)
                if coalesce and self.stream_messages_per_s:
                    next_yield_s = loop.time() + min(_MAX_STREAM_INTERVAL_S,
                                                     len(self._streams) / self.stream_messages_per_s)
                if isinstance(item, BaseException):
                    finished = True  # the engine has dropped it already
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(request_id, item.error)
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request from outside its stream (e.g. a client disconnect)."""
        self._commands.put(("abort", request_id))

    def request_restart(self, reason: str) -> None:
        """Have the engine thread rebuild the engine (e.g. a health probe found it broken)."""
        self._commands.put(("restart", reason))

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _check_serving(self) -> None:
        reason = self.why_not_serving
        if reason is not None:
            raise EngineDeadError(reason)

    def _admit(self) -> None:
        if self.capacity is not None and len(self._streams) >= self.capacity:
            raise QueueFullError(f"{len(self._streams)} requests are in flight, the most this replica "
                                 f"takes (max_num_seqs + max_waiting_requests = {self.capacity})",
                                 retry_after_s=self._retry_after_s())

    def _retry_after_s(self) -> float:
        """When a slot is likely to free: one completion's time at the recent completion rate."""
        times = list(self._finish_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 1.0
        per_request_s = (times[-1] - times[0]) / (len(times) - 1)
        return round(min(_MAX_RETRY_AFTER_S, max(1.0, per_request_s)), 1)

    # ---- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain_commands(block=not self.engine.has_unfinished_requests())
                if not self.engine.is_healthy():
                    raise EngineDeadError("the engine core or a tensor-parallel worker died")
                if self.engine.has_unfinished_requests():
                    self._step()
            except Exception as err:  # noqa: BLE001 - a fault no request could be blamed for
                self.step_started_s = None
                if not self._recover(err):
                    return
            except BaseException as err:
                self._dead = err
                self._fail_all(EngineDeadError(f"the engine stopped: {err!r}"))
                raise

    def _step(self) -> None:
        self.step_started_s = time.monotonic()
        outputs = self.engine.step()
        self.step_started_s = None
        self.last_step_end_s = time.monotonic()
        self._deliver(outputs)

    def _recover(self, err: BaseException) -> bool:
        """Fail every in-flight request, rebuild the engine; False if it cannot be rebuilt."""
        logger.error("engine fault; failing %d in-flight requests and restarting the engine",
                     len(self._streams), exc_info=err)
        self._restarting = repr(err)
        self._fail_all(EngineDeadError(f"the engine failed and is restarting: {err!r}"))
        for attempt in range(self.max_restarts):
            try:
                self.engine.restart()
            except Exception:  # noqa: BLE001 - retried with backoff, then given up
                logger.exception("engine restart %d of %d failed", attempt + 1, self.max_restarts)
                if self._stopping.wait(self.restart_backoff_s * 2**attempt):
                    return False
                continue
            self.num_restarts += 1
            self.last_step_end_s = time.monotonic()
            self._restarting = None
            logger.warning("engine restarted (%d restarts so far)", self.num_restarts)
            return True
        self._dead = err
        self._restarting = None
        return False

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
        if kind == "restart":
            raise EngineDeadError(payload)
        request_id = payload.request_id
        if request_id not in self._streams:  # the caller went away before the add landed
            return
        try:
            self.engine.add_prepared(payload)
        except Exception as err:  # e.g. queue full: the caller sees it; the engine keeps serving
            self._send(request_id, err)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop, not one per output.
        A busy step has an output for every running request (64 and more); a callback each flooded
        the loop (and its self-pipe) with work that delayed everything else on it: cancellations,
        health checks, stats (tests/integration/test_overload.py)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            if out.finished:
                self._finish_times.append(time.monotonic())
            target = self._streams.get(out.request_id)
            if target is not None:
                batches.setdefault(target[0], []).append((out.request_id, target[1], out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the callers' event loop has closed: nobody is listening
                for request_id, _, _ in items:
                    self._streams.pop(request_id, None)

    def _fail_all(self, error: EngineDeadError) -> None:
        for request_id in list(self._streams):
            self._send(request_id, error)

    def _send(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        try:
            target[0].call_soon_threadsafe(target[1].put_nowait, item)
        except RuntimeError:  # the caller's event loop has closed: nobody is listening
            self._streams.pop(request_id, None)


def _put_all(items: list[tuple[str, asyncio.Queue, RequestOutput]]) -> None:
    for _, stream, item in items:
        stream.put_nowait(item)


def _is_partial(item) -> bool:
    return not isinstance(item, BaseException) and not item.finished


def _merged(item: RequestOutput, newer, kind: RequestOutputKind):
    """One output for two queued ones: deltas add up; a cumulative output or an error replaces."""
    if isinstance(newer, BaseException) or kind is not RequestOutputKind.DELTA:
        return newer
    return merge_deltas(item, newer)
