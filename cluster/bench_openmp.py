"""``llm-cluster bench-openmp``: decode steps with OpenMP threads that spin vs sleep while they wait.

torch's CPU ops and our kernels split their work over one OpenMP team; between two parallel
regions libgomp (torch's OpenMP) lets the waiting threads spin, 300,000 rounds by default, then
sleep. Spinning is fastest on an idle machine; beside other busy processes a thread may spin on a
core while the partner it waits for is preempted. ``OMP_WAIT_POLICY=PASSIVE`` (set before torch
loads) makes them sleep at once. Which one to run is an operator's choice (README); this
measures both on the machine at hand.

libgomp reads its wait policy once, when torch loads it, so each measurement runs in a fresh child
process (``python -m cluster.bench_openmp CHILD_JOB``): one with libgomp's default spin count
(``GOMP_SPINCOUNT=300000``, what torch does unless told otherwise) and one with
``OMP_WAIT_POLICY=PASSIVE``. Each child loads the model, prefills
``--batch`` prompts of ``--context`` tokens (the bench workload's token ids) and times
``--steps`` decode-only engine steps. Both run on an idle machine and again beside ``--busy``
processes that only burn CPU (a stand-in for the replica's frontend, Serve's proxy or a CI job),
started from this process so the kernel schedules them as the engine's neighbours.
Figures: the median step of each child; each cell the median over ``--repeats`` (the two policies
take turns going first).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time

# libgomp's default (spin 300,000 rounds, then sleep), and sleeping at once.
POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "sleep": {"OMP_WAIT_POLICY": "PASSIVE"}}
_POLICY_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _burn() -> None:
    while True:
        pass


def _child_env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _POLICY_KEYS}
    env.update(POLICIES[policy])
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # libgomp prints what it loaded with: the spin count is read back
    return env


def measure(policy: str, job: dict, timeout_s: float = 900.0) -> dict:
    """One child's decode-step figures (ms) under ``policy``, with the spin count libgomp reported."""
    proc = subprocess.run([sys.executable, "-m", "cluster.bench_openmp", json.dumps(job)], env=_child_env(policy),
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        raise RuntimeError(f"the {policy} child failed (exit code {proc.returncode}); its stderr's tail is above")
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    return {**json.loads(lines[-1]), "spin_count": int(spin.group(1)) if spin else None}


def run_bench_openmp(args) -> int:
    import multiprocessing

    from cluster.bench import cpu_summary

    threads = args.threads or len(os.sched_getaffinity(0))
    job = {"model": args.model, "dtype": args.dtype, "threads": threads, "batch": args.batch,
           "context": args.context, "steps": args.steps}
    print(f"CPU: {cpu_summary()}; torch threads {threads}; decode steps of {args.batch} sequences at "
          f"~{args.context} tokens of context; {args.repeats} repeats", flush=True)
    cells: dict[tuple[int, str], list[float]] = {}
    context = multiprocessing.get_context("spawn")
    for repeat in range(args.repeats):
        for busy in (0, args.busy):
            burners = [context.Process(target=_burn, daemon=True) for _ in range(busy)]
            for p in burners:
                p.start()
            try:
                for policy in list(POLICIES)[:: 1 if repeat % 2 == 0 else -1]:  # alternate who goes first
                    result = measure(policy, job)
                    cells.setdefault((busy, policy), []).append(result["median_ms"])
                    print(f"  repeat {repeat + 1}, {busy} busy processes beside, {policy:5s} (GOMP_SPINCOUNT "
                          f"{result['spin_count']}): step median "
                          f"{result['median_ms']:.1f} ms (min {result['min_ms']:.1f}, max {result['max_ms']:.1f})",
                          flush=True)
            finally:
                for p in burners:
                    p.kill()
                    p.join()
    print(f"\n{'beside':>16s} {'spin (ms)':>10s} {'sleep (ms)':>11s} {'spin/sleep':>11s}")
    for busy in (0, args.busy):
        spin, sleep = (statistics.median(cells[(busy, p)]) for p in ("spin", "sleep"))
        print(f"{busy:6d} busy procs {spin:10.1f} {sleep:11.1f} {spin / sleep:10.2f}x")
    print("(spin/sleep > 1: sleeping threads are faster there; < 1: spinning is)")
    return 0


def _child(job: dict) -> None:
    """Runs in a fresh interpreter whose environment already holds the wait policy."""
    import torch

    from cluster import LLM
    from cluster.bench import make_workload
    from cluster.sampling_params import SamplingParams

    torch.set_num_threads(job["threads"])
    llm = LLM(model=job["model"], dtype=job["dtype"], num_threads=job["threads"], enable_prefix_caching=False)
    engine = llm.engine
    work = make_workload(2 * job["batch"], engine.arch.vocab_size, 0)
    for i in range(job["batch"]):
        prompt = (work.prompts[i] + work.prompts[i + job["batch"]])[: job["context"]]
        engine.add_request(f"openmp-{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=job["steps"] + 8, ignore_eos=True))
    started: set[str] = set()
    while len(started) < job["batch"]:  # prefill every prompt: the steps after are decode-only
        started |= {out.request_id for out in engine.step() if out.outputs[0].token_ids}
    engine.step()  # one decode step before timing
    times = []
    for _ in range(job["steps"]):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    engine.shutdown()
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
