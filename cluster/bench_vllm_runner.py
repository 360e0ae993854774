"""The vLLM side of ``llm-cluster bench --against vllm``, run as a script in vLLM's own venv.

    .venv-vllm/bin/python cluster/bench_vllm_runner.py JOB.json RESULT.json

It imports nothing from this package (vLLM's venv does not have it): the job file carries the
model directory and the very token ids, output lengths and repeat count our engine ran, and the
result file gets the same measures ``cluster.bench`` takes of our engine, one value per run:

- ``throughput``: generated tokens/s of one offline ``LLM.generate`` over the whole workload;
- ``ttft`` / ``decode``: one request alone, stepped through the engine: seconds to its first
  token, then tokens/s for the rest;
- ``burst_ttft`` / ``burst_throughput`` (when the job has a burst workload): every request added
  at once and the engine stepped to the end; each request's time to its first token, and
  generated tokens/s over the burst.

Start-up (weights, torch.compile, KV cache) is timed apart as ``startup_s`` and kept out of the
figures. vLLM spawns processes, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import sys
import time


def _params(sampling_params_cls, max_tokens: int):
    return sampling_params_cls(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _throughput(llm, sampling_params_cls, tokens_prompt_cls, prompts, output_lens) -> float:
    inputs = [tokens_prompt_cls(prompt_token_ids=p) for p in prompts]
    params = [_params(sampling_params_cls, n) for n in output_lens]
    start = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != sum(output_lens):
        raise RuntimeError(f"vLLM produced {produced} tokens, expected {sum(output_lens)}")
    return produced / elapsed


def _stepped(llm, sampling_params_cls, tokens_prompt_cls, prompts, output_lens, tag: str):
    """Add every prompt at once, step to the end: (per-request seconds to first token, generated
    tokens/s, seconds from the first token of request 0 to the end)."""
    engine = llm.llm_engine
    first: dict[str, float] = {}
    produced: dict[str, int] = {}
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        engine.add_request(f"{tag}-{i}", tokens_prompt_cls(prompt_token_ids=prompt), _params(sampling_params_cls, n))
    while engine.has_unfinished_requests():
        for out in engine.step():
            count = len(out.outputs[0].token_ids) if out.outputs else 0
            if count and out.request_id not in first:
                first[out.request_id] = time.perf_counter()
            produced[out.request_id] = max(produced.get(out.request_id, 0), count)
    end = time.perf_counter()
    if sum(produced.values()) != sum(output_lens):
        raise RuntimeError(f"vLLM produced {sum(produced.values())} tokens, expected {sum(output_lens)}")
    ttfts = [first[f"{tag}-{i}"] - start for i in range(len(prompts))]
    return ttfts, sum(output_lens) / (end - start), end - first[f"{tag}-0"]


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
              enable_prefix_caching=False, seed=0)
    result = {"startup_s": time.perf_counter() - started, "vllm_version": _version()}
    work, single, repeats = job["workload"], job["single"], job["repeats"]
    # Warm-up: one short batch and one single stream (the first calls of a compiled model are slower).
    _throughput(llm, SamplingParams, TokensPrompt, work["prompts"][:4], [16] * 4)
    _stepped(llm, SamplingParams, TokensPrompt, [single["prompt"]], [single["tokens"]], "warm")
    result["throughput"] = [_throughput(llm, SamplingParams, TokensPrompt, work["prompts"], work["output_lens"])
                            for _ in range(repeats)]
    result["ttft"], result["decode"] = [], []
    for r in range(repeats):
        [ttft], _, after_first = _stepped(llm, SamplingParams, TokensPrompt, [single["prompt"]], [single["tokens"]],
                                          f"single{r}")
        result["ttft"].append(ttft)
        result["decode"].append((single["tokens"] - 1) / after_first)
    burst = job.get("burst")
    if burst:
        result["burst_ttft"], result["burst_throughput"] = [], []
        for r in range(repeats):
            ttfts, tput, _ = _stepped(llm, SamplingParams, TokensPrompt, burst["prompts"], burst["output_lens"],
                                      f"burst{r}")
            result["burst_ttft"].append(ttfts)
            result["burst_throughput"].append(tput)
    return result


def _version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as f:
        job = json.load(f)
    result = run(job)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
