"""The serving cluster's routing and failure behaviour, on a tiny model:

- with 2 replicas and groups of requests sharing long prefixes, the prefix-affinity router
  gets a higher prefix-cache hit rate than Serve's default router (the replicas' own counters);
  on multi-turn conversations through the chat API (tokenized by the ingress, routed on the
  caches' own block hashes) it reaches 0.9 of the ideal hit rate, with both replicas in use;
- killing a replica's tensor-parallel worker fails its in-flight streams with UNAVAILABLE,
  flips grpc.health.v1 to NOT_SERVING while the replica rebuilds its engine in place (new workers,
  same replica process), then SERVING again; health answers at once throughout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.bench_chat import run_conversations
from cluster.serving.config import ServingConfig
from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import state_address
from tests.integration.test_serving import post_json

pytestmark = pytest.mark.slow


def deploy(path: str, name: str, **options):
    from ray import serve

    from cluster.serving.app import build_app

    engine = {"model": path, "dtype": "float32", "num_blocks": 512, "block_size": 16, **options.pop("engine", {})}
    config = ServingConfig(app_name=name, replica_num_cpus=1, engine=engine, **options)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return config


def per_replica_stats(name: str, replicas: int) -> dict[str, dict]:
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", name)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # calls carry no prompt: the router spreads them by load
        stats = handle.engine_stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"saw {len(seen)} of {replicas} replicas")


def shared_prefix_workload(seed: int = 0, groups: int = 16) -> list[list[int]]:
    """``groups`` x 6 requests: a 256-token group prefix + a 16-token unique tail, shuffled."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 40000) for _ in range(256)] for _ in range(groups)]
    requests = [p + [rng.randrange(100, 40000) for _ in range(16)] for p in prefixes for _ in range(6)]
    rng.shuffle(requests)
    return requests


def run_workload(address: str, name: str, requests: list[list[int]], concurrency: int = 4) -> None:
    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            gate = asyncio.Semaphore(concurrency)

            async def one(ids):
                async with gate:
                    await stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                           sampling=pb.SamplingParameters(max_tokens=4, temperature=0)),
                                        metadata=(("application", name),))

            await asyncio.gather(*[one(r) for r in requests])

    asyncio.run(main())


def test_prefix_affinity_router_beats_the_default_on_shared_prefixes(serve_cluster, tiny_llama_dir):
    from ray import serve

    path = tiny_llama_dir("llama_untied")
    requests = shared_prefix_workload()
    hit_rates = {}
    for router in ("prefix_affinity", "power_of_two"):
        name = f"router-{router.replace('_', '-')}"
        deploy(path, name, num_replicas=2, router=router, routing_stats_period_s=0.5,
               health_probe_interval_s=60)
        run_workload(serve_cluster[0], name, requests)
        stats = per_replica_stats(name, 2)
        hits = sum(s["prefix_cache_hits"] for s in stats.values())
        queries = sum(s["prefix_cache_queries"] for s in stats.values())
        hit_rates[router] = hits / queries
        if router == "prefix_affinity":
            chat = asyncio.run(run_conversations(serve_cluster[0], name, conversations=6, turns=4, concurrency=3,
                                                 words=30, max_tokens=12, seed=5))
            before, after = stats, per_replica_stats(name, 2)
        serve.delete(name)
    # 16 groups x 6 requests of 272 tokens: at best 5 of every 6 reuse their group's 256-token
    # prefix (one miss a group): 5/6 x 256/272 = 0.784, which the affinity router reaches. Serve's
    # default spreads a group over both replicas (two misses: 0.627) unless by chance it keeps the
    # whole group on one (each group kept adds 0.0098; runs here read 0.627 and 0.637). With 8
    # groups and a margin of 0.1 one CI run failed (it kept 3 of 8, 0.686); now the default would
    # have to keep 7 of 16 groups to close the 0.09 margin.
    assert hit_rates["prefix_affinity"] > 0.9 * (5 / 6) * (256 / 272), hit_rates
    assert hit_rates["prefix_affinity"] > hit_rates["power_of_two"] + 0.09, hit_rates
    ideal = chat.ideal_cached_tokens(16)
    assert ideal > 0.4 * chat.prompt_tokens, (ideal, chat.prompt_tokens)  # later turns repeat earlier ones
    assert chat.cached_tokens >= 0.9 * ideal, (chat.cached_tokens, ideal, chat.prompt_tokens)
    served = [a["prefix_cache_queries"] - before[r]["prefix_cache_queries"] for r, a in after.items()]
    assert min(served) > 0, f"one replica took every conversation: {served}"


def _health(address: str, name: str) -> int:
    """One grpc.health.v1 Check; it must answer within 1 s in every state (it may never queue)."""
    with grpc.insecure_channel(address) as channel:
        started = time.monotonic()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           metadata=(("application", name),), timeout=5).status
        assert time.monotonic() - started < 1.0, "a health check took over 1 s"
        return status


def _wait_for_health(address: str, name: str, status: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(address, name) != status:
        assert time.monotonic() < deadline, f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        time.sleep(0.1)


def _replica_actor_ids(name: str) -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=state_address(), filters=[("state", "=", "ALIVE"),
                                                     ("class_name", "=", f"ServeReplica:{name}:ModelServer")],
                                            raise_on_missing_output=False)}


def _engine_stats(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", name).engine_stats.remote().result(timeout_s=30)


def test_killing_a_tp_worker_fails_streams_unavailable_and_the_replica_restarts_its_engine(
        serve_cluster, tiny_llama_dir):
    from ray import serve
    from ray.util.state import list_actors

    address, name = serve_cluster[0], "tp-failure"
    deploy(tiny_llama_dir("llama3_rope"), name, engine={"tensor_parallel_size": 2}, health_probe_interval_s=1,
           routing_stats_period_s=0.5)
    metadata = (("application", name),)
    request = pb.GenerateRequest(prompt="Once upon a time",
                                 sampling=pb.SamplingParameters(max_tokens=1000, temperature=0, ignore_eos=True))
    short = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParameters(max_tokens=4, temperature=0))
    try:
        _wait_for_health(address, name, health_pb2.HealthCheckResponse.SERVING, 30)
        replicas = _replica_actor_ids(name)
        assert len(replicas) == 1
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            expected = stub.Generate(short, metadata=metadata).text
            stream = stub.GenerateStream(request, metadata=metadata)
            next(stream)
            # An HTTP request in flight too: it must end 503 when the engine dies.
            http = concurrent.futures.ThreadPoolExecutor(1).submit(
                post_json, f"{serve_cluster[1]}/{name}/v1/completions",
                {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True})
            deadline = time.monotonic() + 30
            while _engine_stats(name)["num_running"] < 2:  # both are generating
                assert time.monotonic() < deadline, "the HTTP request never started"
                time.sleep(0.05)
            workers = [a for a in list_actors(address=state_address(), filters=[("class_name", "=", "_RayWorker"), ("state", "=", "ALIVE")],
                                              raise_on_missing_output=False)]
            assert len(workers) == 2
            os.kill(workers[1].pid, signal.SIGKILL)  # as the OOM killer would
            killed = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - killed < 10
            status, body = http.result(timeout=30)
            assert status == 503 and body["error"]["type"] == "service_unavailable", body
            # The replica rebuilds its engine (new workers) in place; health says so, then recovers.
            _wait_for_health(address, name, health_pb2.HealthCheckResponse.NOT_SERVING, 20)
            _wait_for_health(address, name, health_pb2.HealthCheckResponse.SERVING, 120)
            assert stub.Generate(short, metadata=metadata).text == expected
            assert _replica_actor_ids(name) == replicas  # the same replica process: Serve replaced nothing
            alive = list_actors(address=state_address(), filters=[("class_name", "=", "_RayWorker"), ("state", "=", "ALIVE")],
                                raise_on_missing_output=False)
            assert len(alive) == 2 and {w.pid for w in alive}.isdisjoint({w.pid for w in workers})
    finally:
        serve.delete(name)
