"""Fuzzing the served app: 600 seeded bad and edge requests over both APIs (tests/fuzz_requests.py),
8 at a time, loopback only.

Passes when every request gets a 4xx / INVALID_ARGUMENT, or a normal answer where its input is
legal, and none a 5xx / UNKNOWN / INTERNAL / UNAVAILABLE; the replica process is the same at the
end; grpc.health.v1 answers SERVING, within 1 s, all along; and a fixed greedy request returns the
same text before and after.
"""

from __future__ import annotations

import collections
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.serving.config import ServingConfig
from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import state_address
from tests.fuzz_requests import grpc_cases, http_cases
from tests.integration.test_overload import HealthWatch

pytestmark = pytest.mark.slow

APP = "fuzz"
METADATA = (("application", APP),)
SEED = 20261129
NUM_HTTP, NUM_GRPC = 400, 200
GREEDY = pb.GenerateRequest(prompt="The capital of France is",
                            sampling=pb.SamplingParameters(max_tokens=16, temperature=0))


@pytest.fixture(scope="module")
def app(serve_cluster, tiny_llama_dir):
    from ray import serve

    from cluster.serving.app import build_app

    config = ServingConfig(app_name=APP, replica_num_cpus=1, routing_stats_period_s=0.5,
                           engine={"model": tiny_llama_dir("llama_tied"), "dtype": "float32"})
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield serve_cluster
    serve.delete(APP)


def _replica_ids() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=state_address(), filters=[("state", "=", "ALIVE"),
                                                     ("class_name", "=", f"ServeReplica:{APP}:ModelServer")],
                                            raise_on_missing_output=False)}


def _post(base: str, case) -> tuple[str, int, bytes]:
    name, body, _, path = case
    request = urllib.request.Request(f"{base}/{APP}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return name, reply.status, reply.read()[:200]
    except urllib.error.HTTPError as err:
        return name, err.code, err.read()[:200]


def _call(address: str, case) -> tuple[str, str]:
    name, data, _ = case
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_unary("/cluster.v1.GenerationService/Generate")  # raw bytes in and out
        try:
            generate(data, metadata=METADATA, timeout=120)
            return name, "OK"
        except grpc.RpcError as err:
            return name, err.code().name


def _verdict(legal, ok: bool, refused: bool) -> bool:
    """Legal inputs get a normal answer; illegal ones a refusal; undecided ones either."""
    return ok if legal is True else refused if legal is False else ok or refused


def test_600_bad_and_edge_requests_get_4xx_and_nothing_breaks(app):
    address, base = app
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        before = stub.Generate(GREEDY, metadata=METADATA, timeout=120).text
    replicas = _replica_ids()
    assert len(replicas) == 1
    http, rpc = http_cases(SEED, NUM_HTTP), grpc_cases(SEED + 1, NUM_GRPC)
    with HealthWatch(address, APP) as health, ThreadPoolExecutor(8) as pool:
        http_results = list(pool.map(lambda c: _post(base, c), http))
        grpc_results = list(pool.map(lambda c: _call(address, c), rpc))

    bad = []
    for case, (name, status, body) in zip(http, http_results):
        if status >= 500 or not _verdict(case[2], status == 200, 400 <= status < 500):
            bad.append((name, case[1][:120], status, body))
    for case, (name, code) in zip(rpc, grpc_results):
        if code in ("UNKNOWN", "INTERNAL", "UNAVAILABLE") or \
                not _verdict(case[2], code == "OK", code == "INVALID_ARGUMENT"):
            bad.append((name, case[1][:60], code))
    assert not bad, bad[:20]
    statuses = collections.Counter(status for _, status, _ in http_results)
    codes = collections.Counter(code for _, code in grpc_results)
    assert statuses[200] > 50 and statuses[400] > 100 and codes["OK"] > 20 and codes["INVALID_ARGUMENT"] > 50, \
        (statuses, codes)  # the fuzzer exercises both outcomes on both APIs
    health.assert_always_serving()
    assert _replica_ids() == replicas
    with grpc.insecure_channel(address) as channel:
        after = pb_grpc.GenerationServiceStub(channel).Generate(GREEDY, metadata=METADATA, timeout=120).text
    assert after == before
