"""Smoke check: PrefixAffinityRouter under real Ray Serve (2 trivial replicas, no model, no HTTP)."""

from __future__ import annotations

import pytest

from cluster.serving.engine_request import EngineRequest

from tests.conftest import start_local_ray

ROUTER_PATH = "cluster.serving.router:PrefixAffinityRouter"


@pytest.fixture(scope="module")
def serve_on_private_ray():
    import ray
    from ray import serve

    start_local_ray(num_cpus=4, include_dashboard=False)
    serve.start(proxy_location="Disabled")
    try:
        yield serve
    finally:
        serve.shutdown()
        ray.shutdown()


def test_prefix_router_keeps_a_prefix_on_one_replica(serve_on_private_ray):
    serve = serve_on_private_ray
    from ray.serve.config import RequestRouterConfig

    # Defined here so Ray ships the class by value to the replicas.
    @serve.deployment(
        num_replicas=2,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_PATH,
            request_router_kwargs={"block_size": 16, "imbalance_threshold": 8},
            request_routing_stats_period_s=1.0,
        ),
    )
    class WhoAmI:
        def __init__(self):
            self._replica_id = serve.get_replica_context().replica_id.unique_id

        def __call__(self, req) -> str:
            return self._replica_id

        def record_routing_stats(self) -> dict:
            return {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}

    handle = serve.run(WhoAmI.bind(), name="prefix_router_smoke", route_prefix=None)

    shared = list(range(500, 564))  # a 64-token system prompt: 4 blocks
    same = {handle.remote(EngineRequest(f"s{i}", prompt_token_ids=shared + [i, 7])).result(timeout_s=60)
            for i in range(10)}
    assert len(same) == 1, f"a shared prefix was spread over {same}"

    # Distinct first blocks: no match, so least loaded (idle replicas: a random tie-break).
    distinct = {handle.remote(EngineRequest(f"d{i}", prompt_token_ids=[i] * 64)).result(timeout_s=60)
                for i in range(20)}
    assert len(distinct) == 2, f"distinct prompts all went to {distinct}"

    serve.delete("prefix_router_smoke")
