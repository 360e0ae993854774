"""Replica autoscaling: the typed options and the engine-load policy Serve's controller runs.

Request count alone is a poor signal for an LLM server: ten 8k-token prompts load a replica
far more than ten short chats, and a replica whose batch is full keeps requests *waiting* in
its engine while Serve still counts them as merely "ongoing". So the default policy here
(``engine_load``) sizes the deployment by the largest of three demands:

- requests:  ongoing (running + queued) requests / ``target_ongoing_requests`` (Serve's own rule);
- KV cache:  replicas x mean KV-cache usage / ``target_kv_cache_usage``;
- queue:     the engine-waiting requests beyond ``target_waiting_requests`` per replica, divided
             by the mean running batch, are the extra replicas it would take to run them now;
             and while any request waits in an engine the deployment never shrinks.

Each replica reports ``num_waiting``, ``num_running`` and ``kv_cache_usage`` through
``ModelServer.record_autoscaling_stats``; Serve averages them over ``look_back_period_s`` and
applies min/max replicas and the up/down delays around whatever the policy returns.
``policy="requests"`` keeps Serve's default request-count policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cluster.config import _is_int, _require
from cluster.errors import InvalidConfigError

POLICIES = ("engine_load", "requests")
POLICY_PATH = "cluster.serving.autoscaling:EngineLoadPolicy"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class AutoscalingOptions:
    """``autoscaling:`` in the serving config; absent = a fixed ``num_replicas``."""

    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float = 32.0  # per replica: Serve's request-count target
    upscale_delay_s: float = 30.0  # demand must stay above capacity this long before adding a replica
    downscale_delay_s: float = 300.0  # ... and below it this long before removing one
    look_back_period_s: float = 30.0  # window the replicas' metrics are averaged over
    policy: str = "engine_load"  # engine_load | requests
    target_kv_cache_usage: float = 0.8  # engine_load: mean KV usage one replica should run at
    target_waiting_requests: float = 1.0  # engine_load: engine-queued requests one replica may hold

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= (0 if name == "min_replicas" else 1),
                     f"autoscaling.{name}", f"must be an integer >= {0 if name == 'min_replicas' else 1}, "
                     f"got {value!r}")
        _require(self.min_replicas <= self.max_replicas, "autoscaling.min_replicas",
                 f"must be <= max_replicas ({self.max_replicas}), got {self.min_replicas}")
        if self.initial_replicas is not None:
            _require(_is_int(self.initial_replicas)
                     and self.min_replicas <= self.initial_replicas <= self.max_replicas,
                     "autoscaling.initial_replicas",
                     f"must be an integer within [min_replicas, max_replicas], got {self.initial_replicas!r}")
        for name in ("target_ongoing_requests", "look_back_period_s", "target_kv_cache_usage",
                     "target_waiting_requests"):
            value = getattr(self, name)
            _require(_number(value) and value > 0, f"autoscaling.{name}", f"must be a number > 0, got {value!r}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            _require(_number(value) and value >= 0, f"autoscaling.{name}", f"must be a number >= 0, got {value!r}")
        _require(self.target_kv_cache_usage <= 1, "autoscaling.target_kv_cache_usage",
                 f"must be a fraction in (0, 1], got {self.target_kv_cache_usage!r}")
        _require(self.policy in POLICIES, "autoscaling.policy", f"must be one of {POLICIES}, got {self.policy!r}")

    @classmethod
    def from_value(cls, value) -> "AutoscalingOptions | None":
        if value is None or isinstance(value, AutoscalingOptions):
            return value
        if not isinstance(value, dict):
            raise InvalidConfigError("autoscaling", f"must be a mapping, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        for key in value:
            _require(key in known, f"autoscaling.{key}", f"is not an autoscaling option (known: {sorted(known)})")
        return cls(**value)

    def serve_config(self) -> dict:
        """Serve's ``autoscaling_config`` for the model-server deployment."""
        serve = {k: v for k, v in asdict(self).items()
                 if k in ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                          "upscale_delay_s", "downscale_delay_s", "look_back_period_s")}
        if serve["initial_replicas"] is None:
            del serve["initial_replicas"]
        # Serve wants its (deprecated) metrics interval below the look-back window.
        serve["metrics_interval_s"] = min(10.0, self.look_back_period_s / 2)
        if self.policy == "engine_load":
            serve["policy"] = {"policy_function": POLICY_PATH,
                               "policy_kwargs": {"target_kv_cache_usage": self.target_kv_cache_usage,
                                                 "target_waiting_requests": self.target_waiting_requests}}
        return serve


def engine_load_demand(*, replicas: int, ongoing_requests: float, target_ongoing_requests: float,
                       kv_cache_usage: list[float], num_waiting: list[float], num_running: list[float],
                       target_kv_cache_usage: float, target_waiting_requests: float) -> float:
    """Replicas the current load needs (fractional; Serve rounds up and clamps to min/max)."""
    demand = ongoing_requests / target_ongoing_requests
    if kv_cache_usage:
        demand = max(demand, replicas * (sum(kv_cache_usage) / len(kv_cache_usage)) / target_kv_cache_usage)
    waiting = sum(num_waiting)
    if waiting > 0:  # a replica is saturated: never shrink now, grow if the queue is past tolerance
        demand = max(demand, replicas)
        excess = waiting - target_waiting_requests * replicas
        if excess > 0:
            batch = max(1.0, sum(num_running) / max(1, len(num_running)))
            demand = max(demand, replicas + excess / batch)
    return demand


class EngineLoadPolicy:
    """Serve custom autoscaling policy (built once by the controller with ``policy_kwargs``)."""

    def __init__(self, target_kv_cache_usage: float = 0.8, target_waiting_requests: float = 1.0):
        self.target_kv_cache_usage = target_kv_cache_usage
        self.target_waiting_requests = target_waiting_requests

    def __call__(self, ctx) -> tuple[float, dict]:
        replicas = ctx.current_num_replicas
        if replicas == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        demand = engine_load_demand(
            replicas=replicas, ongoing_requests=ctx.total_num_requests,
            target_ongoing_requests=ctx.config.get_target_ongoing_requests(),
            kv_cache_usage=list(metrics.get("kv_cache_usage", {}).values()),
            num_waiting=list(metrics.get("num_waiting", {}).values()),
            num_running=list(metrics.get("num_running", {}).values()),
            target_kv_cache_usage=self.target_kv_cache_usage, target_waiting_requests=self.target_waiting_requests)
        return math.ceil(demand - 1e-9) if demand > 0 else 0, {"demand": demand}
