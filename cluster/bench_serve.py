"""Serving benchmarks: a gRPC load generator, and the served-vs-in-process and router comparisons.

``llm-cluster bench --server HOST:PORT`` sweeps concurrency (1, 8, 32, 64 streams) against a
running server and reports time to first token and time per output token (p50 / p99) and
output tokens/s per level.

``llm-cluster bench-serve`` runs everything in one invocation, each phase alone on the machine:
1. the in-process engine (``AsyncLLMEngine``) on the 32-stream workload: the baseline;
2. a local Ray + Serve deployment of the same engine (one replica), swept over 1/8/32/64
   streams; the served throughput at 32 streams is compared with the baseline;
   2b. the in-process engine again while Ray and the (idle) app keep running: what the
   cluster's own processes cost on this machine, apart from the request path;
3. two replicas behind the prefix-affinity router, then behind Serve's default power-of-two
   router, on a workload whose requests share long prefixes in groups: prefix-cache hit rate
   (from the replicas' own counters) and p50 time to first token; then multi-turn conversations
   through the chat API (``cluster/bench_chat.py``): the hit rate beside the ideal one, which
   one unbounded cache would reach (prefix affinity should reach at least 0.9 of it).
Medians over ``--repeats`` runs where a phase is repeated.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass

LEVELS = (1, 8, 32, 64)
APP = "llm-cluster-bench"


@dataclass
class Result:
    ttft: list[float]  # seconds, per request
    tpot: list[float]  # seconds per output token after the first, per request
    output_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def workload(num_requests: int, prompt_words: int, seed: int) -> list[str]:
    """Seeded prompts of ``prompt_words`` words (about 1.3 tokens each), all different."""
    rng = random.Random(seed)
    words = ("river stone cloud engine garden signal market winter copper violin harbor pepper lantern "
             "orbit meadow canvas falcon quartz timber velvet").split()
    return [f"Request {i}: " + " ".join(rng.choice(words) for _ in range(prompt_words)) for i in range(num_requests)]


def shared_prefix_workload(groups: int, per_group: int, prefix_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega".split()
    prefixes = [f"Document {g}: " + " ".join(rng.choice(words) for _ in range(prefix_words)) for g in range(groups)]
    prompts = [f"{p}\nQuestion {i}: summarise part {i}." for p in prefixes for i in range(per_group)]
    rng.shuffle(prompts)
    return prompts


# ---- the gRPC load generator ----------------------------------------------------------------

async def _grpc_run(address: str, application: str, prompts: list[str], concurrency: int,
                    max_tokens: int) -> Result:
    import grpc

    from cluster.v1 import generation_pb2 as pb
    from cluster.v1 import generation_pb2_grpc as pb_grpc

    ttft, tpot, tokens = [], [], 0
    gate = asyncio.Semaphore(concurrency)
    sampling = pb.SamplingParameters(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(stub, prompt: str) -> None:
        nonlocal tokens
        async with gate:
            start, first, count = time.perf_counter(), None, 0
            async for message in stub.GenerateStream(pb.GenerateRequest(prompt=prompt, sampling=sampling),
                                                     metadata=(("application", application),)):
                if message.token_ids and first is None:
                    first = time.perf_counter()
                count += len(message.token_ids)
            end = time.perf_counter()
            ttft.append(first - start)
            if count > 1:
                tpot.append((end - first) / (count - 1))
            tokens += count

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*[one(stub, p) for p in prompts])
        return Result(ttft, tpot, tokens, time.perf_counter() - started)


def sweep(address: str, application: str, args) -> dict[int, Result]:
    results = {}
    for level in LEVELS:
        prompts = workload(max(2 * level, 16), args.prompt_words, seed=level)
        results[level] = asyncio.run(_grpc_run(address, application, prompts, level, args.max_tokens))
        print(f"  {level:3d} streams: {results[level].tokens_per_s:7.1f} tok/s", flush=True)
    return results


def print_sweep(results: dict[int, Result]) -> None:
    print(f"{'streams':>8s} {'requests':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s} {'TPOT p99':>9s} "
          f"{'out tok/s':>10s}")
    for level, r in results.items():
        print(f"{level:8d} {len(r.ttft):9d} {_pct(r.ttft, .5):8.3f}s {_pct(r.ttft, .99):8.3f}s "
              f"{_pct(r.tpot, .5) * 1e3:7.1f}ms {_pct(r.tpot, .99) * 1e3:7.1f}ms {r.tokens_per_s:10.1f}")


def run_client_bench(args) -> int:
    """``llm-cluster bench --server HOST:PORT``: the sweep against a running server."""
    print(f"gRPC sweep against {args.server} ({args.application}): prompts of {args.prompt_words} words, "
          f"{args.max_tokens} output tokens")
    print_sweep(sweep(args.server, args.application, args))
    return 0


# ---- the self-contained comparison ----------------------------------------------------------

def _in_process(args, prompts: list[str]) -> Result:
    from cluster.config import EngineConfig
    from cluster.engine.async_engine import AsyncLLMEngine
    from cluster.engine.llm_engine import LLMEngine
    from cluster.sampling_params import SamplingParams

    engine = AsyncLLMEngine(LLMEngine(EngineConfig.from_kwargs(model=args.model, dtype=args.dtype,
                                                               num_threads=os.cpu_count())))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    async def main() -> Result:
        ttft, tpot, tokens = [], [], 0
        gate = asyncio.Semaphore(32)

        async def one(i: int, prompt: str) -> None:
            nonlocal tokens
            async with gate:
                start, first, count = time.perf_counter(), None, 0
                async for out in engine.generate(prompt, params, request_id=f"b{i}"):
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter()
                    count = len(out.outputs[0].token_ids)
                end = time.perf_counter()
                ttft.append(first - start)
                tpot.append((end - first) / max(1, count - 1))
                tokens += count

        started = time.perf_counter()
        await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        return Result(ttft, tpot, tokens, time.perf_counter() - started)

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def _deploy(args, name: str, **options) -> None:
    from ray import serve

    from cluster.serving.app import build_app
    from cluster.serving.config import ServingConfig

    config = ServingConfig(app_name=name, engine={"model": args.model, "dtype": args.dtype}, **options)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")


def _ingress_memory(name: str) -> tuple[float, bool]:
    """The ingress replica's resident memory (MB) and whether torch is loaded in it (libtorch mapped)."""
    import ray
    from ray.util.state import list_actors

    [actor] = list_actors(address=ray.get_runtime_context().gcs_address,
                          filters=[("state", "=", "ALIVE"), ("class_name", "=", f"ServeReplica:{name}:Ingress")],
                          raise_on_missing_output=False)
    with open(f"/proc/{actor.pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{actor.pid}/maps") as f:
        torch_loaded = any("libtorch" in line for line in f)
    return rss_kb / 1024, torch_loaded


def _hit_rate(name: str, replicas: int) -> float:
    from ray import serve

    handle, seen = serve.get_deployment_handle("ModelServer", name), {}
    deadline = time.monotonic() + 30
    while len(seen) < replicas and time.monotonic() < deadline:
        stats = handle.engine_stats.remote().result()
        seen[stats["replica"]] = stats
        time.sleep(0.05)
    return sum(s["prefix_cache_hits"] for s in seen.values()) / max(1, sum(s["prefix_cache_queries"]
                                                                            for s in seen.values()))


def run_serve_bench(args) -> int:
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.bench_chat import run_conversations
    from cluster.serving.app import GRPC_SERVICER_FUNCTIONS
    from cluster.serving.config import ServingConfig
    from cluster.serving.serve_start import prepare_environment, start_serve

    cores = os.cpu_count() or 1
    # Every run gets prompts of its own seed: a served replica keeps its prefix cache between runs,
    # and a repeat must not be served from it.
    run_prompts = [workload(64, args.prompt_words, seed=100 + r) for r in range(args.repeats)]
    print(f"{args.model} {args.dtype}; prompts of {args.prompt_words} words, {args.max_tokens} output tokens; "
          f"{cores} cores; medians of {args.repeats}", flush=True)
    print("phase 1: in-process engine, 32 streams", flush=True)
    inproc = [_in_process(args, prompts) for prompts in run_prompts]

    prepare_environment()
    ray.init(address="local", num_cpus=max(cores, 4), log_to_driver=False)
    grpc_port = args.grpc_port
    start_serve(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    address = f"127.0.0.1:{grpc_port}"
    try:
        print("phase 2: served, one replica", flush=True)
        _deploy(args, APP, replica_num_cpus=cores)
        ingress_before = _ingress_memory(APP)
        levels = sweep(address, APP, args)
        served32 = [asyncio.run(_grpc_run(address, APP, prompts, 32, args.max_tokens)) for prompts in run_prompts]
        ingress_after = _ingress_memory(APP)
        print("phase 2b: in-process engine again, with Ray and the (idle) app still running", flush=True)
        beside = [_in_process(args, workload(64, args.prompt_words, seed=200 + r)) for r in range(args.repeats)]
        serve.delete(APP)

        print("phase 3: two replicas, shared-prefix workload, prefix-affinity vs power-of-two", flush=True)
        routers = {}
        prompts = shared_prefix_workload(groups=8, per_group=6, prefix_words=args.prefix_words, seed=7)
        block_size = ServingConfig(engine={"model": args.model}).engine_config().cache.block_size
        for router in ("prefix_affinity", "power_of_two"):
            name = f"bench-{router.replace('_', '-')}"
            _deploy(args, name, num_replicas=2, replica_num_cpus=max(1, cores // 2), router=router,
                    routing_stats_period_s=0.5)
            result = asyncio.run(_grpc_run(address, name, prompts, 4, args.max_tokens))
            hit_rate = _hit_rate(name, 2)
            chat = asyncio.run(run_conversations(address, name, conversations=args.chat_conversations,
                                                 turns=args.chat_turns, concurrency=4, words=args.chat_words,
                                                 max_tokens=args.chat_max_tokens, seed=11))
            routers[router] = (hit_rate, result, chat)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()

    print("\nserved, one replica (gRPC, streaming):")
    print_sweep(levels)
    base = statistics.median(r.tokens_per_s for r in inproc)
    served = statistics.median(r.tokens_per_s for r in served32)
    beside_base = statistics.median(r.tokens_per_s for r in beside)
    print(f"\n32 streams, 64 requests: in-process {base:.1f} tok/s, served {served:.1f} tok/s -> "
          f"{served / base:.2f}x (target >= 0.9x); TTFT p50 in-process "
          f"{statistics.median(_pct(r.ttft, .5) for r in inproc):.3f}s, served "
          f"{statistics.median(_pct(r.ttft, .5) for r in served32):.3f}s")
    print(f"ingress process: {ingress_before[0]:.0f} MB RSS before the load, {ingress_after[0]:.0f} MB after "
          f"({sum(len(r.ttft) for r in levels.values()) + sum(len(r.ttft) for r in served32)} requests); "
          f"torch loaded: {ingress_before[1] or ingress_after[1]}")
    print(f"in-process with Ray + Serve running beside it (idle app): {beside_base:.1f} tok/s "
          f"({beside_base / base:.2f}x of alone); served vs that: {served / beside_base:.2f}x")
    print("\nshared prefixes (8 groups x 6 requests, 4 streams, 2 replicas):")
    for router, (rate, result, _) in routers.items():
        print(f"  {router:16s} prefix-cache hit rate {rate:.2f}   TTFT p50 {_pct(result.ttft, .5):.3f}s   "
              f"{result.tokens_per_s:.1f} tok/s")
    print(f"\nmulti-turn chat ({args.chat_conversations} conversations x {args.chat_turns} turns through the "
          f"chat API, 4 at a time, {args.chat_max_tokens}-token replies, 2 replicas; blocks of {block_size}):")
    for router, (_, _, chat) in routers.items():
        ideal = chat.ideal_cached_tokens(block_size)
        print(f"  {router:16s} cached {chat.cached_tokens:6d} of {chat.prompt_tokens} prompt tokens "
              f"({chat.cached_tokens / chat.prompt_tokens:.2f}); ideal {ideal} ({ideal / chat.prompt_tokens:.2f}) "
              f"-> {chat.cached_tokens / max(1, ideal):.2f} of ideal")
    return 0
