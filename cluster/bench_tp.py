"""``llm-cluster bench-tp``: what tensor parallelism over Ray costs and gives on this machine.

1. Dispatch overhead per step. An empty step's round trip (driver -> rank 0 -> broadcast to
   the other ranks -> back) for each executor, and the median decode step of the same batch
   with the in-process executor and the Ray executor at tp=1 (same compute, so the
   difference is the transport: a Ray call, pickling the step delta, the result back).
2. Decode tokens/s at every tensor-parallel size asked for, one stream and a batch.

Every figure is a median over ``--repeats`` runs made in this one invocation.
"""

from __future__ import annotations

import math
import os
import statistics
import time

from cluster.config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.contracts.scheduler_output import SchedulerOutput
from cluster.sampling_params import SamplingParams

PROMPT_LEN = 64


def _engine(args, tp: int, executor: str) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, tensor_parallel_size=tp, executor=executor,
        num_threads=args.threads if tp == 1 else None,  # tp=1: the same threads in or out of process
        worker_num_cpus=args.worker_cpus if executor == "ray" else 1.0))


def _empty_step_ms(engine: LLMEngine, count: int = 300) -> float:
    executor = engine.executor
    for _ in range(20):
        executor.execute(SchedulerOutput())
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        executor.execute(SchedulerOutput())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _decode_run(engine: LLMEngine, batch: int, max_tokens: int, run: int) -> tuple[float, float]:
    """(median decode step ms, decode tokens/s) for ``batch`` streams after their prefill."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = [(run * 7919 + i * 131 + j * 17) % 40000 + 100 for j in range(PROMPT_LEN)]
        engine.add_request(f"r{run}-{i}", {"prompt_token_ids": prompt}, params)
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()  # prefill (and the first tokens)
    steps, tokens = [], 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - start)
        tokens += len(outputs)
    engine.block_manager.reset_prefix_cache()
    return statistics.median(steps) * 1e3, tokens / sum(steps)


def _measure(engine: LLMEngine, args) -> dict:
    result = {"empty_ms": _empty_step_ms(engine)}
    hidden = engine.arch.hidden_size
    result["all_reduce_ms"] = engine.executor.collective_rpc("time_all_reduce", hidden, 300) * 1e3
    for batch in (1, args.batch):
        runs = [_decode_run(engine, batch, args.max_tokens, run) for run in range(args.repeats)]
        result[batch] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    return result


def run_bench_tp(args) -> int:
    import ray

    tps = [int(t) for t in args.tp.split(",")]
    if not ray.is_initialized():
        # Logical CPUs: enough bundles for the largest group even on a 2-core machine.
        cpus = max(os.cpu_count() or 1, math.ceil(max(tps) * args.worker_cpus))
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), num_cpus=cpus, log_to_driver=False)
    setups = [("in-process", 1, "in_process"), ("ray", 1, "ray")] + [("ray", tp, "ray") for tp in tps if tp > 1]
    results = {}
    for name, tp, executor in setups:
        engine = _engine(args, tp, executor)
        engine_layers, hidden_size = engine.arch.num_layers, engine.arch.hidden_size
        try:
            results[(name, tp)] = _measure(engine, args)
        finally:
            engine.shutdown()
        print(f"measured {name} tp={tp}", flush=True)

    base = results[("in-process", 1)]
    print(f"\n{args.model} {args.dtype}; prompts of {PROMPT_LEN} tokens, {args.max_tokens} new tokens; "
          f"medians of {args.repeats} runs; {os.cpu_count()} cores")
    print(f"{'executor':>12s} {'tp':>3s} {'empty step ms':>14s} {'decode step ms (1)':>19s} "
          f"{'tok/s (1)':>10s} {'decode step ms (' + str(args.batch) + ')':>20s} {'tok/s (' + str(args.batch) + ')':>11s}"
          f" {'tok/s vs tp=1':>14s}")
    for (name, tp), r in results.items():
        print(f"{name:>12s} {tp:3d} {r['empty_ms']:14.3f} {r[1][0]:19.2f} {r[1][1]:10.1f} "
              f"{r[args.batch][0]:20.2f} {r[args.batch][1]:11.1f} {r[args.batch][1] / base[args.batch][1]:13.2f}x")
    for (name, tp), r in results.items():
        if tp > 1:
            collectives = 2 * engine_layers + 2  # o_proj and down_proj per layer, the embedding, the logits
            print(f"tp={tp}: one all-reduce of {hidden_size} values takes {r['all_reduce_ms']:.3f} ms (median); "
                  f"{collectives} collectives per step ~ {collectives * r['all_reduce_ms']:.1f} ms of the "
                  f"{r[1][0]:.1f} ms single-stream decode step")
    ray1 = results[("ray", 1)]
    print(f"\ndispatch overhead per step, Ray tp=1 minus in-process: "
          f"{ray1[1][0] - base[1][0]:.2f} ms (1 stream), {ray1[args.batch][0] - base[args.batch][0]:.2f} ms "
          f"({args.batch} streams); empty-step round trip {ray1['empty_ms']:.3f} ms vs {base['empty_ms']:.3f} ms")
    return 0
