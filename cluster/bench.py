"""``llm-cluster bench``: the engine against a peer on one seeded workload, in the same run.

Workload: ``--num-requests`` requests, prompt lengths uniform in [16, 1024] tokens, output
lengths uniform in [16, 256] (ignore_eos), random token ids from a seeded generator.
Throughput counts only the tokens each request asked for. Single stream: one chat-like prompt
alone, time to its first token and decode tokens/s after it.

Peers (``--against``): transformers runs batched ``generate`` with left padding in arrival order
at the best of several batch sizes, in the same process, its runs interleaved with ours (run i of
each side back to back, the side going first alternating), and each pair's ratio is printed too.
vLLM's CPU build (``cluster.bench_vllm``) runs the very same token ids in its own venv, and both
also run a prefill-heavy burst (``--burst-requests`` prompts of 1-1.8k tokens, outputs a tenth of
the prompt, all arriving at once: per-request time to first token and throughput). Each figure is
the median of ``--repeats`` runs.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass

import torch

PROMPT_LEN_RANGE = (16, 1024)
OUTPUT_LEN_RANGE = (16, 256)
BURST_PROMPT_LEN_RANGE = (1024, 1800)  # prefill-heavy: outputs are a tenth of the prompt
BURST_OUTPUT_RATIO = 10
SINGLE_STREAM_PROMPT = "The capital of France is a city with a long history. Tell me about its museums, " \
    "its food and the river that runs through it, in a few short paragraphs."
SINGLE_STREAM_TOKENS = 128


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(num_requests: int, vocab_size: int, seed: int) -> Workload:
    """Seeded prompts of random ordinary token ids and output lengths."""
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(num_requests):
        n = rng.randint(*PROMPT_LEN_RANGE)
        prompts.append([rng.randrange(100, vocab_size) for _ in range(n)])  # skip special ids
        outs.append(rng.randint(*OUTPUT_LEN_RANGE))
    return Workload(prompts, outs)


def make_burst_workload(num_requests: int, vocab_size: int, seed: int) -> Workload:
    """Prefill-heavy: prompts of 1-1.8k random token ids, each output a tenth of its prompt."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab_size) for _ in range(rng.randint(*BURST_PROMPT_LEN_RANGE))]
               for _ in range(num_requests)]
    return Workload(prompts, [len(p) // BURST_OUTPUT_RATIO for p in prompts])


def cpu_summary() -> str:
    """The CPU a figure was measured on: model name, cores we may use, and its bf16 matrix features."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    features = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f in flags] or ["no AVX-512"]
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {' '.join(features)}"


def malloc_summary() -> str:
    """This process's allocator as the environment set it: it moves both sides' figures (transformers'
    by up to 2x: jemalloc's default purging re-faults its per-step tensors; docs/benchmarks.md)."""
    preload = [os.path.basename(p) for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
               if "malloc" in os.path.basename(p)]
    conf = os.environ.get("MALLOC_CONF", "")
    return (", ".join(preload) if preload else "glibc") + (f" (MALLOC_CONF={conf})" if preload and conf else "")


# ---- our engine -------------------------------------------------------------------------------


def engine_throughput(llm, work: Workload) -> float:
    from cluster.sampling_params import SamplingParams

    _cold_cache(llm)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != work.num_output_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, expected {work.num_output_tokens}")
    return produced / elapsed


def engine_single_stream(llm, prompt_ids: list[int], tokens: int | None = None) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s after the first token) of ``tokens`` new tokens
    (default ``SINGLE_STREAM_TOKENS``)."""
    from cluster.sampling_params import SamplingParams

    tokens = tokens or SINGLE_STREAM_TOKENS
    engine = llm.engine
    _cold_cache(llm)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("bench-single", {"prompt_token_ids": prompt_ids}, params)
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first)


def engine_burst(llm, work: Workload) -> tuple[list[float], float]:
    """Every request added at once, the engine stepped to the end: (each request's seconds to its
    first token, generated tokens/s over the burst)."""
    from cluster.sampling_params import SamplingParams

    engine = llm.engine
    _cold_cache(llm)
    first: dict[str, float] = {}
    produced = 0
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens)):
        engine.add_request(f"burst-{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter()
            if out.finished:
                produced += len(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    if produced != work.num_output_tokens:
        raise RuntimeError(f"engine produced {produced} tokens, expected {work.num_output_tokens}")
    return [first[f"burst-{i}"] - start for i in range(len(work.prompts))], produced / elapsed


def _cold_cache(llm) -> None:
    """Repeats reuse the same prompts: drop the prefix cache so no run is served from an earlier one."""
    if not llm.engine.block_manager.reset_prefix_cache():
        raise RuntimeError("prefix cache could not be reset: requests are still running")


# ---- transformers -----------------------------------------------------------------------------


def hf_throughput(model, work: Workload, batch_size: int, pad_id: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        prompts, outs = work.prompts[i:i + batch_size], work.output_lens[i:i + batch_size]
        ids, mask = (t.to(model.device) for t in _left_pad(prompts, pad_id))
        n = max(outs)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad_id)
    return work.num_output_tokens / (time.perf_counter() - start)


def hf_single_stream(model, prompt_ids: list[int], pad_id: int, tokens: int | None = None) -> tuple[float, float]:
    tokens = tokens or SINGLE_STREAM_TOKENS
    ids = torch.tensor([prompt_ids], device=model.device)
    kwargs = dict(do_sample=False, pad_token_id=pad_id, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        total = time.perf_counter() - start
    return ttft, (tokens - 1) / (total - ttft)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


# ---- the run ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _start_engine(args, work: Workload, single_ids: list[int]):
    """Our engine, warmed up on the single-stream prompt and a few of the workload's requests."""
    from cluster import LLM

    from cluster.bench_vllm import KV_CACHE_GIB

    # vLLM's KV budget on ours too: in float32 our 1 GiB default holds half the workload at once
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, kv_cache_memory_bytes=KV_CACHE_GIB << 30,
              gguf_blocks=not args.dense_weights, kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    engine_single_stream(llm, single_ids)  # warm-up
    engine_throughput(llm, Workload(work.prompts[:4], [16] * 4))
    return llm


def _bench_engine(args, work: Workload, single_ids: list[int], burst: Workload | None = None) -> dict:
    llm = _start_engine(args, work, single_ids)
    tput = [engine_throughput(llm, work) for _ in range(args.repeats)]
    singles = [engine_single_stream(llm, single_ids) for _ in range(args.repeats)]
    result = {"throughput": tput, "ttft": [s[0] for s in singles], "decode": [s[1] for s in singles]}
    if burst is not None:
        bursts = [engine_burst(llm, burst) for _ in range(args.repeats)]
        result["burst_ttft"] = [b[0] for b in bursts]
        result["burst_throughput"] = [b[1] for b in bursts]
    llm.engine.shutdown()
    return result


def _bench_vllm(args, path: str, work: Workload, single_ids: list[int], burst: Workload) -> dict:
    from cluster.bench_vllm import run_vllm

    job = {"model": path, "dtype": args.dtype, "max_model_len": 2048, "repeats": args.repeats,
           "workload": {"prompts": work.prompts, "output_lens": work.output_lens},
           "single": {"prompt": single_ids, "tokens": SINGLE_STREAM_TOKENS},
           "burst": {"prompts": burst.prompts, "output_lens": burst.output_lens}}
    print("vLLM: starting (its start-up, compile included, is not timed)", flush=True)
    result = run_vllm(job, args.vllm_venv)
    print(f"vLLM {result['vllm_version']} started in {result['startup_s']:.0f} s", flush=True)
    return result


def _pair_order(i: int) -> tuple[str, str]:
    """Which side runs first in pair ``i``: ours in even pairs, transformers in odd ones."""
    return ("hf", "ours") if i % 2 else ("ours", "hf")


def _bench_against_hf(args, path: str, work: Workload, single_ids: list[int], pad_id: int) -> tuple[dict, dict]:
    """Our engine and transformers in one process, their runs interleaved: run i of each side is a
    pair, and the side that goes first alternates from pair to pair, so a machine that drifts
    during the benchmark (these do, by 5-10% within an hour) moves both sides of every pair alike."""
    from transformers import AutoModelForCausalLM

    llm = _start_engine(args, work, single_ids)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    hf_single_stream(model, single_ids, pad_id)  # warm-up
    sizes = [int(s) for s in args.hf_batch_sizes.split(",")]
    ours = {"throughput": [engine_throughput(llm, work)], "ttft": [], "decode": []}
    sweep = {b: hf_throughput(model, work, b, pad_id) for b in sizes}  # the sweep's best is pair 0's
    best = max(sweep, key=sweep.get)
    print("transformers batch-size sweep (tokens/s, one run each): "
          + ", ".join(f"{b}: {v:.1f}" for b, v in sweep.items()) + f" -> best {best}", flush=True)
    hf = {"throughput": [sweep[best]], "ttft": [], "decode": [], "batch_size": best}
    runs = {"ours": lambda: engine_throughput(llm, work), "hf": lambda: hf_throughput(model, work, best, pad_id)}
    for i in range(1, args.repeats):
        for side in _pair_order(i):
            (ours if side == "ours" else hf)["throughput"].append(runs[side]())
    for i in range(args.repeats):
        for side in _pair_order(i):
            ttft, decode = engine_single_stream(llm, single_ids) if side == "ours" \
                else hf_single_stream(model, single_ids, pad_id)
            result = ours if side == "ours" else hf
            result["ttft"].append(ttft)
            result["decode"].append(decode)
    llm.engine.shutdown()
    return ours, hf


def _burst_p50(runs: list[list[float]]) -> list[float]:
    return [statistics.median(ttfts) for ttfts in runs]


def _report(ours: dict, peer: dict | None, peer_name: str, threads: int, paired: bool = False) -> None:
    rows = [("generated tokens/s (workload)", "throughput", True), ("single-stream TTFT (s)", "ttft", False),
            ("single-stream decode tokens/s", "decode", True)]
    for result in (ours, peer):  # per-run TTFT p50 of the burst, so medians work as for the rest
        if result is not None and "burst_ttft" in result:
            result["burst_ttft_p50"] = _burst_p50(result["burst_ttft"])
    if "burst_throughput" in ours and peer is not None and "burst_throughput" in peer:
        rows += [("prefill-heavy burst TTFT p50 (s)", "burst_ttft_p50", False),
                 ("prefill-heavy burst tokens/s", "burst_throughput", True)]
    print(f"\nCPU: {cpu_summary()}; our torch threads: {threads}; medians of {len(ours['throughput'])} runs; "
          "our prefix cache emptied before every run")
    keys = [key for _, key, _ in rows]
    for name, result in (("llm-cluster", ours), (peer_name, peer)):
        if result is not None:
            print(f"  {name} runs: " + "; ".join(f"{k} " + ", ".join(f"{v:.3f}" for v in result[k])
                                               for k in keys if k in result))
    print(f"{'metric':34s} {'llm-cluster':>12s} {peer_name:>13s} {'ratio':>8s}" + ("  paired ratios" if paired else ""))
    for label, key, higher_better in rows:
        a = _median(ours[key])
        if peer is None:
            print(f"{label:34s} {a:12.3f}")
            continue
        b = _median(peer[key])
        ratio = a / b if higher_better else b / a
        pairs = ""
        if paired:  # run i of each side ran back to back: each pair's ratio, then their median
            each = [x / y if higher_better else y / x for x, y in zip(ours[key], peer[key])]
            pairs = f"  {', '.join(f'{r:.2f}' for r in each)} (median {_median(each):.2f}x)"
        print(f"{label:34s} {a:12.3f} {b:13.3f} {ratio:7.2f}x{pairs}")
    print(f"(ratio > 1 means llm-cluster is better; for TTFT it is {peer_name}'s time / ours"
          + ("; pairs ran back to back, the side going first alternating" if paired else "") + ")")


def run_bench(args) -> int:
    from cluster.model.arch import ModelArch
    from cluster.model.source import resolve_model
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model, _cache_dir())
    arch = ModelArch.from_dir(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    work = make_workload(args.num_requests, arch.vocab_size, args.seed)
    single_ids = tokenizer.encode(SINGLE_STREAM_PROMPT)
    print(f"CPU: {cpu_summary()}; malloc: {malloc_summary()}")
    print(f"workload: {len(work.prompts)} requests, {sum(map(len, work.prompts))} prompt tokens, "
          f"{work.num_output_tokens} output tokens; dtype {args.dtype}; single-stream prompt "
          f"{len(single_ids)} tokens, {SINGLE_STREAM_TOKENS} new tokens; our weights: "
          f"{'dense' if args.dense_weights else 'GGUF blocks where exact (decode-sized matmuls)'}; our KV cache: "
          f"{args.kv_cache_dtype}")
    if args.against == "vllm":
        burst = make_burst_workload(args.burst_requests, arch.vocab_size, args.seed + 1)
        print(f"prefill-heavy burst: {len(burst.prompts)} requests at once, {sum(map(len, burst.prompts))} prompt "
              f"tokens, {burst.num_output_tokens} output tokens", flush=True)
        ours = _bench_engine(args, work, single_ids, burst)
        peer = _bench_vllm(args, source.path, work, single_ids, burst)
        _report(ours, peer, "vLLM-CPU", torch.get_num_threads())
        return 0
    if args.skip_hf:
        _report(_bench_engine(args, work, single_ids), None, "transformers", torch.get_num_threads())
        return 0
    ours, hf = _bench_against_hf(args, source.path, work, single_ids, tokenizer.pad_token_id or 0)
    _report(ours, hf, "transformers", torch.get_num_threads(), paired=True)
    return 0


def _cache_dir() -> str:
    from cluster.config import ModelConfig

    return ModelConfig().resolved_cache_dir()
