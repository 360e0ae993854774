"""The executor contract: run a scheduled step on the tensor-parallel group, return rank 0's samples.

``InProcessExecutor`` (in_process_executor.py) runs the single rank of tp=1 in this process;
``RayExecutor`` (ray_executor.py) runs one worker actor per rank in a Ray placement group;
``create_executor`` (executors.py) picks one. Both send workers the same ``StepDelta`` messages
and drive the same ``Worker`` life cycle, so the in-process path exercises everything but the
transport.
"""

from __future__ import annotations

import abc
from typing import Any

from cluster.contracts.runner_output import RunnerOutput
from cluster.contracts.scheduler_output import SchedulerOutput


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
