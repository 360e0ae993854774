"""Builds and loads the optional C++ CPU kernels (compiled once per machine, then cached).

- ``paged_decode``: decode attention reading K/V where they lie in the paged cache (torch's
  CPU attention needs each context gathered into a contiguous copy first).
- ``rms_norm``: fused residual add + RMSNorm.
- ``gemv_bf16``: decode-sized bfloat16 linears (1-4 rows), where AVX512-BF16 is there.
- ``gemv_f32``: decode-sized float32 linears (up to 48 rows), where AVX2 + FMA are there; and
  ``gemv_q4_1`` / ``gemv_q8_0``, the same loop over a weight held as exact GGUF blocks.
- ``gemm_f32``: float32 linears of more rows (prefill chunks, batched decode) over a weight packed
  once into column panels (``pack_f32``), where AVX2 + FMA are there.
- ``prefill_attention``: causal float32 attention of a prompt chunk over its context (AVX2 + FMA);
  ``prefill_attention_amx`` the same in bfloat16 with AMX tiles (Xeons with AMX-BF16).
- ``rotary_``: RoPE in place, one pass.
- ``write_kv``: a step's K/V stored at their slots of the paged cache, no intermediate copy.
- ``argmax_rows``: greedy sampling's argmax over float32 logits, the rows spread over the threads.

They are built with the machine's C++ compiler through torch.utils.cpp_extension on first
use (about 30 s, cached under ~/.cache/torch_extensions); if that fails, ``load()`` returns
None and the layers keep their pure-torch paths.

torch guards a build with a plain ``lock`` file that a killed build leaves behind, after which
every later load of the extension, by any process, waits on it forever (a test suite hung so).
Builds here take an ``flock`` first (the OS releases it when its holder dies), so whoever holds it
knows no live build owns torch's lock file and removes a stale one.

Each checkout builds in its own subdirectory: ninja rebuilds whenever the source paths in its
build file change, so two checkouts sharing one directory rebuilt (minutes each on a busy 2-core
box) over each other's builds, and every process of the other waited.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}
_NAME = "llm_cluster_cpu_kernels"


def load():
    """The compiled module, or None when it cannot be built here."""
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build():
    try:
        from torch.utils import cpp_extension

        here = os.path.dirname(__file__)
        sources = [os.path.join(here, name) for name in ("bindings.cpp", "paged_decode.cpp", "rms_norm.cpp",
                                                          "gemv_bf16.cpp", "gemm_amx_bf16.cpp", "gemv_f32.cpp",
                                                          "gemm_f32.cpp",
                                                          "prefill_attention.cpp", "prefill_attention_amx.cpp",
                                                          "rotary.cpp", "silu_mul.cpp", "write_kv.cpp", "argmax.cpp",
                                                          "decode_layers.cpp")]
        build_dir = build_directory()
        with open(os.path.join(build_dir, "llm_cluster.flock"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # one build at a time across processes; freed if we die
            remove_stale_torch_lock(build_dir)
            return cpp_extension.load(name=_NAME, sources=sources, build_directory=build_dir,
                                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                                      verbose=False)
    except Exception as err:  # no compiler, no headers: the torch path still works
        logger.warning("CPU kernels unavailable, using plain torch paths: %s", err)
        return None


def build_directory() -> str:
    """This checkout's build directory for this CPU, under torch's extensions directory (created if
    missing). The kernels compile with ``-march=native``: a build from an AMX Xeon dies of an illegal
    instruction on an AVX2-only EPYC, so a home directory shared by both must not share the build."""
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    key = f"{here}\n{cpu_flags()}"
    path = os.path.join(cpp_extension._get_build_directory(_NAME, verbose=False),
                        hashlib.sha256(key.encode()).hexdigest()[:12])
    os.makedirs(path, exist_ok=True)
    return path


def cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux ``/proc/cpuinfo``), or the machine type elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.machine()


def remove_stale_torch_lock(build_dir: str) -> bool:
    """Remove torch's build lock file; call only while holding the flock (no live build owns it)."""
    stale = os.path.join(build_dir, "lock")
    try:
        os.remove(stale)
    except FileNotFoundError:
        return False
    logger.warning("removed a stale torch build lock left by a killed build: %s", stale)
    return True
