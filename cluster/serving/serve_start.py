"""Starting Serve on a machine that may be busy.

Serve's controller kills a proxy that is not ready within 5 s (then starts another with a
deadline 5 s longer), and ``serve.start`` waits 60 s for the first one. On a loaded 2-core box a
proxy takes longer than that just to import: the proxy was killed over and over and ``serve.start``
raised. ``prepare_environment()`` (before ``ray.init``: the controller reads it from the
environment it inherits) gives proxies a minute; ``start_serve`` then waits for the controller's
own verdict, every proxy HEALTHY, within a generous bound.

Ray starts its worker processes (Serve replicas, their engine cores and tensor-parallel workers)
at niceness 15, so that its own daemons come first. Beside any ordinary process that keeps a core
busy that is starvation, not priority: with two such processes on a 2-core box a replica got
about 3% of a core (measured: a tiny-model replica took 110 s to start, the next one was not up
after 130 s, and every step took ~135 ms). ``prepare_environment()`` starts workers at niceness 0
for the clusters we start ourselves (``make serve``, the tests, the benchmarks); an operator may
set ``RAY_worker_niceness`` otherwise.

Serve's request path is tuned with two of the settings Ray's throughput-optimised mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED``) turns on (``SERVE_THROUGHPUT_ENV``): handles and the proxy
reach replicas over gRPC instead of Ray actor calls, and user code runs on the replica's own event
loop (no hop to a second thread per call). Every streamed token crosses two handles (proxy ->
ingress -> model server), and on a small node those processes share the cores with the engine
core: measured, these settings took Serve's CPU per streamed token from 2.7 to 1.9 ms
(docs/benchmarks.md, "Serving with the engine core in its own process"). The rest of that mode is
left off: buffered, stderr-less request logs and a frozen GC measured no further gain; running
handles' routers on the caller's loop breaks every handle called from outside an event loop (a
driver's ``handle.method.remote().result()``); and "direct ingress" moves the public ports from
the proxies to per-replica ports, which the Kubernetes services and probes do not expect. Each
value is a default (one already in the environment wins); the controller, proxies and replicas
read them when they start, from the environment of the process that starts Ray, or of the Ray
node's container (``k8s/`` and ``deploy/Dockerfile`` set the same values).
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

PROXY_READY_TIMEOUT_S = 60
WORKER_NICENESS = 0
SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",  # handle -> replica calls over gRPC (the proxy's too)
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def prepare_environment() -> None:
    """Call before ``ray.init`` starts a local cluster (a cluster already running keeps its own)."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_TIMEOUT_S))
    os.environ.setdefault("RAY_worker_niceness", str(WORKER_NICENESS))
    for name, value in SERVE_THROUGHPUT_ENV.items():
        os.environ.setdefault(name, value)


def start_serve(timeout_s: float = 300.0, **options) -> None:
    """``serve.start(**options)``, tolerating proxies that come up late; raises after ``timeout_s``."""
    import ray
    from ray import serve

    try:
        serve.start(**options)
        return
    except (TimeoutError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
        logger.warning("Serve's proxies were not ready in time (%s); waiting for the controller to bring "
                       "them up", type(err).__name__)
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {}
        try:
            statuses = {node: str(getattr(s, "value", s)) for node, s in serve.status().proxies.items()}
        except Exception:  # noqa: BLE001 - the controller may still be starting
            pass
        if statuses and all(s == "HEALTHY" for s in statuses.values()):
            serve.start(**options)  # connects to the running controller (options already applied)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve's proxies were not healthy within {timeout_s:g} s: {statuses}")
        time.sleep(1.0)
