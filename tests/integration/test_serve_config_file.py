"""`serve run deploy/serve-cpu.yaml` works: the file validates against Ray's Serve schema, and the
real `serve` CLI brings the app up (on free ports) answering gRPC and OpenAI HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import yaml

from cluster import InvalidConfigError
from cluster.serving import malloc
from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "deploy", "serve-cpu.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.serial]  # its own Ray cluster


def test_config_validates_against_serves_schema_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from cluster.serving.app import GRPC_SERVICER_FUNCTIONS, ROUTER_CLASS, app_builder

    with open(CONFIG) as f:
        raw = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    assert list(schema.grpc_options.grpc_servicer_functions) == GRPC_SERVICER_FUNCTIONS
    (app,) = raw["applications"]
    assert app["import_path"] == "cluster.serving.app:app_builder"
    # Every arg lands where the file says: serving options on the ModelServer deployment, the rest
    # in the engine config (a misspelt or unknown key is refused, not silently dropped).
    ingress = app_builder(dict(app["args"]))._bound_deployment
    assert ingress.name == "Ingress"
    server_app, config = ingress.init_args
    server = server_app._bound_deployment
    assert server.name == "ModelServer" and server.init_args == (config,)
    assert (server.num_replicas, server.max_ongoing_requests, server.max_queued_requests) == (1, 128, 256)
    preload = malloc.runtime_env("auto")  # jemalloc where installed (make install puts it in the venv)
    assert server.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0, **({"runtime_env": preload} if preload else {})}
    assert server._deployment_config.request_router_config.request_router_class == ROUTER_CLASS
    assert config.engine == {"model": "smollm2-135m", "dtype": "auto", "tensor_parallel_size": 1,
                             "num_threads": 2}  # tp=1: the engine gets the replica's 2 CPUs as threads
    with pytest.raises(InvalidConfigError, match="bogus_option"):
        app_builder({**app["args"], "bogus_option": 1})


def test_serve_run_answers_grpc_and_http(tmp_path, smollm2_path):
    with open(CONFIG) as f:
        raw = yaml.safe_load(f)
    grpc_port, http_port = free_port(), free_port()
    raw["grpc_options"]["port"], raw["http_options"]["port"] = grpc_port, http_port
    raw["applications"][0]["args"]["model"] = smollm2_path  # the converted cache: no second conversion
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    process = subprocess.Popen([serve_cli, "run", "--address", "local", str(config)], env=env, cwd=str(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, reply = time.monotonic() + 120, None
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.GenerateRequest(prompt="The capital of France is",
                                         sampling=pb.SamplingParameters(max_tokens=4, temperature=0))
            while reply is None:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "serve run did not come up"
                try:
                    reply = stub.Generate(request, metadata=(("application", "llm-cluster"),), timeout=10)
                except grpc.RpcError:
                    time.sleep(1)
        assert reply.text and reply.usage.completion_tokens == 4
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=30) as models:
            assert json.loads(models.read())["data"][0]["id"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the CLI shuts its app and its local Ray down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_gpu_config_validates_and_builds_its_tp_placement():
    """deploy/serve-gpu.yaml: Serve's schema, our args, and the replica's [CPU, GPU, GPU] bundles."""
    from ray.serve.schema import ServeDeploySchema

    from cluster.serving.app import model_server_options
    from cluster.serving.config import ServingConfig

    with open(os.path.join(REPO, "deploy", "serve-gpu.yaml")) as f:
        raw = yaml.safe_load(f)
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    config = ServingConfig.from_dict(app["args"])
    options = model_server_options(config)
    assert options["placement_group_bundles"] == [{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in options
    assert options["autoscaling_config"]["policy"]["policy_function"].endswith(":EngineLoadPolicy")
