"""Which executor runs a group: ``parallel.executor`` ("auto": in-process at tp=1, Ray above)."""

from __future__ import annotations

from cluster.config import ParallelConfig
from cluster.parallel.executor import Executor
from cluster.runner.worker_spec import WorkerSpec


def create_executor(spec: WorkerSpec, parallel: ParallelConfig) -> Executor:
    """The executor ``parallel.executor`` names ("auto": in-process at tp=1, Ray above)."""
    kind = parallel.executor
    if kind == "auto":
        kind = "in_process" if spec.tp_size == 1 else "ray"
    if kind == "in_process":
        from cluster.parallel.in_process_executor import InProcessExecutor

        return InProcessExecutor(spec, parallel)
    from cluster.parallel.ray_executor import RayExecutor

    return RayExecutor(spec, parallel)
