"""Tensor-parallel workers as Ray actors in one placement group.

Start-up reserves ``tp`` bundles (``{"GPU": 1}`` each on GPUs, ``{"CPU": worker_num_cpus}``
on CPU), STRICT_PACK unless configured otherwise, or adopts the placement group this process
already runs in (a Serve replica whose deployment reserved the bundles: the workers take
the last ``tp`` bundles and nothing is reserved twice). It then drives every worker through
the named life cycle of ``Worker``, each step bounded by a timeout and attributed to its
rank on failure.

Per step the driver makes one Ray call, to rank 0, carrying a ``StepDelta``; rank 0
broadcasts it to the other ranks over a gloo group (``StepChannel``) and returns the
sampled tokens. Every worker also holds a "sentinel" call open for its whole life: when an
actor dies, its sentinel resolves, so a dead worker is noticed within one ``ray.wait``
whether the engine is mid-step or idle. A dead group is torn down at once (actors killed,
the placement group removed if we made it) and every later call raises ``EngineDeadError``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, \
    remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ParallelConfig
from cluster.engine.runner_output import RunnerOutput
from cluster.engine.scheduler_output import SchedulerOutput
from cluster.errors import EngineDeadError, InvalidConfigError
from cluster.parallel.executor import Executor
from cluster.parallel.step_delta import StepDelta, StepEncoder
from cluster.parallel.worker import Worker
from cluster.parallel.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

# Ranks 1.. wait for the next step inside a gloo broadcast. While the engine is idle the
# executor sends an empty step this often, so that wait never reaches its timeout.
KEEPALIVE_S = 30.0
IDLE_TIMEOUT_S = 10 * KEEPALIVE_S
_GRACE_S = 5.0  # how long shutdown waits for workers to leave their loops before killing them


def worker_bundle(parallel: ParallelConfig, device: str) -> dict[str, float]:
    """Resources one worker reserves (the serving layer builds a deployment's bundles from it)."""
    return {"GPU": 1.0} if device == "cuda" else {"CPU": float(parallel.worker_num_cpus)}


def ensure_ray() -> None:
    """Join the cluster RAY_ADDRESS names, or start a private local one (never a stranger's)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=False)


class _RayWorker(Worker):
    """A Worker as an actor: steps run one at a time; watch calls run beside them."""

    def __init__(self, spec: WorkerSpec, rank: int):
        super().__init__(spec, rank)
        self._released = threading.Event()

    @ray.method(concurrency_group="sentinel")
    def sentinel(self) -> None:
        """Held open for the worker's life; resolves (with an error) only when the actor dies."""
        self._released.wait()

    @ray.method(concurrency_group="info")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="info")
    def parameter_bytes(self) -> int:
        return super().parameter_bytes()


_WorkerActor = ray.remote(concurrency_groups={"sentinel": 1, "info": 1})(_RayWorker)


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
        self._watch: list = []  # refs that resolve only when a worker dies: sentinels, run_loops
        self._encoder = StepEncoder()
        self._lock = threading.Lock()  # one step (or keepalive) at a time
        self._dead: str | None = None
        self._closed = threading.Event()
        self._last_step = time.monotonic()
        ensure_ray()
        try:
            self._start(placement)
        except BaseException:
            self._teardown()
            raise
        self._keepalive = threading.Thread(target=self._keep_alive, name="tp-keepalive", daemon=True)
        self._keepalive.start()

    # ---- start-up -----------------------------------------------------------------------

    def _start(self, placement: PlacementGroup | None) -> None:
        tp, parallel = self.spec.tp_size, self.parallel
        bundle = worker_bundle(parallel, self.spec.device)
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
        self._watch = [w.sentinel.remote() for w in self.workers]
        port = self._call_one(0, "rendezvous_port")
        self._call_all("init_process_group", self.infos[0]["ip"], port, parallel.collective_timeout_s,
                       IDLE_TIMEOUT_S)
        self.parameter_bytes = self._call_all("load_model")
        self._call_all("init_kv_cache")
        self._watch += [w.run_loop.remote() for w in self.workers[1:]]
        logger.info("tensor-parallel group of %d up: %s", tp,
                    ", ".join(f"rank {i['rank']} pid {i['pid']} on {i['ip']}" for i in self.infos))

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
            return self._run("execute_step", self._encoder.encode(out))

    def collective_rpc(self, method: str, *args) -> Any:
        with self._lock:
            self._check_alive()
            return self._run("collective_rpc", method, *args)

    def _run(self, method: str, *args):
        ref = getattr(self.workers[0], method).remote(*args)
        ready, _ = ray.wait([ref] + self._watch, num_returns=1, timeout=self.parallel.step_timeout_s)
        if not ready:
            self._die(f"a step took longer than step_timeout_s={self.parallel.step_timeout_s:g}")
        if ready[0] is not ref:
            self._die(self._describe_death(ready[0]))
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            self._die(f"worker rank 0 failed in {method}: {_cause(err)}")
        self._last_step = time.monotonic()
        return result

    def _describe_death(self, ref) -> str:
        index = self._watch.index(ref)
        rank = index if index < len(self.workers) else index - len(self.workers) + 1
        try:
            ray.get(ref)
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
        ready, _ = ray.wait(self._watch, num_returns=1, timeout=0)
        return not ready

    def _keep_alive(self) -> None:
        """Idle: refresh the ranks' broadcast wait, and tear down a group that lost a worker."""
        while not self._closed.wait(KEEPALIVE_S / 3):
            with self._lock:
                if self._dead is not None or self._closed.is_set():
                    return
                try:
                    if not self.is_healthy():
                        ready, _ = ray.wait(self._watch, num_returns=1, timeout=0)
                        self._die(self._describe_death(ready[0]))
                    if time.monotonic() - self._last_step >= KEEPALIVE_S:
                        self._run("execute_step", StepDelta())
                except EngineDeadError:
                    return

    # ---- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the ranks' loops and leave their process groups, then kill them (a hung group: at once)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._dead is None and self._lock.acquire(timeout=_GRACE_S):
            try:
                self.workers[0].stop_loop.remote()
                ray.wait(self._watch[len(self.workers):], num_returns=len(self.workers) - 1, timeout=_GRACE_S)
                ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers),
                         timeout=_GRACE_S)
            except ray.exceptions.RayError:
                pass
            finally:
                self._lock.release()
        self._teardown()

    def _teardown(self) -> None:
        """Kill every worker and remove the placement group we reserved (idempotent)."""
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


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    return repr(cause) if cause is not None else str(err).strip().splitlines()[0]
