"""One tensor-parallel rank, driven through a fixed life cycle of named steps.

    init_device -> init_process_group -> load_model -> init_kv_cache -> execute ... -> shutdown

The in-process executor calls these on a plain object (rank 0 of 1); the Ray executor calls
them on one actor per placement-group bundle, one step at a time, so a failure names the
step and the rank it happened in. Each rank loads only its own slices of the checkpoint and
allocates only its own KV heads.

Under the Ray executor the driver sends each step to rank 0 only (``serve_driver``, over a
socket); rank 0 broadcasts it to the other ranks, which wait for it in ``run_loop``. Both are
one long-running call per worker for the group's whole life.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch

from cluster.contracts.runner_output import RunnerOutput
from cluster.parallel.step_channel import StepChannel
from cluster.parallel.step_delta import StepDecoder, StepDelta
from cluster.distributed.tp_group import TPGroup
from cluster.runner.worker_spec import WorkerSpec

logger = logging.getLogger(__name__)

STOP = "stop"  # broadcast by rank 0 to end the other ranks' run_loop
_RPC = "rpc"  # (_RPC, method, args): every rank calls the method


class Worker:
    """Holds one rank's device, process group, weight shard and KV-cache partition."""

    def __init__(self, spec: WorkerSpec, rank: int = 0):
        self.spec = spec
        self.rank = rank
        self.tp = TPGroup()
        self.channel: StepChannel | None = None
        self.runner = None
        self.decoder = StepDecoder()
        self.steps_done: list[str] = []

    # ---- life cycle ---------------------------------------------------------------------

    def init_device(self) -> dict:
        """Pick the device and thread count; report where this rank runs."""
        spec = self.spec
        if spec.device == "cuda":
            # Ray exposes the bundle's GPU as CUDA_VISIBLE_DEVICES; the rank uses the first one it sees.
            torch.cuda.set_device(0)
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        if spec.device == "cpu" and spec.onednn_cache_capacity is not None:
            bound_onednn_caches(spec.onednn_cache_capacity)
        self.steps_done.append("init_device")
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "ip": _node_ip(), "threads": torch.get_num_threads(), "device": spec.device}

    def rendezvous_port(self) -> int:
        """A free TCP port on this node (rank 0 hosts the process-group rendezvous)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_process_group(self, master_addr: str, master_port: int, timeout_s: float,
                           idle_timeout_s: float) -> None:
        """Join the group: nccl for the model's collectives on CUDA, gloo otherwise.

        ``timeout_s`` bounds the rendezvous and every collective inside a step; the step
        broadcast gets ``idle_timeout_s``, since ranks 1.. wait in it while the engine is idle.
        """
        size = self.spec.tp_size
        if size > 1:
            backend = "nccl" if self.spec.device == "cuda" else "gloo"
            torch.distributed.init_process_group(
                backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank, world_size=size,
                timeout=timedelta(seconds=timeout_s))
            compute = torch.distributed.group.WORLD
            control = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=idle_timeout_s))
            self.tp = TPGroup(self.rank, size, compute)
            self.channel = StepChannel(control)
        self.steps_done.append("init_process_group")

    def load_model(self) -> int:
        """Build this rank's model from its checkpoint slices; return its parameter bytes."""
        from cluster.runner.model_runner import ModelRunner

        self.runner = ModelRunner(self.spec, self.tp)
        self.steps_done.append("load_model")
        return self.parameter_bytes()

    def init_kv_cache(self) -> int:
        """Allocate this rank's KV heads for every block; return the bytes allocated."""
        nbytes = self.runner.init_kv_cache()
        self.steps_done.append("init_kv_cache")
        return nbytes

    def execute_step(self, delta: StepDelta) -> RunnerOutput | None:
        """Rank 0: hand the step to the other ranks, then run it; returns the sampled tokens."""
        if self.channel is not None:
            self.channel.send(delta)
        return self.runner.execute(self.decoder.decode(delta))

    def collective_rpc(self, method: str, *args):
        """Rank 0: have every rank call ``method(*args)`` (e.g. ``score``); returns rank 0's result."""
        if self.channel is not None:
            self.channel.send((_RPC, method, args))
        return getattr(self, method)(*args)

    def serve_driver(self, host: str, port: int, token: str, timeout_s: float) -> None:
        """Rank 0 under the Ray executor: take steps from the driver's socket until it says stop.

        Replies ("ok", result) per message; on a failure replies ("error", text) and re-raises,
        since a group whose step failed half-way cannot continue.
        """
        from cluster.parallel.message_socket import ChannelClosed, MessageSocket

        channel = MessageSocket.connect(host, port, token, timeout_s)
        try:
            while True:
                try:
                    kind, *payload = channel.recv()
                except ChannelClosed:
                    return  # the driver went away: its executor is gone
                if kind == STOP:
                    self.stop_loop()
                    channel.send(("ok", None))
                    return
                try:
                    result = self.execute_step(*payload) if kind == "step" else self.collective_rpc(*payload)
                except Exception as err:
                    channel.send(("error", f"{type(err).__name__}: {err}"))
                    raise
                channel.send(("ok", result))
        finally:
            channel.close()

    def run_loop(self) -> None:
        """Ranks 1..: run every step rank 0 broadcasts until it broadcasts STOP."""
        while True:
            message = self.channel.recv()
            if isinstance(message, StepDelta):
                self.runner.execute(self.decoder.decode(message))
            elif message == STOP:
                return
            else:
                _, method, args = message
                getattr(self, method)(*args)

    def stop_loop(self) -> None:
        """Rank 0: release the other ranks from run_loop."""
        if self.channel is not None:
            self.channel.send(STOP)

    def shutdown(self) -> None:
        self.runner = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.steps_done.append("shutdown")

    # ---- introspection ------------------------------------------------------------------

    def parameter_bytes(self) -> int:
        """Bytes of this rank's parameters (its shard plus the replicated norms)."""
        return sum(p.numel() * p.element_size() for p in self.runner.model.parameters())

    def time_all_reduce(self, numel: int, iterations: int) -> float:
        """Median seconds of one all-reduce of ``numel`` model-dtype values (a collective; for benchmarks)."""
        import time

        x = torch.zeros(numel, dtype=next(self.runner.model.parameters()).dtype, device=self.runner.device)
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.tp.all_reduce(x)
            samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    def score(self, token_ids: list[int], chunk_tokens: int | None = None):
        """Logits for every position of ``token_ids`` (rank 0; None elsewhere). A collective.
        ``chunk_tokens``: see ``ModelRunner.score``."""
        return self.runner.score(token_ids, chunk_tokens)


def bound_onednn_caches(capacity: int) -> None:
    """Cap oneDNN's primitive cache and ideep's computation cache, keyed by input shape: with a new
    batch shape nearly every step, their default 1,024 entries each grew a replica's memory by
    about 0.3 MB per request for hundreds of requests (docs/reliability.md). They read these
    variables once, at their first use in the process, which is after this (before the weights are
    packed); a value the operator set is kept."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
