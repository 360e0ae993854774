"""``llm-cluster serve`` (``make serve``): start or join Ray, deploy the app, print how to call it.

By default it starts a private local Ray cluster (``--address`` joins an existing one), starts
Serve's HTTP proxy and its gRPC proxy with our servicers, deploys the application, prints the
endpoints and ready-to-paste client commands, and shuts everything it started down on Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from cluster.serving.config import ServingConfig


def serve_forever(args, config: ServingConfig) -> int:
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.serving.app import GRPC_SERVICER_FUNCTIONS, build_app
    from cluster.serving.serve_start import prepare_environment, start_serve

    started = time.monotonic()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # so the `serve` CLI can talk to this cluster too
    # Serve's gRPC proxy reads its message limit from the environment when it starts (inherited from
    # this process by a local cluster); the ingress checks the same limit itself in every case.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.max_request_bytes))
    prepare_environment()  # Serve's proxies get a minute to start on a busy machine
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=args.num_cpus, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start_serve(http_options=http_options(args),
                    grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
        serve.run(build_app(config), name=config.app_name, route_prefix="/")
        _print_endpoints(args, config, time.monotonic() - started)
        stop.wait()
        print("\nshutting down ...", flush=True)
    finally:
        try:
            serve.delete(config.app_name) if args.address else serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def http_options(args):
    """Serve's HTTP proxy options: HTTPS when a certificate and key are given (Serve terminates TLS)."""
    from ray.serve.config import HTTPOptions

    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key} if args.tls_cert else {}
    return HTTPOptions(host=args.host, port=args.http_port, **tls)


def _print_endpoints(args, config: ServingConfig, seconds: float) -> None:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "127.0.0.1") else args.host
    scheme = "https" if args.tls_cert else "http"
    grpc_addr, http = f"{host}:{args.grpc_port}", f"{scheme}://{host}:{args.http_port}"
    engine = config.engine_config()
    scaling = config.autoscaling
    replicas = f"{config.num_replicas} replica(s)" if scaling is None else \
        f"{scaling.min_replicas}-{scaling.max_replicas} replicas, autoscaled ({scaling.policy})"
    print(f"""
llm-cluster is serving {engine.model.model} ({engine.model.dtype}, tp={engine.parallel.tensor_parallel_size}, \
{replicas}) -- ready in {seconds:.0f} s

  gRPC   {grpc_addr}   service cluster.v1.GenerationService (+ grpc.health.v1.Health, reflection)
  HTTP   {http}/v1   OpenAI-compatible: /v1/models, /v1/completions, /v1/chat/completions

Try:
  .venv/bin/llm-cluster generate --server {grpc_addr} "The capital of France is"
  .venv/bin/grpcurl -plaintext -H 'application: {config.app_name}' \\
      -d '{{"prompt": "The capital of France is", "sampling": {{"max_tokens": 16, "temperature": 0}}}}' \\
      {grpc_addr} cluster.v1.GenerationService/GenerateStream
  curl -s {http}/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "{config.model_name or os.path.basename(engine.model.model)}", \
"messages": [{{"role": "user", "content": "What is 2+2?"}}], "max_tokens": 32}}'

Ctrl-C stops it.""", flush=True)
