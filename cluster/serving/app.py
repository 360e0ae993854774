"""Build the Serve application from a typed config: Ingress -> ModelServer replicas.

``build_app(ServingConfig)`` is the one builder; ``app_builder(args)`` is the same for Serve
config files (``import_path: cluster.serving.app:app_builder``, ``args:`` the flat options).
The gRPC proxy must be started with ``GRPC_SERVICER_FUNCTIONS`` (the launcher and the files in
deploy/ do), which registers our service and the standard health service on its port.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from cluster.serving import malloc
from cluster.serving.config import ServingConfig
from cluster.serving.ingress import Ingress
from cluster.serving.model_server import ModelServer

GRPC_SERVICER_FUNCTIONS = [
    "cluster.serving.grpc_services.add_generation_service",
    "cluster.serving.grpc_services.add_health_service",
]
ROUTER_CLASS = "cluster.serving.router:PrefixAffinityRouter"


def model_server_options(config: ServingConfig) -> dict:
    """Deployment options of the model server: resources, placement, queue bounds, router."""
    engine = config.engine_config()
    parallel = engine.parallel
    device = engine.model.resolved_device()
    replica = {"CPU": float(config.replica_num_cpus)}
    options: dict = {
        "name": "ModelServer",
        "max_ongoing_requests": config.max_ongoing_requests, "max_queued_requests": config.max_queued_requests,
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": config.health_probe_timeout_s,
        "graceful_shutdown_timeout_s": 5,
    }
    if config.autoscaling is not None:  # Serve's autoscaler owns the replica count
        options["autoscaling_config"] = config.autoscaling.serve_config()
    else:
        options["num_replicas"] = config.num_replicas
    if parallel.tensor_parallel_size > 1:
        # The replica's own bundle first, then one per worker: the executor adopts the last tp.
        options["ray_actor_options"] = {"num_cpus": replica["CPU"]}
        options["placement_group_bundles"] = [replica] + [parallel.worker_bundle(device)] * \
            parallel.tensor_parallel_size
        options["placement_group_strategy"] = parallel.placement_strategy
    else:
        options["ray_actor_options"] = {"num_cpus": replica["CPU"], "num_gpus": 1 if device == "cuda" else 0}
    preload = malloc.runtime_env(config.malloc_library)  # inherited by the replica's TP workers
    if preload:
        options["ray_actor_options"]["runtime_env"] = preload
    if config.router == "prefix_affinity":
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"imbalance_threshold": config.router_imbalance_threshold,
                                   "block_size": engine.cache.block_size},  # route on the caches' own blocks
            request_routing_stats_period_s=config.routing_stats_period_s)
    return options


def build_app(config: ServingConfig) -> Application:
    engine = config.engine_config()
    if engine.parallel.tensor_parallel_size == 1 and engine.parallel.num_threads is None:
        # The engine runs in the replica: give torch the threads the replica reserved.
        config.engine = {**config.engine, "num_threads": max(1, int(config.replica_num_cpus))}
    server = serve.deployment(ModelServer, **model_server_options(config)).bind(config)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(server, config)


def app_builder(args: dict) -> Application:
    """Serve config files: ``import_path: cluster.serving.app:app_builder`` with flat ``args``."""
    return build_app(ServingConfig.from_dict(dict(args or {})))
