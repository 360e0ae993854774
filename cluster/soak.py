"""``llm-cluster soak``: hold N concurrent gRPC streams against a served app for a while and watch
the processes' memory.

It starts a private local Ray cluster with the app (or uses ``--server HOST:PORT`` and the Ray
cluster at ``--address``), keeps ``--streams`` streams busy for ``--minutes`` with seeded prompts
of varied length, and samples the resident memory of the model-server replica, the ingress and the
proxy every ``--sample-s``. It reports requests completed, errors by status code, and each
process's RSS growth after the first minute (warm-up: KV pages, caches, lazily loaded code),
which must stay under ``--max-growth`` (3%) for the soak to pass.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from dataclasses import dataclass, field

APP = "llm-cluster-soak"
WARMUP_S = 60.0  # growth is measured from the first sample after this


@dataclass
class SoakReport:
    """What a soak measured."""

    requests: int = 0
    output_tokens: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)  # status code -> count
    rss_mb: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # process -> (t_s, MB)

    def growth(self, name: str) -> float:
        """RSS growth of one process from its first sample after warm-up to its last, as a fraction."""
        samples = [mb for t, mb in self.rss_mb[name] if t >= WARMUP_S]
        return samples[-1] / samples[0] - 1.0 if len(samples) >= 2 else float("nan")


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _process_pids(app: str) -> dict[str, int]:
    """The pids of the app's model-server replica, its ingress and the (first) proxy."""
    import ray
    from ray.util.state import list_actors

    classes = {"model server": f"ServeReplica:{app}:ModelServer", "ingress": f"ServeReplica:{app}:Ingress",
               "proxy": "ProxyActor"}
    pids = {}
    for name, class_name in classes.items():
        actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
                             raise_on_missing_output=False)
        if actors:
            pids[name] = actors[0].pid
    return pids


def _prompts(seed: int) -> list[list[int]]:
    """Token-id prompts of 40-400 tokens, all different (no prefix-cache hits between them)."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(100, 40000) for _ in range(rng.randrange(40, 400))] for _ in range(4096)]


async def _stream_loop(stub, prompts, index: collections.Counter, stop_at: float, max_tokens: int,
                       report: SoakReport, metadata) -> None:
    import grpc

    from cluster.v1 import generation_pb2 as pb

    while time.monotonic() < stop_at:
        index["next"] += 1
        ids = prompts[index["next"] % len(prompts)]
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(
            max_tokens=max_tokens, temperature=0.8, seed=index["next"], ignore_eos=True))
        try:
            async for message in stub.GenerateStream(request, metadata=metadata):
                report.output_tokens += len(message.token_ids)
            report.requests += 1
        except grpc.aio.AioRpcError as err:
            report.errors[err.code().name] += 1


async def _sampler(report: SoakReport, pids: dict[str, int], started: float, stop_at: float, every_s: float) -> None:
    while True:
        now = time.monotonic()
        for name, pid in pids.items():
            mb = _rss_mb(pid)
            if mb is not None:
                report.rss_mb.setdefault(name, []).append((now - started, mb))
        if now >= stop_at:
            return
        await asyncio.sleep(min(every_s, max(0.0, stop_at - now)))


async def _soak(address: str, application: str, args, pids: dict[str, int]) -> SoakReport:
    import grpc

    from cluster.v1 import generation_pb2_grpc as pb_grpc

    report, prompts, index = SoakReport(), _prompts(args.seed), collections.Counter()
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    metadata = (("application", application),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        streams = [_stream_loop(stub, prompts, index, stop_at, args.max_tokens, report, metadata)
                   for _ in range(args.streams)]
        await asyncio.gather(_sampler(report, pids, started, stop_at, args.sample_s), *streams)
    return report


def print_report(report: SoakReport, args) -> bool:
    """Print the figures; True when there were no errors and no process grew past the bound."""
    print(f"\n{report.requests} requests, {report.output_tokens} output tokens in {args.minutes:g} min, "
          f"{args.streams} streams; errors: {dict(report.errors) or 'none'}")
    passed = not report.errors
    for name, samples in report.rss_mb.items():
        growth = report.growth(name)
        ok = growth < args.max_growth
        passed &= ok
        trace = " ".join(f"{mb:.0f}" for _, mb in samples[:: max(1, len(samples) // 12)])
        print(f"  {name:13s} RSS {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MB; after the first minute "
              f"{growth * 100:+.2f}% ({'ok' if ok else 'over'} {args.max_growth * 100:g}%); samples: {trace}")
    print("PASS" if passed else "FAIL")
    return passed


def run_soak(args) -> int:
    import ray
    from ray import serve

    from cluster.serving.serve_start import prepare_environment, start_serve

    if args.server:
        ray.init(address=args.address or "auto", log_to_driver=False)
        report = asyncio.run(_soak(args.server, args.application, args, _process_pids(args.application)))
        return 0 if print_report(report, args) else 1
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.serving.app import GRPC_SERVICER_FUNCTIONS, build_app
    from cluster.serving.config import ServingConfig

    cores = os.cpu_count() or 1
    prepare_environment()
    ray.init(address="local", num_cpus=max(cores, 4), log_to_driver=False)
    try:
        start_serve(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                    grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        config = ServingConfig(app_name=APP, replica_num_cpus=cores,
                               engine={"model": args.model, "dtype": args.dtype})
        serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
        pids = _process_pids(APP)
        print(f"soak: {args.model} {args.dtype}, {args.streams} streams x {args.max_tokens} tokens for "
              f"{args.minutes:g} min; processes {pids}", flush=True)
        report = asyncio.run(_soak(f"127.0.0.1:{args.grpc_port}", APP, args, pids))
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0 if print_report(report, args) else 1
