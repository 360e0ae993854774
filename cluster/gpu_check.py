"""``make gpu-check``: one prepared command that proves the CUDA path on a GPU machine.

The GPU machine has its own Python (torch + CUDA, Triton, transformers) but no Ray, no network and
no room for our bundled GGUF, so everything here is built on the spot from configs, seeded:

1. ``environment``: torch, CUDA, the GPU, Triton; TF32 switched off for float32 matmuls.
2. ``kernels``: the Triton kernels (``cluster.kernels.triton_attention``) against the float32
   torch reference on real shapes (SmolLM2's and Llama-3.2-1B's heads, head dim 128 too), every
   dtype the device has: decodes over ragged contexts, prefill chunks after cached prefixes.
3. ``correctness``: random-weight models with SmolLM2-135M's and Llama-3.2-1B's shapes; float32
   greedy tokens of the engine on the device (Triton backend, and torch's path on CUDA) against
   the engine on this machine's CPU, tp = 1, in-process. A token that differs is accepted only
   where the CPU's top two logits are within ``TIE_MARGIN`` (a tie that rounding may break either
   way), and reported.
4. ``bench``: SmolLM2-shaped, bfloat16: single-stream decode tokens/s and TTFT, the 64-request
   ``llm-cluster bench`` workload's throughput, with decode CUDA graphs on and off, and
   transformers' batched ``generate`` on the same device and model, in one run.

Every stage records its result or its error in ``gpu_check.json`` (rewritten after each stage, so a
run cut short still says how far it got) and a table in ``gpu_check.md``. ``--device cpu`` runs the
same script on CPU with tiny shapes and the kernels under Triton's interpreter, so the script
itself is tested in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
import traceback

import torch

SEED = 1234
TIE_MARGIN = 1e-3  # CPU logits' top-1 minus top-2 below this: a tie, not a bug

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                    eos_token_id=128001,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
MODELS = {"smollm2-135m-shaped": SMOLLM2_135M, "llama-3.2-1b-shaped": LLAMA_3_2_1B}


def tiny(config: dict) -> dict:
    """The same family and GQA ratio, shrunk for a CPU run under the interpreter."""
    ratio = config["num_attention_heads"] // config["num_key_value_heads"]
    heads = 2 * ratio
    shape = dict(hidden_size=16 * heads, intermediate_size=32 * heads, num_hidden_layers=2, num_attention_heads=heads,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024,
                 bos_token_id=1, eos_token_id=2)
    out = {**config, **shape}
    if "rope_scaling" in out:
        out["rope_scaling"] = {**out["rope_scaling"], "original_max_position_embeddings": 64}
    return out


# ---- the reference --------------------------------------------------------------------------


def reference_attention(q, kv_cache, block_tables, seq_lens: list[int], query_lens: list[int], scale: float):
    """float32 paged attention, one sequence at a time: query rows attend to keys 0..their position."""
    block_size = kv_cache.shape[3]
    kv_heads, head_dim = kv_cache.shape[1], kv_cache.shape[4]
    group = q.shape[1] // kv_heads
    out, row = torch.empty(q.shape, dtype=torch.float32, device=q.device), 0
    for s, (n, qn) in enumerate(zip(seq_lens, query_lens)):
        blocks = block_tables[s, : -(-n // block_size)].long()
        keys = kv_cache[0][:, blocks].reshape(kv_heads, -1, head_dim)[:, :n].float().repeat_interleave(group, 0)
        values = kv_cache[1][:, blocks].reshape(kv_heads, -1, head_dim)[:, :n].float().repeat_interleave(group, 0)
        scores = q[row: row + qn].float().transpose(0, 1) @ keys.transpose(1, 2) * scale  # [Hq, qn, n]
        positions = torch.arange(n - qn, n, device=q.device)
        scores.masked_fill_(torch.arange(n, device=q.device)[None, :] > positions[:, None], float("-inf"))
        out[row: row + qn] = (scores.softmax(-1) @ values).transpose(0, 1)
        row += qn
    return out


def attention_case(seq_lens: list[int], query_lens: list[int], heads: int, kv_heads: int, head_dim: int,
                   block_size: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Random cache, scattered block tables and queries: (triton output, reference) as float32."""
    from cluster.kernels import triton_attention

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    kv_cache = torch.randn(2, kv_heads, num_blocks, block_size, head_dim, generator=gen).to(device, dtype)
    pool = rng.sample(range(num_blocks), sum(needed))
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    for row, n in enumerate(needed):
        tables[row, :n] = torch.tensor(pool[:n], dtype=torch.int32)
        pool = pool[n:]
    tables = tables.to(device)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(device, dtype)
    num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = triton_attention.paged_attention(q, kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=device),
                                           starts, num_decodes, max(query_lens[num_decodes:], default=0), scale)
    return out.float(), reference_attention(q, kv_cache, tables, seq_lens, query_lens, scale)


# ---- stages -----------------------------------------------------------------------------------


def stage_environment(ctx: dict) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": ctx["device"],
            "cuda_available": torch.cuda.is_available(), "tf32": torch.backends.cuda.matmul.allow_tf32}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ctx["device"] == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["cuda"] = torch.version.cuda
    else:
        info["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return info


def stage_kernels(ctx: dict) -> dict:
    device, small = ctx["device"], ctx["small"]
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    tolerance = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
    shapes = [(9, 3, 64), (32, 8, 64), (32, 8, 128)] if not small else [(9, 3, 64)]
    rng = random.Random(SEED)
    if small:
        decode_lens, prefill = [1, 15, 16, 17, 70], ([1, 1, 21, 13], [9, 40, 21, 40])
    else:
        decode_lens = [1, 15, 16, 17] + [rng.randint(1, 2048) for _ in range(60)]
        query = [1] * 8 + [512, 300, 1, 77]
        prefill = (query, [rng.randint(1, 2048) for _ in range(8)] + [512, 300 + 700, 1 + 1023, 77 + 16])
    cases, worst = [], 0.0
    for heads, kv_heads, head_dim in shapes:
        for dtype in dtypes:
            for kind, (seq_lens, query_lens) in (("decode", (decode_lens, [1] * len(decode_lens))),
                                                 ("mixed", (prefill[1], prefill[0]))):
                out, ref = attention_case(seq_lens, query_lens, heads, kv_heads, head_dim, 16, dtype, device, SEED)
                err = (out - ref).abs().max().item()
                ok = err <= tolerance[dtype] * max(1.0, ref.abs().max().item())
                cases.append({"kind": kind, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                              "dtype": str(dtype).split(".")[-1], "max_abs_err": err, "ok": ok})
                worst = max(worst, err)
    failed = [c for c in cases if not c["ok"]]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(cases)} kernel cases off the reference: {failed}")
    return {"cases": len(cases), "max_abs_err": worst}


def build_model(config: dict, directory: str, seed: int) -> str:
    """A random-weight Llama checkpoint (safetensors) with a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        unk_token="t0", bos_token=f"t{config['bos_token_id']}",
                                        eos_token=f"t{config['eos_token_id']}")
    tokenizer.save_pretrained(directory)
    del model
    return directory


def _prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def _greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from cluster.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _margin(cpu_llm, ids: list[int]) -> float:
    """The CPU engine's top-1 minus top-2 logit after ``ids``."""
    logits = cpu_llm.engine.executor.collective_rpc("score", ids)[-1]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def stage_correctness(ctx: dict) -> dict:
    from cluster.llm import LLM

    device, small = ctx["device"], ctx["small"]
    lengths, max_tokens = ([5, 17, 40], 8) if small else ([5, 17, 64, 200], 32)
    backends = ["triton"] if device == "cpu" else ["triton", "torch"]
    report = {}
    for name, config in MODELS.items():
        config = tiny(config) if small else config
        path = build_model(config, os.path.join(ctx["scratch"], name), SEED)
        prompts = _prompts(config["vocab_size"], lengths, SEED)
        cpu = LLM(model=path, dtype="float32", device="cpu", use_native_kernels=False, attention_backend="torch")
        expected = _greedy(cpu, prompts, max_tokens)
        for backend in backends:
            llm = LLM(model=path, dtype="float32", device=device, attention_backend=backend)
            got = _greedy(llm, prompts, max_tokens)
            llm.engine.shutdown()
            del llm
            equal, ties, diverged = 0, [], []
            for prompt, want, have in zip(prompts, expected, got):
                if want == have:
                    equal += 1
                    continue
                at = next(i for i, (a, b) in enumerate(zip(want, have)) if a != b)
                margin = _margin(cpu, prompt + want[:at])
                (ties if margin < TIE_MARGIN else diverged).append({"prompt_len": len(prompt), "at": at,
                                                                   "margin": margin})
            report[f"{name}/{backend}"] = {"prompts": len(prompts), "equal": equal, "ties": ties}
            if diverged:
                raise AssertionError(f"{name} on {device} ({backend}) diverged from the CPU beyond a tie: {diverged}")
        cpu.engine.shutdown()
    return report


def _engine_bench(path: str, dtype: str, device: str, work, single: list[int], tokens: int | None,
                  **options) -> dict:
    from cluster.bench import engine_single_stream, engine_throughput
    from cluster.llm import LLM

    llm = LLM(model=path, dtype=dtype, device=device, **options)
    try:
        runner = llm.engine.executor.worker.runner
        engine_single_stream(llm, single, tokens)  # warm-up
        ttft, decode = engine_single_stream(llm, single, tokens)
        tput = engine_throughput(llm, work)
        return {"ttft_s": ttft, "decode_tok_s": decode, "workload_tok_s": tput,
                "decode_graphs": runner.graphs.sizes if runner.graphs is not None else None,
                "graph_replays": runner.graphs.num_replays if runner.graphs is not None else 0}
    finally:
        llm.engine.shutdown()


def stage_bench(ctx: dict) -> dict:
    from cluster.bench import Workload, hf_single_stream, hf_throughput, make_workload

    device, small = ctx["device"], ctx["small"]
    config = tiny(SMOLLM2_135M) if small else SMOLLM2_135M
    path = build_model(config, os.path.join(ctx["scratch"], "bench-model"), SEED)
    dtype = "bfloat16"
    if small:
        work = Workload(_prompts(config["vocab_size"], [12, 30, 7, 50], SEED), [6, 3, 8, 4])
        single_tokens = 16
    else:
        work, single_tokens = make_workload(64, config["vocab_size"], 0), None
    single = _prompts(config["vocab_size"], [34], SEED + 1)[0]
    result = {"model": "smollm2-135m-shaped (random weights)", "dtype": dtype,
              "engine": _engine_bench(path, dtype, device, work, single, single_tokens)}
    if device == "cuda":  # the same engine with every step eager
        result["engine_no_graphs"] = _engine_bench(path, dtype, device, work, single, single_tokens,
                                                   cuda_graphs=False)
    from transformers import AutoModelForCausalLM

    batch = 4 if small else 16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    hf_ttft, hf_decode = hf_single_stream(model, single, 0, single_tokens)
    result["transformers"] = {"ttft_s": hf_ttft, "decode_tok_s": hf_decode,
                              "workload_tok_s": hf_throughput(model, work, batch, 0), "batch_size": batch}
    ours, hf = result["engine"], result["transformers"]
    result["ratios_vs_transformers"] = {"decode": ours["decode_tok_s"] / hf["decode_tok_s"],
                                        "ttft": hf["ttft_s"] / ours["ttft_s"],
                                        "workload": ours["workload_tok_s"] / hf["workload_tok_s"]}
    return result


STAGES = [("environment", stage_environment), ("kernels", stage_kernels), ("correctness", stage_correctness),
          ("bench", stage_bench)]


# ---- the run ----------------------------------------------------------------------------------


def write_table(results: dict, path: str) -> None:
    lines = [f"# gpu-check {results['started']} ({results['device']})", "", "| stage | status | seconds | result |",
             "|---|---|---|---|"]
    for name, stage in results["stages"].items():
        detail = stage.get("error", "").strip().splitlines()[-1] if stage["status"] != "ok" else \
            json.dumps({k: v for k, v in stage.items() if k not in ("status", "seconds")})[:300]
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']:.1f} | {detail} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run(device: str, out_dir: str, only: list[str] | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": device, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        ctx = {"device": device, "small": device == "cpu", "scratch": scratch}
        for name, stage in STAGES:
            if only and name not in only:
                continue
            started = time.perf_counter()
            print(f"[gpu-check] {name} ...", flush=True)
            try:
                entry = {"status": "ok", **stage(ctx)}
            except Exception:  # noqa: BLE001 - recorded; the next stage still runs
                entry = {"status": "failed", "error": traceback.format_exc()}
            entry["seconds"] = time.perf_counter() - started
            results["stages"][name] = entry
            print(f"[gpu-check] {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
            if entry["status"] != "ok":
                print(entry["error"], flush=True)
            with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
                json.dump(results, f, indent=1)
            write_table(results, os.path.join(out_dir, "gpu_check.md"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu-check-out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--only", action="append", choices=[name for name, _ in STAGES],
                        help="run only this stage (repeatable)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu to exercise the script)")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    results = run(args.device, args.out, args.only)
    with open(os.path.join(args.out, "gpu_check.md")) as f:
        print(f.read())
    return 0 if all(s["status"] == "ok" for s in results["stages"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
