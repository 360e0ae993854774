"""Replica autoscaling on a local Ray cluster, driven by the engine-load policy.

The request-count target is set far above the load (100 ongoing requests per replica against
6 clients), so Serve's default policy would keep one replica: the scale-up comes from the
replicas' engine queues (``max_num_seqs=2`` leaves 4 of the 6 requests waiting; the replica
admits up to 8 waiting, so none is refused), and the
scale-down from the queues and KV cache emptying once the load stops.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from cluster.serving.config import ServingConfig
from cluster.serving.serve_start import start_serve
from tests.conftest import free_port, start_local_ray
from tests.integration.test_serving import post_json

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # its own Ray cluster

APP = "autoscale"
# Replicas push their stats every 0.5 s instead of Serve's 10 s, so the test takes seconds, not minutes.
FAST_METRICS = {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    saved = {k: os.environ.get(k) for k in FAST_METRICS}
    os.environ.update(FAST_METRICS)  # inherited by the raylet, the Serve controller and the replicas
    start_local_ray(num_cpus=8)
    http_port = free_port()
    start_serve(http_options=HTTPOptions(host="127.0.0.1", port=http_port))
    try:
        yield f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def running_replicas(name: str) -> int:
    from ray import serve

    deployment = serve.status().applications[name].deployments["ModelServer"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for_replicas(name: str, count: int, timeout_s: float, history: list) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        n = running_replicas(name)
        history.append((round(time.monotonic() - started, 1), n))
        if n == count:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{name}: expected {count} running replicas within {timeout_s} s; saw {history[-20:]}")


def test_replicas_scale_up_under_sustained_load_and_back_down_after(autoscaling_cluster, tiny_llama_dir):
    from ray import serve

    from cluster.serving.app import build_app

    config = ServingConfig(
        app_name=APP, model_name="tiny", replica_num_cpus=1,
        autoscaling={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 100,
                     "upscale_delay_s": 2, "downscale_delay_s": 4, "look_back_period_s": 2,
                     "target_waiting_requests": 1},
        engine={"model": tiny_llama_dir(), "dtype": "float32", "num_blocks": 256, "block_size": 16,
                "max_num_seqs": 2, "max_waiting_requests": 8})
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    history: list = []
    assert running_replicas(APP) == 1

    url = f"{autoscaling_cluster}/{APP}/v1/completions"
    stop, failures, served = threading.Event(), [], [0]

    def client(i: int) -> None:
        while not stop.is_set():
            status, body = post_json(url, {"model": "tiny", "prompt": f"client {i} says hello", "max_tokens": 48,
                                           "temperature": 0, "ignore_eos": True}, timeout=120)
            if status != 200 or body["usage"]["completion_tokens"] != 48:
                failures.append((status, body))
            served[0] += 1

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in clients:
        t.start()
    try:
        up_s = wait_for_replicas(APP, 2, timeout_s=120, history=history)
        served_at_scale_up = served[0]
        time.sleep(3)  # keep the load on the 2 replicas a moment: no scale-down while requests wait
        assert running_replicas(APP) == 2, history[-10:]
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
    assert not failures, failures[:3]
    assert served[0] > served_at_scale_up  # the load was still being served when it reached 2 replicas

    down_s = wait_for_replicas(APP, 1, timeout_s=90, history=history)
    print(f"scaled 1 -> 2 in {up_s:.1f} s under load; 2 -> 1 in {down_s:.1f} s after it; {served[0]} requests")
    # The remaining replica still serves.
    status, body = post_json(url, {"model": "tiny", "prompt": "after", "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    serve.delete(APP)
