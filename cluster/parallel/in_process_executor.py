"""tp=1 in this process (tests, laptops, the offline API): one ``Worker``, no transport."""

from __future__ import annotations

from typing import Any

from cluster.config import ParallelConfig
from cluster.contracts.runner_output import RunnerOutput
from cluster.contracts.scheduler_output import SchedulerOutput
from cluster.parallel.executor import Executor
from cluster.parallel.step_delta import StepEncoder
from cluster.parallel.worker import Worker
from cluster.runner.worker_spec import WorkerSpec


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
