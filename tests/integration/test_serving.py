"""The Serve application over real clients: generated gRPC stubs, grpcurl through reflection,
grpc.health.v1, the openai client; cancellation, deadlines, errors and queue bounds.

One private Ray + Serve for the module; the app serves SmolLM2-135M in float32 so its greedy
text can be compared with the offline engine's.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.llm import LLM
from cluster.sampling_params import SamplingParams
from cluster.serving.config import ServingConfig
from cluster.v1 import generation_pb2 as pb
from cluster.v1 import generation_pb2_grpc as pb_grpc

APP = "llm-cluster"
METADATA = (("application", APP),)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Here is my shopping list:\n1. Apples\n2.",
           "Question: Why is the sky blue?\nAnswer:", "Le chat est sur la table. El gato"]
MAX_TOKENS = 24
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_app(serve_cluster, smollm2_path):
    from ray import serve

    from cluster.serving.app import build_app

    # max_queued_requests counts requests not yet assigned to a replica, so it must absorb a burst of
    # simultaneous arrivals (32 streams at once here), not only a true backlog.
    config = ServingConfig(replica_num_cpus=2, max_ongoing_requests=40, max_queued_requests=32,
                           health_probe_interval_s=2,
                           engine={"model": smollm2_path, "dtype": "float32", "kv_cache_memory_bytes": 256 << 20,
                                   # the engine's own bound: 32 running + 40 waiting (a burst arrives between steps)
                                   "max_num_seqs": 32, "max_waiting_requests": 40})
    serve.run(build_app(config), name=APP, route_prefix="/")
    yield serve_cluster
    serve.delete(APP)


@pytest.fixture(scope="module")
def offline(smollm2_path):
    """The offline engine's greedy text for PROMPTS (the served text must equal it)."""
    llm = LLM(model=smollm2_path, dtype="float32")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}


@pytest.fixture
def stub(smollm2_app):
    with grpc.insecure_channel(smollm2_app[0]) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def greedy(prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParameters(**{"max_tokens": max_tokens,
                                                                               "temperature": 0.0, **extra}))


def post_json(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def engine_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("ModelServer", APP).engine_stats.remote().result()


def wait_for_free_blocks(timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_stats()
        if stats["num_free_blocks"] == stats["num_blocks"] and not stats["num_running"] and not stats["num_waiting"]:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


# ---- the contract ---------------------------------------------------------------------------------

def test_committed_stubs_match_the_proto(tmp_path):
    from cluster.v1.generate_stubs import REPO, generate

    generated = generate(str(tmp_path))
    assert generated
    for path in generated:
        rel = os.path.relpath(path, tmp_path)
        with open(path) as fresh, open(os.path.join(REPO, rel)) as committed:
            assert fresh.read() == committed.read(), f"{rel} is stale: run `make protos`"


def test_every_rpc_and_field_is_documented():
    from cluster.v1.generate_stubs import proto_files

    for path in proto_files():
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            code = line.split("//")[0].strip()
            declares = code.startswith(("rpc ", "message ", "enum ", "service ")) or \
                (code.endswith(";") and "=" in code and not code.startswith(("syntax", "package", "option")))
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{os.path.basename(path)}:{i + 1} has no comment: {code}"


# ---- real clients ---------------------------------------------------------------------------------

def test_grpc_unary_and_stream_equal_the_offline_engine(stub, offline):
    for prompt in PROMPTS:
        unary = stub.Generate(greedy(prompt), metadata=METADATA)
        assert unary.text == offline[prompt]
        assert unary.usage.completion_tokens == len(unary.token_ids) and unary.usage.prompt_tokens > 0
        messages = list(stub.GenerateStream(greedy(prompt), metadata=METADATA))
        assert "".join(m.text for m in messages) == offline[prompt]
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
        assert messages[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert messages[-1].usage.completion_tokens == sum(len(m.token_ids) for m in messages)


def test_tokenize_model_info_and_chat(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=METADATA)
    assert info.max_model_len == 8192 and info.tensor_parallel_size == 1 and info.dtype == "float32"
    assert info.vocab_size == 49152
    tokens = stub.Tokenize(pb.TokenizeRequest(prompt="hello world"), metadata=METADATA)
    assert tokens.count == len(tokens.token_ids) >= 2
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is 2+2?")])
    templated = stub.Tokenize(pb.TokenizeRequest(chat=chat), metadata=METADATA)
    reply = stub.Generate(pb.GenerateRequest(chat=chat, sampling=pb.SamplingParameters(max_tokens=8, temperature=0)),
                          metadata=METADATA)
    assert reply.usage.prompt_tokens == templated.count and reply.text


def test_grpcurl_lists_describes_and_calls_through_reflection(smollm2_app, offline):
    grpcurl = os.path.join(os.path.dirname(os.sys.executable), "grpcurl")
    address = smollm2_app[0]
    listed = subprocess.run([grpcurl, "-plaintext", address, "list"], capture_output=True, text=True, timeout=30)
    assert "cluster.v1.GenerationService" in listed.stdout and "grpc.health.v1.Health" in listed.stdout
    described = subprocess.run([grpcurl, "-plaintext", address, "describe", "cluster.v1.GenerationService"],
                               capture_output=True, text=True, timeout=30)
    assert "GenerateStream" in described.stdout
    body = json.dumps({"prompt": PROMPTS[0], "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0}})
    called = subprocess.run([grpcurl, "-plaintext", "-H", f"application: {APP}", "-d", body, address,
                             "cluster.v1.GenerationService/Generate"], capture_output=True, text=True, timeout=60)
    assert json.loads(called.stdout)["text"] == offline[PROMPTS[0]], called.stderr


def test_health_check_reports_serving(smollm2_app):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(smollm2_app[0]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=METADATA)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_openai_client_completions_chat_and_streaming(smollm2_app, offline):
    from openai import OpenAI

    client = OpenAI(base_url=smollm2_app[1] + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].text == offline[PROMPTS[0]]
    assert completion.usage.completion_tokens > 0
    streamed = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    events = list(streamed)
    assert "".join(e.choices[0].text for e in events if e.choices) == offline[PROMPTS[1]]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens > 0
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.content and len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason


def test_32_concurrent_streams_complete_correctly(smollm2_app, offline):
    async def one(stub, prompt):
        text = ""
        async for message in stub.GenerateStream(greedy(prompt), metadata=METADATA):
            text += message.text
        return prompt, text

    async def run():
        async with grpc.aio.insecure_channel(smollm2_app[0]) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            return await asyncio.gather(*[one(stub, PROMPTS[i % len(PROMPTS)]) for i in range(32)])

    results = asyncio.run(run())
    assert len(results) == 32
    for prompt, text in results:
        assert text == offline[prompt]


# ---- cancellation, deadlines, errors ---------------------------------------------------------------

def test_cancelled_streams_and_expired_deadlines_free_their_blocks(stub):
    baseline = wait_for_free_blocks()
    assert baseline["num_free_blocks"] == baseline["num_blocks"], baseline
    calls = [stub.GenerateStream(greedy(p, max_tokens=2000, ignore_eos=True), metadata=METADATA) for p in PROMPTS]
    for call in calls:
        next(call)  # generation is under way
    assert engine_stats()["num_running"] >= len(PROMPTS) - 1
    for call in calls:
        call.cancel()
    after_cancel = wait_for_free_blocks()
    assert after_cancel["num_free_blocks"] == after_cancel["num_blocks"], after_cancel
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(greedy(PROMPTS[0], max_tokens=2000, ignore_eos=True), metadata=METADATA,
                                 timeout=2.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after_deadline = wait_for_free_blocks()
    assert after_deadline["num_free_blocks"] == after_deadline["num_blocks"], after_deadline


@pytest.mark.parametrize("request_, field", [
    (greedy("hi", temperature=-1.0), "sampling.temperature"),
    (greedy("hi", top_p=0.0), "sampling.top_p"),
    (greedy("hi", logprobs=50), "sampling.logprobs"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10 ** 6])), "prompt_token_ids"),
    (pb.GenerateRequest(), "input"),
    (greedy("word " * 9000), "prompt"),
])
def test_bad_requests_are_invalid_argument_naming_the_field_then_service_continues(stub, offline, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request_, metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert stub.Generate(greedy(PROMPTS[0]), metadata=METADATA).text == offline[PROMPTS[0]]


def test_http_errors_name_the_field(smollm2_app):
    base = smollm2_app[1]
    cases = [({"prompt": "hi", "temperature": -1}, "temperature"), ({"prompt": "hi", "logit_bias": {}}, "logit_bias"),
             ({"prompt": "hi", "bogus": 1}, "bogus"), ({"prompt": 5}, "prompt"),
             ({"prompt": "word " * 9000}, "prompt")]
    for body, field in cases:
        status, reply = post_json(base + "/v1/completions", body)
        assert status == 400 and reply["error"]["param"] == field, reply
    status, reply = post_json(base + "/v1/chat/completions", {"messages": []})
    assert status == 400 and reply["error"]["param"] == "messages"
    status, _ = post_json(base + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200


def test_structured_outputs_over_grpc_and_http(smollm2_app, stub):
    """The gRPC oneof and OpenAI's response_format / guided_choice constrain the served output; a
    constraint that does not compile is INVALID_ARGUMENT / 400 naming the client's field."""
    from openai import OpenAI

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10 ** 8}},
              "required": ["city", "population"], "additionalProperties": False}
    ask = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="The largest city of France, as JSON.")])
    reply = stub.Generate(pb.GenerateRequest(chat=ask, sampling=pb.SamplingParameters(
        max_tokens=64, temperature=0.0, json_schema=json.dumps(schema))), metadata=METADATA)
    assert reply.finish_reason == pb.FINISH_REASON_STOP, reply
    parsed = json.loads(reply.text)
    assert set(parsed) == {"city", "population"} and isinstance(parsed["population"], int)
    reply = stub.Generate(pb.GenerateRequest(prompt="Is water wet? Answer:", sampling=pb.SamplingParameters(
        max_tokens=8, temperature=0.0, choice=pb.Choices(choices=["yes", "no"]))), metadata=METADATA)
    assert reply.text in ("yes", "no")
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy("hi", regex="a(b"), metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.regex" in err.value.details()

    client = OpenAI(base_url=smollm2_app[1] + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "The largest city of Spain, as JSON."}], max_tokens=64,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert set(json.loads(chat.choices[0].message.content)) == {"city", "population"}
    status, body = post_json(smollm2_app[1] + "/v1/completions",
                             {"prompt": "Colour:", "max_tokens": 8, "guided_choice": ["red", "blue"]})
    assert status == 200 and body["choices"][0]["text"] in ("red", "blue"), body
    status, body = post_json(smollm2_app[1] + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}})
    assert status == 400 and body["error"]["param"] == "response_format.json_schema.schema", body
    assert wait_for_free_blocks()["num_running"] == 0


def test_cli_generate_streams_from_the_server(smollm2_app, offline):
    import subprocess
    import sys

    cli = os.path.join(os.path.dirname(sys.executable), "llm-cluster")
    done = subprocess.run([cli, "generate", "--server", smollm2_app[0], "--max-tokens", str(MAX_TOKENS),
                           PROMPTS[0]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == offline[PROMPTS[0]].strip()
    assert "completion tokens" in done.stderr


def test_http_client_disconnect_aborts_the_request_and_frees_its_blocks(smollm2_app):
    import http.client
    from urllib.parse import urlparse

    baseline = wait_for_free_blocks()
    assert baseline["num_free_blocks"] == baseline["num_blocks"], baseline
    url = urlparse(smollm2_app[1])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 2000, "ignore_eos": True, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    assert engine_stats()["num_running"] >= 1
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    after = wait_for_free_blocks(timeout_s=30)  # the proxy notices a vanished client on its next send
    assert after["num_free_blocks"] == after["num_blocks"] and after["num_running"] == 0, after


def test_replica_metrics_are_exported_with_vllm_names(stub):
    """After a few requests Ray's metrics endpoint (what Prometheus scrapes) has our histograms."""
    import urllib.request

    for prompt in PROMPTS[:3]:
        stub.Generate(greedy(prompt, max_tokens=4), metadata=METADATA)
    url = f"http://127.0.0.1:{os.environ['LLM_CLUSTER_TEST_METRICS_PORT']}/metrics"
    wanted = ("ray_vllm_time_to_first_token_seconds_count", "ray_vllm_e2e_request_latency_seconds_count",
              "ray_vllm_generation_tokens_total", "ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc")
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray's agent exports every few seconds
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_vllm_time_to_first_token_seconds_count") and 'model_name="smollm2-135m"' in line]
    assert counts and sum(counts) >= 3


PROMETHEUS = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "prometheus")


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus (Debian's binary, `make tools/prometheus`) scraping Ray's metrics every second
    on loopback; stopped by its PID afterwards. Yields its HTTP API base url."""
    import urllib.request

    from tests.conftest import free_port

    if not os.path.exists(PROMETHEUS):
        pytest.skip("tools/prometheus is missing: `make tools/prometheus` (run by `make test`) installs it")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{os.environ['LLM_CLUSTER_TEST_METRICS_PORT']}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
            time.sleep(0.3)
        yield base
    finally:
        os.kill(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
        log.close()


def promql(base: str, query: str) -> list[dict]:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}",
                                timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_a_real_prometheus_scrapes_the_replicas_ttft_histogram(stub, prometheus):
    """PromQL over what Prometheus scraped: the TTFT histogram's count, buckets and median."""
    import urllib.request

    for prompt in PROMPTS[:3]:
        stub.Generate(greedy(prompt, max_tokens=4), metadata=METADATA)
    count_q = 'sum(ray_vllm_time_to_first_token_seconds_count{model_name="smollm2-135m"})'
    median_q = ('histogram_quantile(0.5, sum by (le) '
                '(ray_vllm_time_to_first_token_seconds_bucket{model_name="smollm2-135m"}))')
    deadline, count = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # Ray exports every few seconds; Prometheus scrapes every second
        count = promql(prometheus, count_q)
        if count and float(count[0]["value"][1]) >= 3:
            break
        time.sleep(1)
    assert count and float(count[0]["value"][1]) >= 3, f"TTFT count not scraped: {count}"
    buckets = promql(prometheus, 'ray_vllm_time_to_first_token_seconds_bucket{model_name="smollm2-135m"}')
    assert {b["metric"]["le"] for b in buckets} >= {"0.1", "1.0", "+Inf"}
    median = float(promql(prometheus, median_q)[0]["value"][1])
    assert 0 < median < 80, median
    with urllib.request.urlopen(f"{prometheus}/api/v1/targets", timeout=10) as reply:
        targets = json.loads(reply.read())
    assert [t["health"] for t in targets["data"]["activeTargets"]] == ["up"]


# Last in the module: of the flood's streams that the client cancels while Serve still queues them, one
# now and then reaches the engine later anyway and runs its 2,000 tokens with nobody listening (the race
# of ray-project/ray#52533, seen in 2 of 3 CI runs once the engine got faster): a later test that needs
# an idle engine found it running 10-120 s after this test had seen the engine idle.
def test_more_work_than_the_queue_bound_is_resource_exhausted_at_once(smollm2_app, stub, offline):
    """100 gRPC streams, then 20 HTTP requests while they run, against bounds of 40 ongoing + 32
    queued (Serve) and 32 running + 40 waiting (the engine): the excess is refused at once
    (RESOURCE_EXHAUSTED / 429), not queued without bound."""
    flood = 100

    async def run():
        async with grpc.aio.insecure_channel(smollm2_app[0]) as channel:
            aio_stub = pb_grpc.GenerationServiceStub(channel)
            calls = [aio_stub.GenerateStream(greedy(f"{i} " + PROMPTS[0], max_tokens=2000, ignore_eos=True),
                                             metadata=METADATA) for i in range(flood)]
            codes = []

            async def first(call):
                try:
                    await call.read()
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())

            tasks = [asyncio.create_task(first(c)) for c in calls]
            started = time.monotonic()
            while grpc.StatusCode.RESOURCE_EXHAUSTED not in codes and time.monotonic() - started < 60:
                await asyncio.sleep(0.05)
            refused_within = time.monotonic() - started
            await asyncio.sleep(2)  # let the rest of the flood be admitted, queued or refused
            # Still saturated (the admitted streams run 2,000 tokens): a burst of 20 HTTP requests
            # cannot all fit. Those that queue are served once the streams are cancelled. A thread
            # each, so that all 20 arrive at once (asyncio's default pool has 6 threads on 2 cores).
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(20) as pool:
                http = [loop.run_in_executor(pool, post_json, smollm2_app[1] + "/v1/completions",
                                             {"prompt": f"{i} hi", "max_tokens": 8}) for i in range(20)]
                await asyncio.sleep(3)
                for call in calls:
                    call.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                statuses = [status for status, _ in await asyncio.gather(*http)]
            return codes, statuses, refused_within

    codes, http_statuses, refused_within = asyncio.run(run())
    # Serve counts its queue approximately (requests awaiting a replica, per caller), and which
    # bound refuses first varies; what must hold is that no more than the bounds run, and the
    # excess is refused quickly.
    assert codes.count(grpc.StatusCode.OK) <= 40, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
    assert refused_within < 30, f"refusals took {refused_within:.1f} s: they must not wait in a queue"
    assert 429 in http_statuses and set(http_statuses) <= {200, 429}, http_statuses
    # Every cancelled stream was aborted: none runs on to its 2,000 tokens with nobody listening
    # (alone, one would take 30 s and more here).
    after = wait_for_free_blocks(timeout_s=20)
    assert after["num_free_blocks"] == after["num_blocks"] and not after["num_running"], after
    assert stub.Generate(greedy(PROMPTS[0]), metadata=METADATA).text == offline[PROMPTS[0]]
