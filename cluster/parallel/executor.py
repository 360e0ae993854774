"""Executors run a scheduled step on the tensor-parallel group and return the driver's samples.

``InProcessExecutor`` runs a single rank in this process (tp=1: tests, laptops).
"""

from __future__ import annotations

import abc

import torch

from cluster.engine.runner_output import RunnerOutput
from cluster.engine.scheduler_output import SchedulerOutput
from cluster.parallel.tp_group import TPGroup
from cluster.parallel.worker_spec import WorkerSpec
from cluster.runner.model_runner import ModelRunner


class Executor(abc.ABC):
    """The seam between the engine (decides) and the workers (mirror and compute)."""

    @abc.abstractmethod
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step on every rank; return rank 0's sampled tokens."""

    def is_healthy(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Release workers and their resources (idempotent)."""


class InProcessExecutor(Executor):
    """One rank, in this process."""

    def __init__(self, spec: WorkerSpec):
        if spec.tp_size != 1:
            raise ValueError(f"the in-process executor runs tensor_parallel_size 1, got {spec.tp_size}")
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.runner = ModelRunner(spec, TPGroup())

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(out)

    def shutdown(self) -> None:
        self.runner = None
