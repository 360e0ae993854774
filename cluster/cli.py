"""The ``llm-cluster`` command line: generate text, run benchmarks."""

from __future__ import annotations

import argparse
import os
import sys

from cluster.config import DEFAULT_MODEL, KV_CACHE_DTYPES, SUPPORTED_DTYPES


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, HF directory or .gguf file")
    p.add_argument("--dtype", default="auto", choices=SUPPORTED_DTYPES,
                   help="auto: bfloat16 where this CPU/GPU computes it natively, else float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _add_kv_cache_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="what K/V are stored as; auto: the model's dtype (exact). bfloat16/float16 under a float32 "
                        "model: half the cache's bytes, each K/V value rounded once")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion to the terminal")
    p.add_argument("prompt")
    _add_engine_args(p)
    _add_kv_cache_dtype_arg(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                   help="ranks to split the model over (Ray worker actors above 1)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="stream from a running server over gRPC instead of loading the model here")
    p.add_argument("--application", default="llm-cluster", help="Serve application name (gRPC metadata)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.set_defaults(func=_cmd_generate)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="engine vs transformers on a seeded workload")
    _add_engine_args(p)
    _add_kv_cache_dtype_arg(p)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per system; medians are reported")
    p.add_argument("--hf-batch-sizes", default="8,16,32", help="transformers batch sizes to try")
    p.add_argument("--skip-hf", action="store_true", help="engine only")
    p.add_argument("--against", choices=("transformers", "vllm"), default="transformers",
                   help="the peer run beside the engine (vllm: its CPU build in --vllm-venv, `make vllm-install`)")
    p.add_argument("--vllm-venv", default=".venv-vllm", help="with --against vllm: vLLM's own venv")
    p.add_argument("--burst-requests", type=int, default=16,
                   help="with --against vllm: requests in the prefill-heavy burst (1-1.8k-token prompts, 10:1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-weights", action="store_true",
                   help="hold every weight as dense floats (no GGUF blocks; the same outputs, more bytes a step)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="instead: sweep 1/8/32/64 gRPC streams against a running server")
    p.add_argument("--application", default="llm-cluster", help="with --server: the Serve application")
    p.add_argument("--prompt-words", type=int, default=200, help="with --server: words per prompt")
    p.add_argument("--max-tokens", type=int, default=24, help="with --server: output tokens per request")
    p.set_defaults(func=_cmd_bench)


def _spec_bench_parser(sub) -> None:
    p = sub.add_parser("bench-spec", help="speculative decoding off vs n-gram vs suffix; structured-output mask overhead")
    _add_engine_args(p)
    p.add_argument("--methods", default="off,ngram,suffix", help="comma-separated; the first is the baseline")
    p.add_argument("--num-tokens", type=int, default=4, help="drafted tokens per step at most (k)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request at most")
    p.add_argument("--single-requests", type=int, default=4, help="requests per single-stream run, one after another")
    p.add_argument("--streams", type=int, default=16, help="requests at once in the batched run")
    p.add_argument("--repeats", type=int, default=3, help="runs per method; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-structured", action="store_true", help="leave out the structured-output overhead table")
    p.add_argument("--prompt-tokens", type=lambda v: tuple(int(x) for x in v.split(",")), default=(500, 1500),
                   metavar="MIN,MAX", help="prompt lengths (documents and random prompts) in tokens")
    p.set_defaults(func=_cmd_spec_bench)


def _cmd_spec_bench(args) -> int:
    from cluster.bench_spec import run_spec_bench

    return run_spec_bench(args)


def _serve_bench_parser(sub) -> None:
    p = sub.add_parser("bench-serve", help="served vs in-process throughput, gRPC sweep, router comparison")
    _add_engine_args(p)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--prefix-words", type=int, default=400, help="shared prefix length in the router phase")
    p.add_argument("--chat-conversations", type=int, default=8, help="router phase: multi-turn conversations")
    p.add_argument("--chat-turns", type=int, default=4, help="router phase: turns per conversation")
    p.add_argument("--chat-words", type=int, default=60, help="router phase: words per user message")
    p.add_argument("--chat-max-tokens", type=int, default=32, help="router phase: tokens per reply at most")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grpc-port", type=int, default=9310)
    p.add_argument("--http-port", type=int, default=8310)
    p.set_defaults(func=_cmd_serve_bench)


def _cmd_serve_bench(args) -> int:
    from cluster.bench_serve import run_serve_bench

    return run_serve_bench(args)


def _micro_parser(sub) -> None:
    p = sub.add_parser("bench-micro", help="packed vs plain bf16 linears; C++ vs torch decode attention; one-pass SwiGLU")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_micro)


def _openmp_parser(sub) -> None:
    p = sub.add_parser("bench-openmp", help="decode steps, OpenMP threads spinning vs sleeping, idle and beside load")
    _add_engine_args(p)  # --threads: default, every core this process may use
    p.add_argument("--busy", type=int, default=2, help="CPU-burning processes beside the engine in the loaded case")
    p.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    p.add_argument("--context", type=int, default=600, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=30, help="decode steps timed per child")
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(func=_cmd_openmp)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="deploy the Ray Serve app (gRPC + OpenAI HTTP) and wait for Ctrl-C")
    _add_engine_args(p)
    _add_kv_cache_dtype_arg(p)
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a private local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (Serve's gRPC proxy binds all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--num-replicas", type=int, default=1, help="fixed replica count (without --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale replicas between --min-replicas and this (engine-load policy)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica (default: all at tp=1)")
    p.add_argument("--router", default="prefix_affinity", choices=["prefix_affinity", "power_of_two"])
    p.add_argument("--api-key-file", default=None, help="require this file's key on both APIs (Bearer token)")
    p.add_argument("--api-key-env", default=None, help="or the key in this environment variable")
    p.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM), with --tls-key")
    p.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    p.add_argument("--max-request-bytes", type=int, default=None, help="largest HTTP body / gRPC message taken")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from cluster.serving.config import ServingConfig
    from cluster.serving.launcher import serve_forever

    cpus = args.replica_cpus or (float(os.cpu_count() or 1) if args.tensor_parallel_size == 1 else 1.0)
    engine = {"model": args.model, "dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size}
    if args.kv_cache_dtype != "auto":
        engine["kv_cache_dtype"] = args.kv_cache_dtype
    if args.threads:
        engine["num_threads"] = args.threads
    autoscaling = None if args.max_replicas is None else \
        {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    security = {"api_key_file": args.api_key_file, "api_key_env": args.api_key_env}
    if args.max_request_bytes is not None:
        security["max_request_bytes"] = args.max_request_bytes
    config = ServingConfig(num_replicas=args.num_replicas, autoscaling=autoscaling, replica_num_cpus=cpus,
                           router=args.router, engine=engine, **security)
    return serve_forever(args, config)


def _soak_parser(sub) -> None:
    p = sub.add_parser("soak", help="hold N gRPC streams against a served app; check memory stays flat")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=SUPPORTED_DTYPES)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--max-growth", type=float, default=0.03, help="RSS growth after the first minute that fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="soak a running server instead")
    p.add_argument("--address", default=None, help="with --server: its Ray cluster (for nothing but pids)")
    p.add_argument("--application", default="llm-cluster", help="with --server: the Serve application")
    p.add_argument("--grpc-port", type=int, default=9100)
    p.add_argument("--http-port", type=int, default=8100)
    p.set_defaults(func=_cmd_soak)


def _cmd_soak(args) -> int:
    from cluster.soak import run_soak

    return run_soak(args)


def _tp_parser(sub) -> None:
    p = sub.add_parser("bench-tp", help="Ray executor dispatch overhead; decode tokens/s at tp=1 vs tp=N")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", choices=SUPPORTED_DTYPES)
    p.add_argument("--tp", default="3", help="comma-separated tensor-parallel sizes to compare with tp=1")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads at tp=1")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs (and threads) per worker at tp>1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=_cmd_tp)


def _cmd_tp(args) -> int:
    from cluster.bench_tp import run_bench_tp

    return run_bench_tp(args)


def _cmd_openmp(args) -> int:
    from cluster.bench_openmp import run_bench_openmp

    return run_bench_openmp(args)


def _cmd_micro(args) -> int:
    from cluster.bench_micro import run_micro

    return run_micro(args)


def _cmd_generate(args) -> int:
    if args.server:
        from cluster.serving.client import stream_generate

        return stream_generate(args)
    from cluster.config import EngineConfig
    from cluster.engine.llm_engine import LLMEngine
    from cluster.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_kwargs(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                                tensor_parallel_size=args.tensor_parallel_size,
                                                kv_cache_dtype=args.kv_cache_dtype))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, stop=args.stop)
    prompt = args.prompt
    if args.chat:
        prompt = {"prompt_token_ids": engine.input_processor.chat_token_ids([{"role": "user", "content": prompt}])}
    engine.add_request("cli", prompt, params)
    shown = 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
    finally:
        engine.shutdown()
    sys.stdout.write("\n")
    return 0


def _cmd_bench(args) -> int:
    if args.server:
        from cluster.bench_serve import run_client_bench

        return run_client_bench(args)
    from cluster.bench import run_bench

    return run_bench(args)


def _swiftkv_parser(sub) -> None:
    from cluster.swiftkv import distill

    p = sub.add_parser("swiftkv", help="SwiftKV: distil parameters, export checkpoints, benchmark")
    actions = p.add_subparsers(dest="swiftkv_command", required=True)
    distill.add_parser(actions)
    e = actions.add_parser("export", help="base checkpoint + SwiftKV parameter file -> a llama_swiftkv checkpoint")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--params", default=None, help="parameter file (default: the one shipped for --model)")
    e.add_argument("--out", required=True, help="output directory")
    e.set_defaults(func=_cmd_swiftkv_export)
    b = actions.add_parser("bench", help="SwiftKV vs the same engine without it: TTFT, throughput, KV memory")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--dtype", default="auto", choices=SUPPORTED_DTYPES)
    b.add_argument("--params", default=None, help="parameter file (default: the one shipped for --model)")
    b.add_argument("--prompt-tokens", type=int, default=2000)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--num-requests", type=int, default=16, help="throughput workload: requests")
    b.add_argument("--output-tokens", type=int, default=200, help="throughput workload: tokens per answer "
                   "(prompts are 10x)")
    b.add_argument("--threads", type=int, default=None)
    b.set_defaults(func=_cmd_swiftkv_bench)


def _cmd_swiftkv_export(args) -> int:
    from cluster.config import ModelConfig
    from cluster.errors import InvalidConfigError
    from cluster.model.source import resolve_model
    from cluster.swiftkv.checkpoint import bundled_params, load_params, write_checkpoint

    base = resolve_model(args.model, ModelConfig().resolved_cache_dir()).path
    params = args.params or bundled_params(args.model)
    if params is None:
        raise InvalidConfigError("params", f"no SwiftKV parameter file shipped for {args.model!r}; pass --params")
    print(write_checkpoint(base, load_params(params), args.out))
    return 0


def _cmd_swiftkv_bench(args) -> int:
    from cluster.swiftkv.bench import run_swiftkv_bench

    return run_swiftkv_bench(args)


# Commands whose engines run in Serve replicas: "auto" resolves there, on the replica's own device.
_DTYPE_RESOLVED_BY_REPLICAS = ("serve", "soak")


def _local_dtype(dtype: str) -> str:
    import torch

    from cluster.config import resolve_dtype

    return resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    from cluster.errors import InvalidConfigError, InvalidRequestError

    parser = argparse.ArgumentParser(prog="llm-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _bench_parser(sub)
    _micro_parser(sub)
    _openmp_parser(sub)
    _tp_parser(sub)
    _serve_parser(sub)
    _soak_parser(sub)
    _serve_bench_parser(sub)
    _spec_bench_parser(sub)
    _swiftkv_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[2:] if args.command == "swiftkv" else []
    if getattr(args, "dtype", None) == "auto" and args.command not in _DTYPE_RESOLVED_BY_REPLICAS:
        args.dtype = _local_dtype(args.dtype)  # benchmarks compare, print and pass on the dtype they ran
    try:
        return args.func(args)
    except (InvalidRequestError, InvalidConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
