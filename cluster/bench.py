"""``llm-cluster bench``: the engine against transformers on one seeded workload, in the same run.

Workload: ``--num-requests`` requests, prompt lengths uniform in [16, 1024] tokens, output
lengths uniform in [16, 256] (ignore_eos), random token ids from a seeded generator.
Throughput counts only the tokens each request asked for. transformers runs batched
``generate`` with left padding in arrival order at the best of several batch sizes.
Each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

PROMPT_LEN_RANGE = (16, 1024)
OUTPUT_LEN_RANGE = (16, 256)
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


def engine_single_stream(llm, prompt_ids: list[int]) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s after the first token)."""
    from cluster.sampling_params import SamplingParams

    engine = llm.engine
    _cold_cache(llm)
    params = SamplingParams(temperature=0, max_tokens=SINGLE_STREAM_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request("bench-single", {"prompt_token_ids": prompt_ids}, params)
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, (SINGLE_STREAM_TOKENS - 1) / (end - first)


def _cold_cache(llm) -> None:
    """Repeats reuse the same prompts: drop the prefix cache so no run is served from an earlier one."""
    if not llm.engine.block_manager.reset_prefix_cache():
        raise RuntimeError("prefix cache could not be reset: requests are still running")


# ---- transformers -----------------------------------------------------------------------------


def hf_throughput(model, work: Workload, batch_size: int, pad_id: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        prompts, outs = work.prompts[i:i + batch_size], work.output_lens[i:i + batch_size]
        ids, mask = _left_pad(prompts, pad_id)
        n = max(outs)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad_id)
    return work.num_output_tokens / (time.perf_counter() - start)


def hf_single_stream(model, prompt_ids: list[int], pad_id: int) -> tuple[float, float]:
    ids = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, pad_token_id=pad_id, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=SINGLE_STREAM_TOKENS, min_new_tokens=SINGLE_STREAM_TOKENS, **kwargs)
        total = time.perf_counter() - start
    return ttft, (SINGLE_STREAM_TOKENS - 1) / (total - ttft)


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


def _bench_engine(args, work: Workload, single_ids: list[int]) -> dict:
    from cluster import LLM

    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads)
    engine_single_stream(llm, single_ids)  # warm-up
    engine_throughput(llm, Workload(work.prompts[:4], [16] * 4))
    tput = [engine_throughput(llm, work) for _ in range(args.repeats)]
    singles = [engine_single_stream(llm, single_ids) for _ in range(args.repeats)]
    llm.engine.shutdown()
    return {"throughput": tput, "ttft": [s[0] for s in singles], "decode": [s[1] for s in singles]}


def _bench_hf(args, path: str, work: Workload, single_ids: list[int], pad_id: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    sizes = [int(s) for s in args.hf_batch_sizes.split(",")]
    hf_single_stream(model, single_ids, pad_id)  # warm-up
    sweep = {b: hf_throughput(model, work, b, pad_id) for b in sizes}
    best = max(sweep, key=sweep.get)
    print("transformers batch-size sweep (tokens/s, one run each): "
          + ", ".join(f"{b}: {v:.1f}" for b, v in sweep.items()) + f" -> best {best}")
    tput = [sweep[best]] + [hf_throughput(model, work, best, pad_id) for _ in range(args.repeats - 1)]
    singles = [hf_single_stream(model, single_ids, pad_id) for _ in range(args.repeats)]
    return {"throughput": tput, "ttft": [s[0] for s in singles], "decode": [s[1] for s in singles],
            "batch_size": best}


def _report(ours: dict, hf: dict | None, threads: int) -> None:
    rows = [("generated tokens/s (workload)", "throughput", True), ("single-stream TTFT (s)", "ttft", False),
            ("single-stream decode tokens/s", "decode", True)]
    print(f"\ntorch threads: {threads}; medians of {len(ours['throughput'])} runs; prefix cache emptied "
          "before every engine run")
    for name, result in (("llm-cluster", ours), ("transformers", hf)):
        if result is not None:
            print(f"  {name} runs: " + "; ".join(f"{k} " + ", ".join(f"{v:.3f}" for v in result[k])
                                               for k in ("throughput", "ttft", "decode")))
    print(f"{'metric':34s} {'llm-cluster':>12s} {'transformers':>13s} {'ratio':>8s}")
    for label, key, higher_better in rows:
        a = _median(ours[key])
        if hf is None:
            print(f"{label:34s} {a:12.3f}")
            continue
        b = _median(hf[key])
        ratio = a / b if higher_better else b / a
        print(f"{label:34s} {a:12.3f} {b:13.3f} {ratio:7.2f}x")
    print("(ratio > 1 means llm-cluster is better; for TTFT it is transformers' time / ours)")


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
    print(f"workload: {len(work.prompts)} requests, {sum(map(len, work.prompts))} prompt tokens, "
          f"{work.num_output_tokens} output tokens; dtype {args.dtype}; single-stream prompt "
          f"{len(single_ids)} tokens, {SINGLE_STREAM_TOKENS} new tokens")
    ours = _bench_engine(args, work, single_ids)
    hf = None if args.skip_hf else _bench_hf(args, source.path, work, single_ids, tokenizer.pad_token_id or 0)
    _report(ours, hf, torch.get_num_threads())
    return 0


def _cache_dir() -> str:
    from cluster.config import ModelConfig

    return ModelConfig().resolved_cache_dir()
