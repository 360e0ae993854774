"""Typed configuration of the serving application, validated where it is built.

``ServingConfig.from_dict`` takes the flat ``args`` of a Serve config file (or the launcher's
flags): serving keys are listed here, and every other key must be an engine option
(``cluster/config.py``), so a typo fails at build time naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cluster.config import EngineConfig, _is_int, _require
from cluster.errors import InvalidConfigError
from cluster.serving.autoscaling import AutoscalingOptions

ROUTERS = ("prefix_affinity", "power_of_two")


@dataclass
class ServingConfig:
    """One application: an ingress (gRPC + HTTP) in front of model-server replicas."""

    app_name: str = "llm-cluster"  # Serve application name (gRPC clients send it as `application` metadata)
    model_name: str | None = None  # name reported to clients; None = the engine's model name
    num_replicas: int = 1  # model-server replicas (each one engine and its TP group); fixed unless autoscaling
    autoscaling: AutoscalingOptions | dict | None = None  # replica autoscaling (cluster/serving/autoscaling.py)
    replica_num_cpus: float = 1.0  # CPUs the replica process itself reserves (tp=1: the engine's too)
    max_ongoing_requests: int = 128  # requests one replica accepts at once (running + engine queue)
    max_queued_requests: int = 256  # requests waiting for a replica at each caller; beyond -> 429
    router: str = "prefix_affinity"  # prefix_affinity | power_of_two (Serve's default)
    router_imbalance_threshold: int = 8  # requests of load difference before affinity yields to load
    routing_stats_period_s: float = 1.0  # how often replicas report queue length and KV usage
    health_probe_interval_s: float = 10.0  # the replica generates one token this often when idle
    health_probe_timeout_s: float = 30.0  # a probe slower than this marks the replica unhealthy
    chat_max_tokens: int = 512  # chat requests without max_tokens generate at most this many
    engine: dict = field(default_factory=dict)  # engine options (model, dtype, tensor_parallel_size, ...)

    def __post_init__(self) -> None:
        _require(isinstance(self.app_name, str) and bool(self.app_name), "app_name", "must be a non-empty string")
        for name in ("num_replicas", "max_ongoing_requests", "max_queued_requests", "chat_max_tokens",
                     "router_imbalance_threshold"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        for name in ("replica_num_cpus", "routing_stats_period_s", "health_probe_interval_s",
                     "health_probe_timeout_s"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name,
                     f"must be a number > 0, got {value!r}")
        self.autoscaling = AutoscalingOptions.from_value(self.autoscaling)
        _require(self.router in ROUTERS, "router", f"must be one of {ROUTERS}, got {self.router!r}")
        self.engine_config()  # validates every engine option now, naming the bad one

    def engine_config(self) -> EngineConfig:
        options = {"dtype": "bfloat16", "max_waiting_requests": self.max_ongoing_requests, **self.engine}
        return EngineConfig.from_kwargs(**options)

    @classmethod
    def from_dict(cls, args: dict) -> "ServingConfig":
        """Serving keys go to this class, every other key to the engine (unknown ones fail there)."""
        if not isinstance(args, dict):
            raise InvalidConfigError("args", f"must be a mapping, got {type(args).__name__}")
        own = {f.name for f in fields(cls)} - {"engine"}
        serving = {k: v for k, v in args.items() if k in own}
        engine = {**args.get("engine", {}), **{k: v for k, v in args.items() if k not in own and k != "engine"}}
        return cls(**serving, engine=engine)
