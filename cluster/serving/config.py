"""Typed configuration of the serving application, validated where it is built.

``ServingConfig.from_dict`` takes the flat ``args`` of a Serve config file (or the launcher's
flags): serving keys are listed here, and every other key must be an engine option
(``cluster/config.py``), so a typo fails at build time naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cluster.config import EngineConfig, _is_int, _require
from cluster.errors import InvalidConfigError
from cluster.serving import malloc
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
    # Admission. Each replica's engine admits max_num_seqs running + max_waiting_requests queued requests
    # and refuses more at once (429 with a retry hint). Serve's own bounds sit above that, so a burst
    # reaches the replica and is refused there instead of waiting unseen at the caller.
    max_ongoing_requests: int = 256  # requests Serve sends one replica at once (>= the engine's admission bound)
    max_queued_requests: int = 64  # requests waiting for a replica at each caller; beyond -> 429
    router: str = "prefix_affinity"  # prefix_affinity | power_of_two (Serve's default)
    router_imbalance_threshold: int = 8  # requests of load difference before affinity yields to load
    routing_stats_period_s: float = 1.0  # how often replicas report queue length and KV usage
    health_check_period_s: float = 2.0  # Serve asks each replica this often whether to replace it
    health_probe_interval_s: float = 10.0  # an idle replica generates one token this often
    health_probe_timeout_s: float = 30.0  # a probe slower than this (with no step finishing) restarts the engine
    stream_messages_per_s: float = 500.0  # stream messages a replica sends per second at most, shared by its streams
    # Security. The API key is read where the ingress starts, from the file or the environment variable
    # named here (never from this config, which Serve logs); no key configured = no authentication.
    api_key_file: str | None = None  # a file holding the key (e.g. a mounted Kubernetes secret)
    api_key_env: str | None = None  # or the name of an environment variable holding it
    max_request_bytes: int = 4 << 20  # HTTP bodies and gRPC messages above this are refused
    chat_max_tokens: int = 512  # chat requests without max_tokens generate at most this many
    malloc_library: str = "auto"  # replicas' malloc: "auto" (jemalloc if installed), "glibc", or a path
    # The engine core (scheduler, executor, model) in a child process of the replica: a crash or hang
    # there fails the in-flight requests and a new core starts, the replica stays. None = yes at
    # tensor_parallel_size 1; above 1 the model already runs in the workers' own processes (Ray actors).
    engine_core_process: bool | None = None
    engine: dict = field(default_factory=dict)  # engine options (model, dtype, tensor_parallel_size, ...)

    def __post_init__(self) -> None:
        _require(isinstance(self.app_name, str) and bool(self.app_name), "app_name", "must be a non-empty string")
        for name in ("num_replicas", "max_ongoing_requests", "max_queued_requests", "chat_max_tokens",
                     "router_imbalance_threshold", "max_request_bytes"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        for name in ("replica_num_cpus", "routing_stats_period_s", "health_probe_interval_s",
                     "health_probe_timeout_s", "health_check_period_s", "stream_messages_per_s"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, name,
                     f"must be a number > 0, got {value!r}")
        for name in ("api_key_file", "api_key_env"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, str) and bool(value)), name,
                     f"must be a non-empty string or null, got {value!r}")
        malloc.resolve(self.malloc_library)  # a bad value or a missing file fails here, naming the field
        self.autoscaling = AutoscalingOptions.from_value(self.autoscaling)
        _require(self.router in ROUTERS, "router", f"must be one of {ROUTERS}, got {self.router!r}")
        _require(self.engine_core_process is None or isinstance(self.engine_core_process, bool),
                 "engine_core_process", f"must be true, false or null, got {self.engine_core_process!r}")
        engine = self.engine_config()  # validates every engine option now, naming the bad one
        _require(not self.engine_core_process or engine.parallel.tensor_parallel_size == 1, "engine_core_process",
                 "runs tensor_parallel_size 1 only (larger groups run their workers as Ray actors)")

    @property
    def uses_core_process(self) -> bool:
        """Whether each replica runs its engine core in a child process (see engine_core_process)."""
        if self.engine_core_process is not None:
            return self.engine_core_process
        return self.engine_config().parallel.tensor_parallel_size == 1

    def engine_config(self) -> EngineConfig:
        """The engine's config: dtype "auto" by default (bfloat16 where the replica's CPU or GPU computes
        it natively, else float32), and a bounded queue (as deep as the running set)."""
        options = {"dtype": "auto", **self.engine}
        config = EngineConfig.from_kwargs(**options)
        if config.scheduler.max_waiting_requests is None:
            config.scheduler.max_waiting_requests = config.scheduler.max_num_seqs
        return config

    @classmethod
    def from_dict(cls, args: dict) -> "ServingConfig":
        """Serving keys go to this class, every other key to the engine (unknown ones fail there)."""
        if not isinstance(args, dict):
            raise InvalidConfigError("args", f"must be a mapping, got {type(args).__name__}")
        own = {f.name for f in fields(cls)} - {"engine"}
        serving = {k: v for k, v in args.items() if k in own}
        engine = {**args.get("engine", {}), **{k: v for k, v in args.items() if k not in own and k != "engine"}}
        return cls(**serving, engine=engine)
