"""The frontend's handle on an ``EngineCore`` running in its own process.

It has the core's interface (add, abort, step, stats, restart, shutdown), so ``LLMEngine`` runs on
either. Commands go out at once over a local socket; ``step()`` returns the deltas of every step
the core has finished since the last call, waiting for one when none has arrived yet. Meanwhile
the core keeps stepping: detokenizing and streaming overlap the model's next step instead of
sharing its GIL.

The process is watched: if it exits (SIGKILL, a segfault in a native kernel, an OOM kill) or
sends no step for ``step_timeout_s`` while requests are live (a hang, e.g. SIGSTOP), ``step()``
raises ``EngineDeadError`` naming the cause, with the process killed. The frontend then fails the
in-flight requests and calls ``restart()``, which starts a new process from the same plan; the
process that holds the frontend (a Serve replica) stays up.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import time

from cluster.config import EngineConfig
from cluster.contracts.core_output import CoreOutput
from cluster.contracts.core_request import CoreRequest
from cluster.engine import core_process as proto
from cluster.engine.plan import EnginePlan
from cluster.engine.sequence import FinishReason
from cluster.errors import EngineDeadError, ModelLoadError
from cluster.parallel.message_socket import ChannelClosed, MessageListener, MessageSocket

logger = logging.getLogger(__name__)

_POLL_S = 0.2  # while waiting for a step, how often the process is checked


class CoreClient:
    """An ``EngineCore`` in a child process (tensor_parallel_size 1)."""

    def __init__(self, config: EngineConfig, plan: EnginePlan):
        self.config = config
        self.plan = plan
        self.step_timeout_s = config.parallel.step_timeout_s
        self.startup_timeout_s = config.parallel.startup_timeout_s
        self.process = None
        self._channel: MessageSocket | None = None
        self._start()

    # ---- the process ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _start(self) -> None:
        self._live: set[str] = set()  # sent to the core and not yet finished or aborted
        self._stats: dict = {}
        self._aborts_sent = 0
        self._aborts_seen = 0  # of those, taken in by the core as of ``_stats``
        self._dead: str | None = None
        listener, token = MessageListener("127.0.0.1"), secrets.token_hex(16)
        context = multiprocessing.get_context("spawn")  # no inherited threads, locks or CUDA state
        self.process = context.Process(
            target=proto.run_core_process, name="llm-engine-core", daemon=True,
            args=(self.config, self.plan, listener.host, listener.port, token, self.startup_timeout_s))
        self.process.start()
        try:
            self._channel = self._accept(listener, token)
            self._await_ready()
        except BaseException:
            self._kill()
            raise
        finally:
            listener.close()
        logger.info("engine core process %d ready", self.process.pid)

    def _accept(self, listener: MessageListener, token: str) -> MessageSocket:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                return listener.accept(token, _POLL_S)
            except OSError as err:
                if not self.process.is_alive():
                    raise EngineDeadError(f"the engine core process exited at start "
                                          f"(exit code {self.process.exitcode})") from err
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"the engine core process did not connect within "
                                          f"{self.startup_timeout_s:g} s") from err

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._channel.readable(_POLL_S):
            if not self.process.is_alive():
                raise EngineDeadError(f"the engine core process exited while loading "
                                      f"(exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"the engine core was not ready within {self.startup_timeout_s:g} s")
        kind, *payload = self._channel.recv()
        if kind == proto.FAILED:
            raise ModelLoadError(f"the engine core could not start: {payload[0]}")
        if kind != proto.READY:
            raise EngineDeadError(f"the engine core sent {kind!r} before it was ready")
        self._stats = payload[1]

    def is_healthy(self) -> bool:
        return self._dead is None and self.process is not None and self.process.is_alive()

    def _die(self, reason: str) -> None:
        self._dead = reason
        self._kill()
        raise EngineDeadError(reason)

    def _kill(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        process, self.process = self.process, None
        if process is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)  # a stopped (SIGSTOP) process dies of this too
        if process is not None:
            process.join(timeout=10)

    def _why_dead(self) -> str:
        code = self.process.exitcode if self.process is not None else None
        if code is not None and code < 0:
            return f"the engine core process was killed by {signal.Signals(-code).name}"
        return f"the engine core process exited (exit code {code})"

    # ---- the core's interface -----------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self._live)

    def add(self, request: CoreRequest) -> None:
        self._send((proto.ADD, request))
        self._live.add(request.request_id)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> bool:
        if request_id not in self._live:
            return False
        self._live.discard(request_id)
        self._send((proto.ABORT, request_id, reason.value))
        self._aborts_sent += 1
        return True

    def has_unfinished_requests(self) -> bool:
        """Live requests, or aborts whose freed blocks the counters do not show yet: either way the
        frontend must step (an idle frontend reads nothing, so stale counters would stay)."""
        return bool(self._live) or self._aborts_seen < self._aborts_sent

    def step(self) -> list[CoreOutput]:
        """The deltas of every step the core finished since the last call (waits for one, or with
        nothing live for the counters that follow the last abort)."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if not self.has_unfinished_requests():
            self._drain(wait=False)
            return []
        return self._drain(wait=True)

    def _drain(self, wait: bool) -> list[CoreOutput]:
        outputs: list[CoreOutput] = []
        if wait:
            started = time.monotonic()
            while not self._channel.readable(_POLL_S):
                if not self.process.is_alive():
                    self._die(self._why_dead())
                if time.monotonic() - started > self.step_timeout_s:
                    self._die(f"the engine core sent no step for {self.step_timeout_s:g} s "
                              f"(step_timeout_s); it was killed")
        try:
            while self._channel.readable(0):
                kind, *payload = self._channel.recv()
                if kind == proto.STEP:
                    outputs += payload[0]
                    self._stats, self._aborts_seen = payload[1], payload[2]
                elif kind == proto.STATS:
                    self._stats, self._aborts_seen = payload
                elif kind == proto.DEAD:
                    self._die(f"the engine core failed: {payload[0]}")
        except (ChannelClosed, OSError):
            self.process.join(timeout=2)
            self._die(self._why_dead())
        for out in outputs:
            if out.finish_reason is not None:
                self._live.discard(out.request_id)
        return outputs

    def _send(self, message: tuple) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            self._channel.send(message)
        except OSError:
            self._die(self._why_dead())

    def stats(self) -> dict:
        """The core's counters as of its last message (every step sends them), and its process id."""
        return {**self._stats, "core_pid": self.pid}

    def restart(self) -> list[str]:
        """Kill the process (if it is not dead already) and start a new one from the same plan."""
        lost = list(self._live)
        self._kill()
        self._start()
        return lost

    def shutdown(self) -> None:
        if self._channel is not None and self._dead is None:
            try:
                self._channel.send((proto.STOP,))
            except OSError:
                pass
            if self.process is not None:
                self.process.join(timeout=5)
        self._kill()
