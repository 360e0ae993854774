"""Tensor-parallel workers as Ray actors in one placement group.

Start-up reserves ``tp`` bundles (``{"GPU": 1}`` each on GPUs, ``{"CPU": worker_num_cpus}``
on CPU), STRICT_PACK unless configured otherwise, or adopts the placement group this process
already runs in (a Serve replica whose deployment reserved the bundles: the workers take
the last ``tp`` bundles and nothing is reserved twice). It then drives every worker through
the named life cycle of ``Worker``, each step bounded by a timeout and attributed to its
rank on failure.

Per step the driver writes one ``StepDelta`` to rank 0 over a TCP socket (``MessageSocket``:
a Ray call per step costs 2-3x more, measured in docs/benchmarks.md); rank 0 broadcasts it
to the other ranks over a gloo group (``StepChannel``) and answers with the sampled tokens.
Every worker's loop (``serve_driver`` on rank 0, ``run_loop`` on the others) is one Ray call
held open for the group's life: when an actor dies, its call resolves, so a dead worker is
noticed while the driver waits for a step (it polls them between socket reads) or idles (the
keepalive thread). A dead group is torn down at once (actors killed, the placement group
removed if we made it) and every later call raises ``EngineDeadError``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import threading
import time
import uuid
import weakref
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, \
    remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ParallelConfig
from cluster.contracts.runner_output import RunnerOutput
from cluster.contracts.scheduler_output import SchedulerOutput
from cluster.errors import EngineDeadError, InvalidConfigError
from cluster.parallel.executor import Executor
from cluster.parallel.step_delta import StepDelta, StepEncoder
from cluster.parallel.message_socket import ChannelClosed, MessageListener, MessageSocket
from cluster.parallel.worker import STOP, Worker
from cluster.runner.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

# Ranks 1.. wait for the next step inside a gloo broadcast. While the engine is idle the
# executor sends an empty step this often, so that wait never reaches its timeout.
KEEPALIVE_S = 30.0
IDLE_TIMEOUT_S = 10 * KEEPALIVE_S
_GRACE_S = 5.0  # how long shutdown waits for workers to leave their loops before killing them
_POLL_S = 0.5  # while a step runs, how often the driver checks that every worker is still alive


def ensure_ray(min_cpus: float = 0) -> None:
    """Join the cluster RAY_ADDRESS names, or start a private local one (never a stranger's).

    A private cluster gets at least ``min_cpus`` logical CPUs, so a group larger than the
    machine's core count still starts (its ranks then share cores).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
        ray.init(address="local", num_cpus=cpus, log_to_driver=False)


class _RayWorker(Worker):
    """A Worker as an actor: life-cycle steps and the step loop run one at a time; info calls beside them."""

    @ray.method(concurrency_group="info")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="info")
    def parameter_bytes(self) -> int:
        return super().parameter_bytes()


_WorkerActor = ray.remote(concurrency_groups={"info": 1})(_RayWorker)


class RayExecutor(Executor):
    """Drives ``tp`` worker actors; only rank 0 is called per step."""

    def __init__(self, spec: WorkerSpec, parallel: ParallelConfig,
                 placement: PlacementGroup | None = None):
        self.parallel = parallel
        threads = spec.num_threads or max(1, int(parallel.worker_num_cpus))
        self.spec = dataclasses.replace(spec, num_threads=threads)
        self.workers: list = []
        self.placement_group: PlacementGroup | None = None
        self._owns_placement_group = False
        self._watch: list = []  # the workers' loop calls: one resolving means that worker is gone
        self._channel: MessageSocket | None = None
        self._encoder = StepEncoder()
        self._lock = threading.Lock()  # one step (or keepalive) at a time
        self._dead: str | None = None
        self._closed = threading.Event()
        self._last_step = time.monotonic()
        ensure_ray(min_cpus=0 if spec.device == "cuda" else spec.tp_size * parallel.worker_num_cpus)
        try:
            self._start(placement)
        except BaseException:
            self._teardown()
            raise
        # The thread holds only a weak reference: an executor nobody uses any more is collected
        # (and its workers killed) rather than kept alive by its own keepalive.
        self._keepalive = threading.Thread(target=_keep_alive, args=(weakref.ref(self), self._closed),
                                           name="tp-keepalive", daemon=True)
        self._keepalive.start()

    # ---- start-up -----------------------------------------------------------------------

    def _start(self, placement: PlacementGroup | None) -> None:
        tp, parallel = self.spec.tp_size, self.parallel
        bundle = parallel.worker_bundle(self.spec.device)
        placement = placement or get_current_placement_group()
        if placement is None:
            placement = placement_group([bundle] * tp, strategy=parallel.placement_strategy,
                                        name=f"llm-cluster-tp-{uuid.uuid4().hex[:8]}")
            self._owns_placement_group = True
            self.placement_group = placement
            self._await_placement(placement, bundle)
        else:
            self.placement_group = placement
            if len(placement.bundle_specs) < tp:
                raise InvalidConfigError("tensor_parallel_size", (
                    f"{tp} workers need {tp} bundles, but the enclosing placement group has "
                    f"{len(placement.bundle_specs)}: {placement.bundle_specs}"))
        first = len(placement.bundle_specs) - tp  # the enclosing replica's own bundle(s) come first
        on_gpu = self.spec.device == "cuda"
        for rank in range(tp):
            strategy = PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=first + rank)
            options = {"num_cpus": 0 if on_gpu else parallel.worker_num_cpus, "num_gpus": 1 if on_gpu else 0,
                       "scheduling_strategy": strategy, "max_restarts": 0,
                       "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(self.spec.num_threads)}}}
            self.workers.append(_WorkerActor.options(**options).remote(self.spec, rank))
        self.infos = self._call_all("init_device")
        port = self._call_one(0, "rendezvous_port")
        self._call_all("init_process_group", self.infos[0]["ip"], port, parallel.collective_timeout_s,
                       IDLE_TIMEOUT_S)
        self.parameter_bytes = self._call_all("load_model")
        self.kv_cache_bytes = self._call_all("init_kv_cache")  # each rank's KV partition
        listener, token = MessageListener(ray.util.get_node_ip_address()), secrets.token_hex(16)
        self._watch = [self.workers[0].serve_driver.remote(listener.host, listener.port, token,
                                                           parallel.startup_timeout_s)]
        self._watch += [w.run_loop.remote() for w in self.workers[1:]]
        try:
            self._channel = self._accept(listener, token)
        finally:
            listener.close()
        logger.info("tensor-parallel group of %d up: %s", tp,
                    ", ".join(f"rank {i['rank']} pid {i['pid']} on {i['ip']}" for i in self.infos))

    def _accept(self, listener: MessageListener, token: str) -> MessageSocket:
        deadline = time.monotonic() + self.parallel.startup_timeout_s
        while True:
            try:
                return listener.accept(token, _POLL_S)
            except OSError as err:  # socket.timeout is an OSError
                reason = self._describe_death()
                if reason or time.monotonic() > deadline:
                    raise EngineDeadError(f"worker rank 0 did not connect to the driver at {listener.host}:"
                                          f"{listener.port}: {reason or err}") from err

    def _await_placement(self, placement: PlacementGroup, bundle: dict) -> None:
        timeout = self.parallel.startup_timeout_s
        ready, _ = ray.wait([placement.ready()], timeout=timeout)
        if not ready:
            raise InvalidConfigError("tensor_parallel_size", (
                f"could not reserve {self.spec.tp_size} bundles of {bundle} "
                f"({self.parallel.placement_strategy}) within {timeout:g} s; the cluster has "
                f"{ray.cluster_resources()}"))

    def _call_all(self, method: str, *args) -> list:
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        return self._await(refs, method)

    def _call_one(self, rank: int, method: str, *args):
        return self._await([getattr(self.workers[rank], method).remote(*args)], method)[0]

    def _await(self, refs: list, step: str) -> list:
        """Results of one life-cycle step on every rank, or the first rank's failure, typed."""
        timeout = self.parallel.startup_timeout_s
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        results = []
        for rank, ref in enumerate(refs):
            if ref in pending:
                raise EngineDeadError(f"worker rank {rank} did not finish {step} within {timeout:g} s")
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, (InvalidConfigError, ValueError)):
                    raise err.cause from None  # e.g. ModelLoadError: the same error as in-process
                raise EngineDeadError(f"worker rank {rank} failed in {step}: {err.cause!r}") from err
            except ray.exceptions.RayError as err:
                raise EngineDeadError(f"worker rank {rank} died in {step}: {err}") from err
        return results

    # ---- steps --------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        with self._lock:
            self._check_alive()
            return self._run(("step", self._encoder.encode(out)))

    def collective_rpc(self, method: str, *args) -> Any:
        with self._lock:
            self._check_alive()
            return self._run(("rpc", method, *args))

    def _run(self, message: tuple):
        """Send one message to rank 0 and wait for its answer, watching every worker meanwhile."""
        try:
            self._channel.send(message)
            deadline = time.monotonic() + self.parallel.step_timeout_s
            while not self._channel.readable(_POLL_S):
                if self._watch_fired():
                    self._die(self._describe_death())
                if time.monotonic() > deadline:
                    self._die(f"a step took longer than step_timeout_s={self.parallel.step_timeout_s:g}")
            status, result = self._channel.recv()
        except (OSError, ChannelClosed) as err:
            self._die(self._describe_death(wait_s=_GRACE_S) or f"the step channel to rank 0 failed: {err}")
        if status != "ok":
            self._die(f"worker rank 0 failed: {result}")
        self._last_step = time.monotonic()
        return result

    def _watch_fired(self) -> bool:
        ready, _ = ray.wait(self._watch, num_returns=1, timeout=0)
        return bool(ready)

    def _describe_death(self, wait_s: float = 0.0) -> str | None:
        """Which worker's loop ended, and why (waiting up to ``wait_s`` for Ray to learn of it)."""
        ready, _ = ray.wait(self._watch, num_returns=1, timeout=wait_s)
        if not ready:
            return None
        rank = self._watch.index(ready[0])
        try:
            ray.get(ready[0])
            return f"worker rank {rank} left its step loop"
        except ray.exceptions.RayError as err:
            return f"worker rank {rank} died: {_cause(err)}"

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the tensor-parallel group is dead: {self._dead}")
        if self._closed.is_set():
            raise EngineDeadError("the executor was shut down")

    def _die(self, reason: str):
        logger.error("tensor-parallel group failed: %s", reason)
        self._dead = reason
        self._teardown()
        raise EngineDeadError(f"the tensor-parallel group is dead: {reason}")

    # ---- health -------------------------------------------------------------------------

    def is_healthy(self) -> bool:
        if self._dead is not None or self._closed.is_set() or not self._watch:
            return False
        return not self._watch_fired()

    def _tick(self) -> bool:
        """Idle: refresh the ranks' broadcast wait, and tear down a group that lost a worker.

        Returns False once the group is dead or shut down (the keepalive thread then ends).
        """
        with self._lock:
            if self._dead is not None or self._closed.is_set():
                return False
            try:
                if self._watch_fired():
                    self._die(self._describe_death())
                if time.monotonic() - self._last_step >= KEEPALIVE_S:
                    self._run(("step", StepDelta()))
            except EngineDeadError:
                return False
            return True

    # ---- shutdown -----------------------------------------------------------------------

    def __del__(self):
        try:
            self._closed.set()
            self._teardown()
        except Exception:  # interpreter exit: Ray may already be gone
            pass

    def shutdown(self) -> None:
        """Stop the ranks' loops and leave their process groups, then kill them (a hung group: at once)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._dead is None and self._lock.acquire(timeout=_GRACE_S):
            try:
                self._channel.send((STOP,))
                ray.wait(self._watch, num_returns=len(self._watch), timeout=_GRACE_S)
                ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers),
                         timeout=_GRACE_S)
            except (OSError, ray.exceptions.RayError):
                pass
            finally:
                self._lock.release()
        self._teardown()

    def _teardown(self) -> None:
        """Kill every worker and remove the placement group we reserved (idempotent)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        workers, self.workers = self.workers, []
        for worker in workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # already gone
                pass
        if self._owns_placement_group and self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass
            self._owns_placement_group = False
        self._watch = []


def _keep_alive(executor_ref, closed: threading.Event) -> None:
    while not closed.wait(KEEPALIVE_S / 3):
        executor = executor_ref()
        if executor is None or not executor._tick():
            return
        del executor


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    return repr(cause) if cause is not None else str(err).strip().splitlines()[0]
