"""Executors run a scheduled step on the tensor-parallel group and return the driver's samples.

``InProcessExecutor`` runs the single rank of tp=1 in this process (tests, laptops);
``RayExecutor`` (cluster/parallel/ray_executor.py) runs one worker actor per rank in a Ray
placement group. Both send workers the same ``StepDelta`` messages and drive the same
``Worker`` life cycle, so the in-process path exercises everything but the transport.
"""

from __future__ import annotations

import abc
from typing import Any

from cluster.config import ParallelConfig
from cluster.engine.runner_output import RunnerOutput
from cluster.engine.scheduler_output import SchedulerOutput
from cluster.parallel.step_delta import StepEncoder
from cluster.parallel.worker import Worker
from cluster.parallel.worker_spec import WorkerSpec


class Executor(abc.ABC):
    """The seam between the engine (decides) and the workers (mirror and compute)."""

    @abc.abstractmethod
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step on every rank; return rank 0's sampled tokens."""

    @abc.abstractmethod
    def collective_rpc(self, method: str, *args) -> Any:
        """Call a ``Worker`` method on every rank at once; return rank 0's result."""

    def is_healthy(self) -> bool:
        """False once any worker has died; cheap and safe to call from any thread."""
        return True

    @property
    def can_rerun_steps(self) -> bool:
        """Whether a step that raised can be run again (in parts) to find the request at fault.
        False where a failed step leaves the group unusable (ranks stopped mid-collective)."""
        return False

    def shutdown(self) -> None:
        """Release workers and their resources (idempotent)."""


class InProcessExecutor(Executor):
    """One rank, in this process."""

    def __init__(self, spec: WorkerSpec, parallel: ParallelConfig | None = None):
        if spec.tp_size != 1:
            raise ValueError(f"the in-process executor runs tensor_parallel_size 1, got {spec.tp_size}")
        self.encoder = StepEncoder()
        self.worker = Worker(spec)
        self.worker.init_device()
        self.worker.init_process_group("127.0.0.1", 0, timeout_s=0, idle_timeout_s=0)  # a no-op at size 1
        self.worker.load_model()
        self.worker.init_kv_cache()

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute_step(self.encoder.encode(out))

    @property
    def can_rerun_steps(self) -> bool:
        return self.worker is not None  # one rank, no collectives: a raised step leaves nothing half-done

    def collective_rpc(self, method: str, *args) -> Any:
        return self.worker.collective_rpc(method, *args)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.runner = None
            self.worker = None


def create_executor(spec: WorkerSpec, parallel: ParallelConfig) -> Executor:
    """The executor ``parallel.executor`` names ("auto": in-process at tp=1, Ray above)."""
    kind = parallel.executor
    if kind == "auto":
        kind = "in_process" if spec.tp_size == 1 else "ray"
    if kind == "in_process":
        return InProcessExecutor(spec, parallel)
    from cluster.parallel.ray_executor import RayExecutor

    return RayExecutor(spec, parallel)
