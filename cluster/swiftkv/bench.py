"""``llm-cluster swiftkv bench``: the same engine with SwiftKV on and off, in one run.

- prefill FLOPs of one long prompt (computed from the shapes) and its measured TTFT;
- throughput on a 10:1 prompt:output workload (all requests submitted at once);
- KV bytes per token and tokens that fit one budget, without SwiftKV, with it, with AcrossKV 2;
- quality, read from the parameter file's distillation report.

Medians of ``--repeats`` runs; SwiftKV off and on alternate so drift hits both.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace

import torch

from cluster.model.arch import ModelArch


def prefill_flops(arch: ModelArch, n: int, split: int | None, group: int = 1) -> float:
    """Matmul FLOPs to prefill ``n`` tokens and produce the first token's logits.

    ``split`` None: every layer for every token. Otherwise layers >= split run for the last token
    only, after one K/V projection per AcrossKV group for every token.
    """
    h, d, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    linear = 2 * (h * (q + 2 * kv) + q * h + 3 * h * inter)  # per token per layer
    causal_attention = 2 * 2 * (n * (n + 1) / 2) * q  # QK^T and PV over the causal triangle
    head = 2 * h * arch.vocab_size  # logits of the last token
    layers = arch.num_layers
    if split is None:
        return layers * (n * linear + causal_attention) + head
    groups = -(-(layers - split) // group)
    last_token = 2 * (h * q + q * h + 3 * h * inter) + 2 * 2 * n * q  # q, o, MLP, attention over n keys
    return split * (n * linear + causal_attention) + groups * n * 2 * h * 2 * kv + (layers - split) * last_token + head


def _llm(args, swiftkv: bool, **extra):
    from cluster.llm import LLM

    options = {"dtype": args.dtype, "swiftkv": swiftkv, "enable_prefix_caching": False,
               "max_num_batched_tokens": max(2048, args.prompt_tokens), **extra}
    if swiftkv and args.params:
        options["swiftkv_params"] = args.params
    if args.threads:
        options["num_threads"] = args.threads
    return LLM(model=args.model, **options)


def _prompt(rng: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab - 100, (n,), generator=rng).tolist()


def _quality(args) -> dict | None:
    """Agreement and perplexity before/after distillation, as the parameter file records them."""
    from cluster.swiftkv.checkpoint import bundled_params, load_params

    path = args.params or bundled_params(args.model)
    if path is None:
        return None
    info = load_params(path).info
    return {"params": path, "before": info.get("eval_before"), "after": info.get("eval_after")}


def run_swiftkv_bench(args) -> int:
    from cluster.sampling_params import SamplingParams

    engines = {"base": _llm(args, False), "swiftkv": _llm(args, True)}
    arch = engines["swiftkv"].engine.arch
    plain = replace(arch, swiftkv=False)
    vocab = arch.vocab_size
    rng = torch.Generator().manual_seed(0)
    n = args.prompt_tokens

    # -- TTFT of one long prompt --
    first = SamplingParams(max_tokens=1, temperature=0.0)
    ttft = {name: [] for name in engines}
    for name, llm in engines.items():  # warm-up
        llm.generate([{"prompt_token_ids": _prompt(rng, n, vocab)}], first, use_tqdm=False)
    for _ in range(args.repeats):
        for name, llm in engines.items():
            prompt = _prompt(rng, n, vocab)
            started = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], first, use_tqdm=False)
            ttft[name].append(time.perf_counter() - started)
    ttft_med = {k: statistics.median(v) for k, v in ttft.items()}
    flops = {"base": prefill_flops(plain, n, None),
             "swiftkv": prefill_flops(plain, n, arch.num_key_value_layers, arch.key_value_group_size)}

    # -- throughput, 10:1 --
    out_tokens = args.output_tokens
    work = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
    throughput = {name: [] for name in engines}
    for _ in range(max(1, args.repeats // 2)):
        for name, llm in engines.items():
            prompts = [{"prompt_token_ids": _prompt(rng, 10 * out_tokens, vocab)} for _ in range(args.num_requests)]
            started = time.perf_counter()
            outs = llm.generate(prompts, work, use_tqdm=False)
            seconds = time.perf_counter() - started
            assert all(len(o.outputs[0].token_ids) == out_tokens for o in outs)
            throughput[name].append(args.num_requests * 11 * out_tokens / seconds)
    tput_med = {k: statistics.median(v) for k, v in throughput.items()}

    # -- KV memory --
    dtype_bytes = torch.finfo(torch.bfloat16).bits // 8
    across = replace(arch, key_value_group_size=2)
    kv = {"base": plain.kv_bytes_per_token(dtype_bytes), "swiftkv": arch.kv_bytes_per_token(dtype_bytes),
          "swiftkv_acrosskv2": across.kv_bytes_per_token(dtype_bytes)}
    budget = 1 << 30
    report = {
        "model": args.model, "dtype": args.dtype, "split": arch.num_key_value_layers,
        "group": arch.key_value_group_size, "repeats": args.repeats,
        "prefill": {"prompt_tokens": n, "gflops": {k: v / 1e9 for k, v in flops.items()},
                    "flops_ratio": flops["swiftkv"] / flops["base"],
                    "ttft_s_median": ttft_med, "ttft_s_all": ttft, "ttft_ratio": ttft_med["swiftkv"] / ttft_med["base"]},
        "throughput_10to1": {"requests": args.num_requests, "prompt_tokens": 10 * out_tokens,
                             "output_tokens": out_tokens, "tokens_per_s_median": tput_med,
                             "tokens_per_s_all": throughput, "ratio": tput_med["swiftkv"] / tput_med["base"]},
        "kv_cache": {"bytes_per_token_bf16": kv, "tokens_per_GiB": {k: budget // v for k, v in kv.items()},
                     "acrosskv2_ratio": kv["swiftkv_acrosskv2"] / kv["base"]},
        "quality": _quality(args),
    }
    for llm in engines.values():
        llm.engine.shutdown()
    print(json.dumps(report, indent=1))
    print(f"\nprefill {n} tokens: FLOPs x{report['prefill']['flops_ratio']:.3f}, TTFT {ttft_med['base']:.3f} s -> "
          f"{ttft_med['swiftkv']:.3f} s (x{report['prefill']['ttft_ratio']:.3f})")
    print(f"10:1 throughput: {tput_med['base']:.0f} -> {tput_med['swiftkv']:.0f} tokens/s "
          f"(x{report['throughput_10to1']['ratio']:.3f})")
    print(f"KV bytes/token: {kv['base']} -> {kv['swiftkv']} (SwiftKV) -> {kv['swiftkv_acrosskv2']} (AcrossKV 2, "
          f"x{report['kv_cache']['acrosskv2_ratio']:.3f})")
    return 0
