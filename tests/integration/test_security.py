"""Security basics on a live app: an API key on both APIs (health stays open), HTTPS terminated by
Serve's HTTP proxy, request size limits, and a key that never reaches a log.

Its own Ray + Serve (the HTTP proxy's TLS is set when Serve starts), a tiny model.
"""

from __future__ import annotations

import glob
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.serving.config import ServingConfig
from cluster.serving.serve_start import start_serve
from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import free_port, start_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # its own Ray cluster

APP = "secure"
KEY = "k3y-" + "7f1c9a0e5b2d4c68"
MAX_BYTES = 64 << 10
REQUEST = {"prompt": [1, 504, 3458], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def secure_app(tls_files, tiny_llama_dir, tmp_path_factory):
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.serving.app import GRPC_SERVICER_FUNCTIONS, build_app

    key_file = tmp_path_factory.mktemp("secret") / "api-key"
    key_file.write_text(KEY + "\n")
    start_local_ray(num_cpus=8)
    grpc_port, http_port = free_port(), free_port()
    cert, key = tls_files
    start_serve(http_options=HTTPOptions(host="127.0.0.1", port=http_port, ssl_certfile=cert, ssl_keyfile=key),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    config = ServingConfig(app_name=APP, replica_num_cpus=1, api_key_file=str(key_file), max_request_bytes=MAX_BYTES,
                           engine={"model": tiny_llama_dir("llama_tied"), "dtype": "float32"})
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield f"127.0.0.1:{grpc_port}", f"https://127.0.0.1:{http_port}", cert
    serve.shutdown()
    ray.shutdown()


def https_post(app, path: str, body: bytes, headers: dict):
    _, base, cert = app
    context = ssl.create_default_context(cafile=cert)
    request = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as reply:
            return reply.status, json.loads(reply.read()), reply.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def test_http_needs_the_key_and_health_does_not(secure_app):
    body = json.dumps(REQUEST).encode()
    status, reply, headers = https_post(secure_app, "/v1/completions", body, {})
    assert status == 401 and reply["error"]["type"] == "authentication_error" and headers["WWW-Authenticate"] == "Bearer"
    status, _, _ = https_post(secure_app, "/v1/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401
    status, reply, _ = https_post(secure_app, "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    status, _, _ = https_post(secure_app, "/v1/completions", body, {"api-key": KEY})
    assert status == 200
    _, base, cert = secure_app
    with urllib.request.urlopen(base + "/health", timeout=30, context=ssl.create_default_context(cafile=cert)) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/v1/models", timeout=30, context=ssl.create_default_context(cafile=cert))
    assert err.value.code == 401


def test_http_is_tls_only(secure_app):
    _, base, _ = secure_app
    with pytest.raises(urllib.error.URLError):  # the server's certificate is not trusted by default
        urllib.request.urlopen(base + "/health", timeout=30)
    with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):  # plain HTTP to the TLS port
        urllib.request.urlopen(base.replace("https://", "http://") + "/health", timeout=30)


def test_grpc_needs_the_key_and_health_does_not(secure_app):
    address = secure_app[0]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 504, 3458]),
                                 sampling=pb.SamplingParameters(max_tokens=4, temperature=0))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for metadata in ([], [("authorization", "Bearer nope")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request, metadata=[("application", APP), *metadata], timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Generate(request, metadata=[("application", APP), ("authorization", f"Bearer {KEY}")], timeout=60)
        assert len(reply.token_ids) == 4
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           metadata=[("application", APP)], timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_oversized_requests_are_refused_on_both_apis(secure_app):
    auth = {"Authorization": f"Bearer {KEY}"}
    big = json.dumps({**REQUEST, "prompt": "x" * (MAX_BYTES + 1)}).encode()
    status, reply, _ = https_post(secure_app, "/v1/completions", big, auth)
    assert status == 413 and reply["error"]["param"] == "body"
    request = pb.GenerateRequest(prompt="x" * (MAX_BYTES + 1), sampling=pb.SamplingParameters(max_tokens=4))
    with grpc.insecure_channel(secure_app[0]) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GenerationServiceStub(channel).Generate(
                request, metadata=[("application", APP), ("authorization", f"Bearer {KEY}")], timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "body" in err.value.details()
    status, _, _ = https_post(secure_app, "/v1/completions", json.dumps(REQUEST).encode(), auth)
    assert status == 200  # and the service goes on


def test_the_key_never_reaches_a_log(secure_app):
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    leaked = [path for path in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True)
              if os.path.isfile(path) and KEY.encode() in open(path, "rb").read()]
    assert not leaked, leaked
