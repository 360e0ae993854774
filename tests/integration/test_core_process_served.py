"""A served replica runs its engine core in a child process (the default at tensor_parallel_size 1):
killing the core under 16 streaming gRPC requests ends each with UNAVAILABLE within 2 s, naming
the cause; the replica (same actor, same PID) serves again within 30 s, and the new core holds no
KV blocks."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from cluster.serving.config import ServingConfig
from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import state_address

pytestmark = pytest.mark.slow

APP = "core-process"
METADATA = (("application", APP),)


@pytest.fixture(scope="module")
def app(serve_cluster, tiny_llama_dir):
    from ray import serve

    from cluster.serving.app import build_app

    config = ServingConfig(app_name=APP, replica_num_cpus=1,
                           engine={"model": tiny_llama_dir("llama_tied"), "dtype": "float32", "num_blocks": 1024,
                                   "max_num_seqs": 16, "max_waiting_requests": 16})
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    assert config.uses_core_process
    yield serve_cluster
    serve.delete(APP)


def _stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", APP).engine_stats.remote().result(timeout_s=60)


def _replica() -> tuple[str, int]:
    from ray.util.state import list_actors

    [actor] = list_actors(address=state_address(), filters=[("state", "=", "ALIVE"),
                                                            ("class_name", "=", f"ServeReplica:{APP}:ModelServer")],
                          raise_on_missing_output=False)
    return actor.actor_id, actor.pid


def _request(i: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 7, 100 + i]),
                              sampling=pb.SamplingParameters(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_killing_the_core_ends_streams_unavailable_and_the_same_replica_serves_again(app):
    address = app[0]
    replica = _replica()
    core_pid = _stats()["core_pid"]
    assert core_pid not in (None, replica[1])
    # Ray would start both at niceness 15: starved by any busy ordinary process (serve_start.py).
    assert os.getpriority(os.PRIO_PROCESS, replica[1]) == os.getpriority(os.PRIO_PROCESS, core_pid) == 0

    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            started = [asyncio.Event() for _ in range(16)]
            killed_at: list[float] = []

            async def one(i):
                call = stub.GenerateStream(_request(i, 400), metadata=METADATA)
                try:
                    async for _ in call:
                        started[i].set()
                    return "OK", None, ""
                except grpc.aio.AioRpcError as err:
                    return err.code().name, time.monotonic() - killed_at[0], err.details()

            tasks = [asyncio.create_task(one(i)) for i in range(16)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
            killed_at.append(time.monotonic())
            os.kill(core_pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(run())
    assert {code for code, _, _ in results} == {"UNAVAILABLE"}, results[:3]
    assert max(after for _, after, _ in results) < 2.0, sorted(after for _, after, _ in results)[-3:]
    assert all("SIGKILL" in details for _, _, details in results), results[0]

    async def one_request():
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await pb_grpc.GenerationServiceStub(channel).Generate(_request(0, 8), metadata=METADATA)
            return len(reply.token_ids)

    deadline = time.monotonic() + 30
    while True:
        try:
            assert asyncio.run(one_request()) == 8
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert time.monotonic() < deadline, "the replica did not serve again within 30 s"
            time.sleep(0.2)
    assert _replica() == replica  # the same actor, the same process
    stats = _stats()
    assert stats["core_pid"] != core_pid
    assert stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"] and not stats["num_waiting"]
