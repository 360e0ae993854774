"""The engine-load autoscaling policy's arithmetic, its options' validation, and Serve's acceptance."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidConfigError
from cluster.serving.autoscaling import AutoscalingOptions, EngineLoadPolicy, engine_load_demand
from cluster.serving.config import ServingConfig


def demand(**kw) -> float:
    base = dict(replicas=1, ongoing_requests=0, target_ongoing_requests=32, kv_cache_usage=[], num_waiting=[],
                num_running=[], target_kv_cache_usage=0.8, target_waiting_requests=1)
    return engine_load_demand(**{**base, **kw})


def test_request_count_alone_is_serves_rule():
    assert demand(replicas=2, ongoing_requests=96) == pytest.approx(3.0)
    assert demand(replicas=2, ongoing_requests=8) == pytest.approx(0.25)


def test_kv_cache_pressure_scales_up_with_few_requests():
    # Four long prompts: request count says 0.125 replicas, the KV cache says 2 replicas at 80%.
    assert demand(replicas=2, ongoing_requests=4, kv_cache_usage=[0.8, 0.8]) == pytest.approx(2.0)
    assert demand(replicas=1, ongoing_requests=4, kv_cache_usage=[0.96]) == pytest.approx(1.2)


def test_engine_queue_past_tolerance_adds_replicas_per_running_batch():
    # 1 replica, batch of 2 running, 4 waiting (tolerance 1): 3 excess / batch 2 -> 1 + 1.5.
    assert demand(ongoing_requests=6, num_waiting=[4], num_running=[2]) == pytest.approx(2.5)


def test_no_shrinking_while_requests_wait_in_an_engine():
    # Two saturated replicas, waiting within tolerance: request count and KV alone would say 1.
    assert demand(replicas=2, ongoing_requests=6, num_waiting=[1, 1], num_running=[2, 2],
                  kv_cache_usage=[0.1, 0.1]) == pytest.approx(2.0)
    assert demand(replicas=2, ongoing_requests=0, num_waiting=[0, 0], num_running=[0, 0],
                  kv_cache_usage=[0.0, 0.0]) == 0


class _Config:
    def get_target_ongoing_requests(self):
        return 100


class _Context:
    def __init__(self, replicas, total, metrics):
        self.current_num_replicas, self.target_num_replicas = replicas, replicas
        self.total_num_requests, self.aggregated_metrics, self.config = total, metrics, _Config()


def test_policy_reads_serves_per_replica_metrics_and_rounds_up():
    policy = EngineLoadPolicy(target_kv_cache_usage=0.8, target_waiting_requests=1)
    ctx = _Context(1, 6, {"num_waiting": {"r1": 4.0}, "num_running": {"r1": 2.0}, "kv_cache_usage": {"r1": 0.1}})
    replicas, state = policy(ctx)
    assert replicas == 3 and state["demand"] == pytest.approx(2.5)
    assert policy(_Context(2, 0, {}))[0] == 0  # no metrics yet, no load: Serve clamps to min_replicas
    assert policy(_Context(0, 0, {}))[0] == 0


@pytest.mark.parametrize("options, field", [
    ({"max_replicas": 0}, "autoscaling.max_replicas"),
    ({"min_replicas": -1}, "autoscaling.min_replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "autoscaling.min_replicas"),
    ({"initial_replicas": 9}, "autoscaling.initial_replicas"),
    ({"target_kv_cache_usage": 1.5}, "autoscaling.target_kv_cache_usage"),
    ({"target_ongoing_requests": 0}, "autoscaling.target_ongoing_requests"),
    ({"upscale_delay_s": -1}, "autoscaling.upscale_delay_s"),
    ({"policy": "magic"}, "autoscaling.policy"),
    ({"max_replica": 2}, "autoscaling.max_replica"),
])
def test_bad_autoscaling_options_name_the_field(options, field):
    with pytest.raises(InvalidConfigError) as err:
        ServingConfig.from_dict({"model": "smollm2-135m", "autoscaling": options})
    assert err.value.field == field


@pytest.mark.parametrize("policy", ["engine_load", "requests"])
def test_serve_accepts_the_autoscaling_config(policy):
    from ray.serve.config import AutoscalingConfig

    from cluster.serving.app import model_server_options

    config = ServingConfig.from_dict({"model": "smollm2-135m", "autoscaling": {
        "min_replicas": 1, "max_replicas": 3, "initial_replicas": 2, "policy": policy}})
    options = model_server_options(config)
    assert "num_replicas" not in options  # Serve's autoscaler owns the count
    serve_config = AutoscalingConfig(**options["autoscaling_config"])
    assert (serve_config.min_replicas, serve_config.max_replicas, serve_config.initial_replicas) == (1, 3, 2)
    if policy == "engine_load":
        assert serve_config.policy.policy_function == "cluster.serving.autoscaling:EngineLoadPolicy"
        assert serve_config.policy.policy_kwargs == {"target_kv_cache_usage": 0.8, "target_waiting_requests": 1.0}
    else:
        assert serve_config.policy.is_default_policy_function()
    assert AutoscalingOptions().policy == "engine_load"
