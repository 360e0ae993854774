"""vLLM's CPU build as the peer of ``llm-cluster bench``: run ``bench_vllm_runner.py`` in its venv.

vLLM lives in its own venv (``make vllm-install`` builds ``.venv-vllm``): it pins other versions of
transformers and friends, so it never shares ``.venv``. This module writes the job (model
directory, token ids, output lengths, repeats) to a temp folder, runs the runner there with the
environment vLLM's CPU backend is fastest with on these machines, and reads its result back.

Environment (measured; docs/benchmarks.md): every core bound to vLLM's OpenMP threads and none
reserved (``auto`` reserves one: half the throughput on 2 cores), 4 GiB of KV cache, tcmalloc and
Intel's OpenMP preloaded, and every cache and IPC socket under the one temp folder, which goes
when the run ends.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from cluster.errors import InvalidConfigError

RUNNER = pathlib.Path(__file__).with_name("bench_vllm_runner.py")
DEFAULT_VENV = ".venv-vllm"


def vllm_python(venv: str) -> pathlib.Path:
    """The venv's interpreter, or a typed error saying how to build the venv."""
    python = pathlib.Path(venv).absolute() / "bin" / "python"  # the runner's working directory is a temp folder
    if not python.exists():
        raise InvalidConfigError("vllm_venv", f"no vLLM venv at {venv!r}: build it with `make vllm-install` "
                                              "(or pass --vllm-venv)")
    return python


KV_CACHE_GIB = 4  # both engines' KV cache budget in the side-by-side (ours: kv_cache_memory_bytes)


def vllm_env(venv: str, scratch: str, cpus: list[int]) -> dict[str, str]:
    """The environment the runner gets: ours, plus vLLM's CPU settings and preloads."""
    lib = pathlib.Path(venv).resolve() / "lib"
    preload = [str(p) for p in (lib / "libtcmalloc_minimal.so.4", lib / "libiomp5.so") if p.exists()]
    env = dict(os.environ)
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS"):  # nothing of ours leaks in
        env.pop(key, None)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(cpus),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CACHE_ROOT": os.path.join(scratch, "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"),
        "VLLM_RPC_BASE_PATH": scratch,
        "TMPDIR": scratch,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    return env


def _cpu_list(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (vLLM's binding syntax)."""
    ranges, start, prev = [], None, None
    for cpu in sorted(cpus):
        if start is None:
            start = prev = cpu
        elif cpu == prev + 1:
            prev = cpu
        else:
            ranges.append((start, prev))
            start = prev = cpu
    if start is not None:
        ranges.append((start, prev))
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def run_vllm(job: dict, venv: str = DEFAULT_VENV, timeout_s: float = 3600.0) -> dict:
    """Run the job in vLLM's venv; its result dict (see ``bench_vllm_runner``)."""
    python = vllm_python(venv)
    with tempfile.TemporaryDirectory(prefix="llm-cluster-vllm-") as scratch:
        job_path, result_path = os.path.join(scratch, "job.json"), os.path.join(scratch, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        cpus = sorted(os.sched_getaffinity(0))
        log_path = os.path.join(scratch, "vllm.log")
        with open(log_path, "w") as log:
            proc = subprocess.run([str(python), str(RUNNER), job_path, result_path], env=vllm_env(venv, scratch, cpus),
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=scratch)
        if proc.returncode != 0 or not os.path.exists(result_path):
            with open(log_path) as f:
                tail = f.read()[-4000:]
            sys.stderr.write(tail)
            raise RuntimeError(f"the vLLM run failed (exit code {proc.returncode}); its log's tail is above")
        with open(result_path) as f:
            return json.load(f)
